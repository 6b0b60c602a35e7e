"""The norm and activation kernels (csrc/norm_act.cu) against the torch references: random shapes and scales, bf16
and fp16, the fp32 residual, padded row strides, a chain of them eagerly and replayed from a CUDA graph with new
inputs (each reads the one before it: a missing PDL wait would show), and the refusals of bad input. Outputs are
allocated by the ops, so blocks of their sizes are filled with NaN and freed first: an element left unwritten shows."""

import pytest
import torch

from minivllm import ops
from minivllm.ops import KERNELS_BUILT, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

DTYPES = (torch.bfloat16, torch.float16)
ROWS = (0, 1, 3, 16, 257, 2049)
HIDDEN = (64, 1000, 1024, 4096, 8192)


def poison_outputs(*outputs):
    """NaN in blocks of the outputs' (shape, dtype) just freed, which the op's own outputs then reuse."""
    released = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in outputs]
    del released


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of the dtype's spacing at the larger magnitude of the two."""
    dtype = expected.dtype
    bits = torch.finfo(dtype).nmant + 1
    a, e = actual.float(), expected.float()
    _, exponent = torch.frexp(torch.maximum(a.abs(), e.abs()))
    spacing = torch.ldexp(torch.ones_like(e), exponent - bits).clamp(min=torch.finfo(dtype).smallest_normal *
                                                                      torch.finfo(dtype).eps)
    return (a - e).abs() / spacing


def assert_norm_close(actual, expected, unit_weight, what):
    """The sums of squares differ in order from torch's, so a value at a rounding boundary may round the other
    way: 1 ulp, or with a weight its product with the neighbouring value, < 2 ulps before rounding (2 after); and
    only rarely (a bug in where the kernel rounds would move a large share)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not expected.numel():
        return
    error = ulps(actual, expected)
    assert not error.isnan().any(), f"{what}: NaN where the reference has none"
    limit = 1 if unit_weight else 2
    assert error.max().item() <= limit, f"{what}: {error.max().item()} ulps, at most {limit} allowed"
    inexact = (error > 0).float().mean().item()
    assert inexact <= 1e-2, f"{what}: {inexact:.2%} of the elements differ from the reference"


def make_rows(rows, hidden, dtype, scale, g, pad=0):
    """[rows, hidden] with a different magnitude each row, as a view of a buffer `pad` elements wider."""
    row_scales = torch.rand(rows, 1, device="cuda", generator=g) * 4 + 0.25
    buffer = torch.randn(rows, hidden + pad, device="cuda", generator=g) * row_scales * scale
    return buffer.to(dtype)[:, :hidden]


def make_weight(hidden, dtype, unit, g):
    if unit:
        return torch.ones(hidden, dtype=dtype, device="cuda")
    return (torch.rand(hidden, device="cuda", generator=g) * 1.5 + 0.25).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, hidden, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * 10007 + hidden)
    for unit, scale, eps, pad in ((True, 1.0, 1e-6, 0), (False, 1e-3, 1e-5, 8), (False, 1e3, 0.1, 0)):
        x = make_rows(rows, hidden, dtype, scale, g, pad)
        weight = make_weight(hidden, dtype, unit, g)
        poison_outputs(((rows, hidden), dtype))
        out = torch.ops.minivllm.rms_norm(x, weight, eps)
        what = f"rms_norm {rows}x{hidden} {dtype} scale {scale} eps {eps}"
        assert_norm_close(out, reference.rms_norm(x, weight, eps), unit, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm(rows, hidden, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * 10009 + hidden)
    for unit, scale, eps, pad in ((True, 1.0, 1e-6, 0), (False, 1e-3, 1e-5, 0), (False, 1e3, 0.1, 8)):
        x = make_rows(rows, hidden, dtype, scale, g, pad)
        residual = make_rows(rows, hidden, torch.float32, scale, g, pad)
        weight = make_weight(hidden, dtype, unit, g)
        poison_outputs(((rows, hidden), dtype), ((rows, hidden), torch.float32))
        out, new_residual = torch.ops.minivllm.add_rms_norm(x, residual, weight, eps)
        expected, expected_residual = reference.add_rms_norm(x, residual, weight, eps)
        what = f"add_rms_norm {rows}x{hidden} {dtype} scale {scale} eps {eps}"
        assert new_residual.dtype == torch.float32 and torch.equal(new_residual, expected_residual), what
        assert_norm_close(out, expected, unit, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", (8, 1000, 3072, 8192))
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_eager_bit_for_bit(rows, inner, dtype):
    g = torch.Generator(device="cuda").manual_seed(rows * 10037 + inner)
    for scale, pad in ((1.0, 0), (8.0, 16), (1e-3, 0)):
        gate_up = make_rows(rows, 2 * inner, dtype, scale, g, pad)
        if rows:  # exp(-x) saturating to 0 and to inf
            gate_up[0, :4] = torch.tensor([100.0, -100.0, 88.0, -88.0], dtype=dtype)
        poison_outputs(((rows, inner), dtype))
        out = torch.ops.minivllm.silu_and_mul(gate_up)
        expected = reference.silu_and_mul(gate_up)
        assert out.shape == (rows, inner) and out.dtype == dtype
        mismatched = (out != expected).sum().item()
        assert mismatched == 0, f"silu_and_mul {rows}x{2 * inner} {dtype} scale {scale}: {mismatched} differ"


def chain(x, residual, w1, w2):
    """What a decoder layer's ops do to each other's outputs: norm, add + norm, activation."""
    normed = ops.rms_norm(x, w1, 1e-6)
    out, residual = ops.add_rms_norm(normed, residual, w2, 1e-6)
    return ops.silu_and_mul(out), residual


@pytest.mark.parametrize("rows", (1, 16, 300))
def test_chain_eager_and_graph_replay(rows):
    """The kernels one after another on the stream, eagerly and replayed with new inputs; each checked against the
    reference computed from the kernels' own previous output, so that roundings do not add up along the chain."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    hidden, dtype = 2048, torch.bfloat16
    w1, w2 = make_weight(hidden, dtype, False, g), make_weight(hidden, dtype, False, g)

    def inputs():
        return make_rows(rows, hidden, dtype, 1.0, g), make_rows(rows, hidden, torch.float32, 1.0, g)

    def check(x, residual, act, new_residual, what):
        normed = torch.ops.minivllm.rms_norm(x, w1, 1e-6)
        out, expected_residual = reference.add_rms_norm(normed, residual, w2, 1e-6)
        assert torch.equal(new_residual, expected_residual), what
        kernel_out, _ = torch.ops.minivllm.add_rms_norm(normed, residual, w2, 1e-6)
        assert_norm_close(kernel_out, out, False, what)
        assert torch.equal(act, reference.silu_and_mul(kernel_out)), what

    x, residual = inputs()
    act, new_residual = chain(x, residual, w1, w2)
    check(x, residual, act, new_residual, "eager")

    static_x, static_residual = inputs()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x, static_residual, w1, w2)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_act, static_new_residual = chain(static_x, static_residual, w1, w2)
    for replay in range(3):
        x, residual = inputs()
        static_x.copy_(x)
        static_residual.copy_(residual)
        static_act.fill_(float("nan"))
        static_new_residual.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(x, residual, static_act, static_new_residual, f"replay {replay}")


