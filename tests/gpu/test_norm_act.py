"""The norm and activation kernels (csrc/norm_act.cu) against the torch reference: rms_norm, add_rms_norm (the
residual updated in place, bit for bit) and silu_and_mul over random shapes, dtypes and padded rows; capture in
a CUDA graph; the ops' fallback for shapes the kernels do not take; the refusals of bad input."""

import random
import re

import pytest
import torch

from minivllm import ops
from minivllm.ops import KERNELS_BUILT, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

EPS = 1e-6
HALF = (torch.float16, torch.bfloat16)
# hidden sizes: one chunk, a partial warp, Qwen3-0.6B's 1024, not a multiple of 256, and past one pass of 1024 threads
SIZES = (8, 40, 1024, 1032, 4096, 12288)


def assert_rounded_like(actual, expected, what):
    """The kernel and the reference round to the dtype at the same points but sum in different orders, so an
    element may land one rounding away: within two ulps of the row's largest value, and almost all equal."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = expected.float().abs().amax(-1, keepdim=True).clamp(min=1e-3)
    ratio = ((actual.float() - expected.float()).abs() / (2 * torch.finfo(expected.dtype).eps * scale)).max().item()
    assert ratio <= 1.0, f"{what}: error {ratio:.2f}x the {expected.dtype} tolerance"
    equal = (actual == expected).float().mean().item()
    assert equal >= 0.98, f"{what}: only {equal:.3f} of the elements equal the reference's"


def rows(num_tokens, hidden, dtype, generator, pad=0):
    """[num_tokens, hidden] of dtype, a view of wider rows when pad > 0 (its tail NaN: never read)."""
    buffer = (torch.randn(num_tokens, hidden + pad, device="cuda", generator=generator) * 3).to(dtype)
    buffer[:, hidden:] = float("nan")
    return buffer[:, :hidden]


def norm_weight(hidden, dtype, generator):
    return (torch.rand(hidden, device="cuda", generator=generator) + 0.5).to(dtype)


@pytest.mark.parametrize("seed", range(12))
def test_rms_norm_matches_reference(seed):
    rng = random.Random(seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden, weight_dtype = rng.choice(SIZES), rng.choice(HALF)
    x_dtype = rng.choice((torch.float32, weight_dtype))
    x = rows(rng.choice((1, 3, 17, 256, 1000)), hidden, x_dtype, g, pad=rng.choice((0, 8, 24)))
    weight = norm_weight(hidden, weight_dtype, g)
    out = torch.ops.minivllm.rms_norm(x, weight, EPS)
    assert_rounded_like(out, reference.rms_norm(x, weight, EPS), f"rms_norm {tuple(x.shape)} {x_dtype}")


@pytest.mark.parametrize("seed", range(12))
def test_add_rms_norm_adds_in_place_and_normalises(seed):
    rng = random.Random(seed)
    g = torch.Generator(device="cuda").manual_seed(100 + seed)
    hidden, dtype = rng.choice(SIZES), rng.choice(HALF)
    num_tokens = rng.choice((1, 5, 64, 513))
    x = rows(num_tokens, hidden, dtype, g, pad=rng.choice((0, 16)))
    residual = torch.randn(num_tokens, hidden, device="cuda", generator=g) * 4
    weight = norm_weight(hidden, dtype, g)
    expected_out, expected_residual = reference.add_rms_norm(x, residual, weight, EPS)
    out = torch.ops.minivllm.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, expected_residual), "the new residual is residual + x.float(), exactly"
    assert_rounded_like(out, expected_out, f"add_rms_norm {tuple(x.shape)} {dtype}")


@pytest.mark.parametrize("seed", range(12))
def test_silu_and_mul_matches_reference(seed):
    rng = random.Random(seed)
    g = torch.Generator(device="cuda").manual_seed(200 + seed)
    intermediate, dtype = rng.choice((8, 24, 3072, 1000 * 8)), rng.choice(HALF)
    gate_up = rows(rng.choice((1, 7, 128, 2049)), 2 * intermediate, dtype, g, pad=rng.choice((0, 8)))
    out = torch.ops.minivllm.silu_and_mul(gate_up)
    assert_rounded_like(out, reference.silu_and_mul(*gate_up.chunk(2, dim=-1)), f"silu_and_mul {tuple(gate_up.shape)}")


def test_extremes_stay_finite_and_zero_rows_give_zeros():
    x = torch.tensor([[-80.0, -20.0, 0.0, 20.0, 80.0, 1e4, -1e4, 3.0] * 2], device="cuda", dtype=torch.bfloat16)
    out = torch.ops.minivllm.silu_and_mul(x)
    assert out.isfinite().all()
    assert_rounded_like(out, reference.silu_and_mul(*x.chunk(2, dim=-1)), "silu_and_mul at the extremes")
    weight = torch.ones(16, device="cuda", dtype=torch.bfloat16)
    zeros = torch.zeros(2, 16, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch.ops.minivllm.rms_norm(zeros, weight, EPS), zeros)


def test_graph_replay_equals_eager():
    g = torch.Generator(device="cuda").manual_seed(7)
    x, weight = rows(9, 1024, torch.bfloat16, g), norm_weight(1024, torch.bfloat16, g)
    residual = torch.randn(9, 1024, device="cuda", generator=g)
    gate_up = rows(9, 2 * 3072, torch.bfloat16, g)
    start = residual.clone()

    def step():
        normed = torch.ops.minivllm.add_rms_norm(x, residual, weight, EPS)
        return torch.ops.minivllm.rms_norm(residual, weight, EPS), normed, torch.ops.minivllm.silu_and_mul(gate_up)

    eager = step()
    residual.copy_(start)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    residual.copy_(start)
    graph.replay()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_ops_fall_back_where_the_kernels_do_not_fit():
    g = torch.Generator(device="cuda").manual_seed(3)
    x, weight = rows(4, 12, torch.bfloat16, g), norm_weight(12, torch.bfloat16, g)  # 12: not a multiple of 8
    assert torch.equal(ops.rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))
    strided = rows(4, 64, torch.bfloat16, g, pad=8)  # not contiguous: the op's view would fail, the reference runs
    residual = torch.randn(4, 64, device="cuda", generator=g)
    out, new_residual = ops.add_rms_norm(strided, residual, norm_weight(64, torch.bfloat16, g), EPS)
    assert new_residual is not residual and torch.equal(new_residual, residual + strided.float())
    gate_up = rows(3, 24, torch.float16, g)  # 12 per half: not whole chunks
    assert torch.equal(ops.silu_and_mul(gate_up), reference.silu_and_mul(*gate_up.chunk(2, dim=-1)))


def test_the_ops_on_the_gpu_add_in_place_and_keep_shapes():
    g = torch.Generator(device="cuda").manual_seed(4)
    x, weight = rows(6, 64, torch.bfloat16, g).view(2, 3, 64), norm_weight(64, torch.bfloat16, g)
    residual = torch.randn(2, 3, 64, device="cuda", generator=g)
    expected = reference.add_rms_norm(x, residual, weight, EPS)
    out, new_residual = ops.add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual and torch.equal(residual, expected[1]) and out.shape == (2, 3, 64)
    assert ops.silu_and_mul(rows(6, 32, torch.bfloat16, g).view(2, 3, 32)).shape == (2, 3, 16)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: torch.ops.minivllm.rms_norm(t(4, 12), t(12), EPS), "hidden a multiple of 8"),
        (lambda t: torch.ops.minivllm.rms_norm(t(4, 16), t(16, dtype=torch.float32), EPS), "weight dtype"),
        (lambda t: torch.ops.minivllm.rms_norm(t(4, 16), t(8), EPS), "weight must be a contiguous"),
        (lambda t: torch.ops.minivllm.rms_norm(t(4, 16), t(16), -1.0), "eps must be a finite number"),
        (lambda t: torch.ops.minivllm.rms_norm(t(4, 16, dtype=torch.int32), t(16), EPS), "x dtype"),
        (lambda t: torch.ops.minivllm.add_rms_norm(t(4, 16), t(4, 16), t(16), EPS), "residual must be a contiguous"),
        (lambda t: torch.ops.minivllm.add_rms_norm(t(4, 16), t(4, 8, dtype=torch.float32), t(16), EPS),
         "residual must be a contiguous"),
        (lambda t: torch.ops.minivllm.silu_and_mul(t(4, 24)), "must be a multiple of 16"),
    ],
)
def test_bad_input_is_refused(call, message):
    def t(*shape, dtype=torch.bfloat16):
        return torch.ones(shape, dtype=dtype, device="cuda")

    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(t)