def test_wrappers_route_to_kernels_or_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, weight = make_rows(5, 1024, torch.bfloat16, 1.0, g), make_weight(1024, torch.bfloat16, False, g)
    residual = make_rows(5, 1024, torch.float32, 1.0, g)
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), torch.ops.minivllm.rms_norm(x, weight, 1e-6))
    for a, b in zip(ops.add_rms_norm(x, residual, weight, 1e-6),
                    torch.ops.minivllm.add_rms_norm(x, residual, weight, 1e-6)):
        assert torch.equal(a, b)
    # shapes the kernels refuse take the reference: a hidden size not of whole vectors, an fp32 input
    odd_x, odd_w = make_rows(5, 1001, torch.bfloat16, 1.0, g), make_weight(1001, torch.bfloat16, False, g)
    assert torch.equal(ops.rms_norm(odd_x, odd_w, 1e-6), reference.rms_norm(odd_x, odd_w, 1e-6))
    assert torch.equal(ops.rms_norm(residual, weight, 1e-6), reference.rms_norm(residual, weight, 1e-6))
    odd_gate_up = make_rows(5, 24, torch.bfloat16, 1.0, g)
    assert torch.equal(ops.silu_and_mul(odd_gate_up), reference.silu_and_mul(odd_gate_up))


def test_bad_input_is_refused():
    g = torch.Generator(device="cuda").manual_seed(0)
    x, w = make_rows(4, 64, torch.bfloat16, 1.0, g), make_weight(64, torch.bfloat16, False, g)
    residual = make_rows(4, 64, torch.float32, 1.0, g)
    norm, add_norm, act = torch.ops.minivllm.rms_norm, torch.ops.minivllm.add_rms_norm, torch.ops.minivllm.silu_and_mul
    cases = [
        (lambda: norm(x.float(), w.float(), 1e-6), "rms_norm: dtype Float is not supported"),
        (lambda: norm(x.half(), w, 1e-6), "x must be BFloat16, got Half"),
        (lambda: norm(x.cpu(), w, 1e-6), "x must be a CUDA tensor"),
        (lambda: norm(x[:, :60], w[:60], 1e-6), "last dimension must be a multiple of 8"),
        (lambda: norm(make_rows(64, 4, torch.bfloat16, 1.0, g).t(), w, 1e-6), "contiguous in its last dimension"),
        (lambda: norm(x[None], w, 1e-6), r"x must be \[num_rows, hidden\]"),
        (lambda: norm(x, w[:32], 1e-6), r"weight must be a contiguous, 16-byte aligned \[hidden\] = \[64\]"),
        (lambda: norm(torch.zeros(1, 16392, dtype=torch.bfloat16, device="cuda"),
                      torch.ones(16392, dtype=torch.bfloat16, device="cuda"), 1e-6), "hidden size 16392"),
        (lambda: norm(x, w, -1.0), "eps must be a finite number >= 0"),
        (lambda: add_norm(x, residual.bfloat16(), w, 1e-6), "residual must be Float, got BFloat16"),
        (lambda: add_norm(x, residual[:3], w, 1e-6), r"residual must have x's shape \[4, 64\]"),
        (lambda: act(x.float()), "silu_and_mul: dtype Float is not supported"),
        (lambda: act(make_rows(4, 24, torch.bfloat16, 1.0, g)), "intermediate size a multiple of 8"),
        (lambda: act(make_rows(4, 40, torch.bfloat16, 1.0, g)[:, 1:33]), "16-byte aligned"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
