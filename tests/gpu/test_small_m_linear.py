"""The small-M linear kernel against a float64 torch reference: random M 1..16, N from 1 to the lm_head's
151936, K multiples of 8 up to 4096, with and without bias, fp32 or model-dtype output, weights that are
row-slices of wider matrices; the output allocation poisoned with NaN beforehand so an unwritten element
shows; capture in a CUDA graph, alone and as a dependent chain; the refusals of bad input; and the wrapper
`ops.linear` choosing the kernel only where it applies."""

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from minivllm import ops
from minivllm.ops import KERNELS_BUILT, SMALL_M_MAX_OUTPUTS, SMALL_M_MAX_ROWS

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C kernels"
)

DTYPES = [torch.float16, torch.bfloat16]


def kernel(x, weight, bias=None, fp32_out=False):
    return torch.ops.minivllm.small_m_linear(x, weight, bias, fp32_out)


def poison_next_allocation(shape, dtype):
    """Leave a NaN-filled block of this size free in torch's caching allocator. Freed, it merges back to where
    it came from, so the allocator is as before and the next allocation of this size (the kernel's output) gets
    the same block: an element the kernel does not write stays NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def test_poisoning_reaches_the_next_allocation():
    poison_next_allocation((5, 77), torch.float32)
    assert torch.empty(5, 77, device="cuda").isnan().all()


def assert_close_to_reference(out, x, weight, bias, fp32_out):
    """Within the two errors the kernel is allowed: rounding the result to the output dtype (at most half an
    ulp; a whole eps * |ref| is allowed), and fp32 accumulation in another order than the float64 reference,
    which for random signs grows like sqrt(K) * 2^-24 * sum_k |x_k w_k| (8x margin, since tensor-core
    accumulation need not round to nearest). A dropped or doubled chunk of 8 products (about sqrt(8 / K) with
    these weights) exceeds it several times over."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())
    out_dtype = torch.float32 if fp32_out else x.dtype
    assert out.dtype == out_dtype and out.shape == expected.shape
    assert torch.isfinite(out).all(), "an output element was not written (still NaN from the poisoned allocation)"
    k = x.shape[-1]
    tolerance = torch.finfo(out_dtype).eps * expected.abs() + 8 * math.sqrt(k) * 2.0**-24 * magnitude
    ratio = ((out.double() - expected).abs() / tolerance.clamp(min=1e-30)).max().item()
    assert ratio <= 1.0, f"error {ratio:.2f}x the tolerance (M {x.shape[0]}, N {weight.shape[0]}, K {k})"


def row_slice(rows, cols, pad, dtype, g, scale=1.0):
    """[rows, cols] as a view of a [rows, cols + pad] matrix whose pad columns are NaN (a read past K shows);
    pad = 0: contiguous."""
    full = (torch.randn(rows, cols + pad, device="cuda", generator=g) * scale).to(dtype)
    full[:, cols:] = float("nan")
    return full[:, :cols]


def check_case(m, n, k, dtype, with_bias, fp32_out, pad_weight, pad_x, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = row_slice(m, k, pad_x, dtype, g)
    weight = row_slice(n, k, pad_weight, dtype, g, scale=k**-0.5)  # outputs of order 1, as in a model
    bias = torch.randn(n, device="cuda", generator=g).to(dtype) if with_bias else None
    poison_next_allocation((m, n), torch.float32 if fp32_out else dtype)
    out = kernel(x, weight, bias, fp32_out)
    assert_close_to_reference(out, x, weight, bias, fp32_out)


EDGE_M = [1, 2, 7, 8, 9, 15, 16]
EDGE_N = [1, 7, 8, 9, 1023, 4097]
EDGE_K = [8, 16, 24, 32, 40, 1000, 1024, 3072, 4096]


@pytest.mark.parametrize("seed", range(120))
def test_random_cases_match_reference(seed):
    rng = random.Random(seed)
    if seed < 42:  # every edge M, N and K at least once
        m, n, k = EDGE_M[seed % len(EDGE_M)], EDGE_N[seed % len(EDGE_N)], EDGE_K[seed % len(EDGE_K)]
    else:
        m, n, k = rng.randint(1, SMALL_M_MAX_ROWS), rng.randint(1, 5000), 8 * rng.randint(1, 512)
    check_case(
        m, n, k, dtype=rng.choice(DTYPES), with_bias=rng.random() < 0.5, fp32_out=rng.random() < 0.5,
        pad_weight=rng.choice([0, 0, 8, 64]), pad_x=rng.choice([0, 0, 8]), seed=seed,
    )


@pytest.mark.parametrize("n, k", [(151936, 1024), (151937, 64), (100003, 8)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_vocab_sized_outputs(m, n, k):
    """The lm_head: fp32 logits over a ~152k vocabulary (and odd sizes whose last CTA is partly empty)."""
    check_case(m, n, k, torch.bfloat16, with_bias=False, fp32_out=True, pad_weight=0, pad_x=0, seed=m * n + k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
def test_qwen3_shapes(n, k, m, dtype):
    """Qwen3-0.6B's qkv, o, gate_up and down projections at the decode graphs' batch sizes."""
    check_case(m, n, k, dtype, with_bias=False, fp32_out=False, pad_weight=0, pad_x=0, seed=n + k + m)


def test_empty_weight_gives_empty_output():
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
    out = kernel(x, torch.empty(0, 64, device="cuda", dtype=torch.float16))
    assert out.shape == (3, 0)


def test_cuda_graph_replay_follows_new_inputs():
    """Captured once, replayed with other data at the same addresses: the launch must not depend on data."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 1024, device="cuda", generator=g).bfloat16()
    weight = torch.randn(3000, 1024, device="cuda", generator=g).bfloat16()
    bias = torch.randn(3000, device="cuda", generator=g).bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel(x, weight, bias, True)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x, weight, bias, True)
    x.copy_(torch.randn(x.shape, device="cuda", generator=g))
    weight.copy_(torch.randn(weight.shape, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, x, weight, bias, True)


@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_of_a_dependent_chain(m):
    """A captured chain of 16 products, each x the output of the one before: with programmatic dependent launch a
    kernel starts while the one before it still runs, so one reading x before its wait (common/pdl.cuh) would
    read the previous replay's values, which a new input at every replay makes wrong. The oracle is the same
    chain run eagerly with a synchronize after each call: bit-equal."""
    g = torch.Generator(device="cuda").manual_seed(m)
    k = 1024
    weights = [(torch.randn(k, k, device="cuda", generator=g) * k**-0.5).bfloat16() for _ in range(16)]
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()

    def chain(h, sync):
        for weight in weights:
            h = kernel(h, weight)
            if sync:
                torch.cuda.synchronize()
        return h

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(x, sync=False)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x, sync=False)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        graph.replay()
        expected = chain(x, sync=True)
        assert expected.abs().max().item() > 0.1, "the chain's values collapsed: the test would see nothing"
        assert torch.equal(out, expected)


def cuda(*shape, dtype=torch.float16):
    return torch.randn(*shape, device="cuda").to(dtype)


def misaligned(rows, cols):
    """[rows, cols] fp16 starting 2 bytes past a 16-byte boundary."""
    return cuda(rows * cols + 1)[1:].view(rows, cols)


BAD_INPUTS = [
    (lambda: (cuda(2, 64, dtype=torch.float32), cuda(8, 64, dtype=torch.float32)), "dtype Float is not supported"),
    (lambda: (cuda(2, 64), cuda(8, 64, dtype=torch.bfloat16)), "weight must have x's dtype Half, got BFloat16"),
    (lambda: (cuda(2, 64), cuda(8, 72)), "weight must be [N, K=64] to match x, got shape [8, 72]"),
    (lambda: (cuda(17, 64), cuda(8, 64)), "x has 17 rows; the kernel supports 1 to 16"),
    (lambda: (cuda(0, 64), cuda(8, 64)), "x has 0 rows; the kernel supports 1 to 16"),
    (lambda: (cuda(2, 12), cuda(8, 12)), "K = 12 is not supported; it must be a positive multiple of 8"),
    (lambda: (cuda(2, 128)[:, ::2], cuda(8, 64)), "x must be contiguous in its last dimension"),
    (lambda: (cuda(2, 64), cuda(64, 8).t()), "weight must be contiguous in its last dimension"),
    (lambda: (cuda(2, 64), cuda(8, 68)[:, :64]), "row stride that is a multiple of 8 elements, got strides [68, 1]"),
    (lambda: (misaligned(2, 64), cuda(8, 64)), "x must be contiguous in its last dimension, 16-byte aligned"),
    (lambda: (cuda(2, 3, 64), cuda(8, 64)), "x must be [M, K] and weight [N, K], got shapes [2, 3, 64] and [8, 64]"),
    (lambda: (torch.randn(2, 64).half(), cuda(8, 64)), "x must be a CUDA tensor, got cpu"),
    (lambda: (cuda(2, 64), torch.randn(8, 64).half()), "weight must be a CUDA tensor on x's device"),
    (lambda: (cuda(2, 64), cuda(8, 64), cuda(9)), "bias must be a contiguous [N] = [8] tensor, got shape [9]"),
    (lambda: (cuda(2, 64), cuda(8, 64), cuda(16)[::2]), "bias must be a contiguous [N] = [8] tensor"),
    (lambda: (cuda(2, 64), cuda(8, 64), cuda(8, dtype=torch.float32)), "bias must have x's dtype Half, got Float"),
    (lambda: (torch.randn(2, 64).half(), torch.randn(8, 64).half()), "'CPU' backend"),
]


@pytest.mark.parametrize("make_args, message", BAD_INPUTS)
def test_bad_inputs_are_refused(make_args, message):
    args = make_args()  # built inside the test: collection must not touch CUDA
    x, weight, bias = (*args, None)[:3]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        kernel(x, weight, bias)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the wrapper's calls into the kernel."""
    calls = []
    op = torch.ops.minivllm.small_m_linear

    def counted(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(torch.ops.minivllm, "small_m_linear", counted)
    return calls


@pytest.mark.parametrize("fp32_out", [False, True])
def test_wrapper_runs_the_kernel_for_small_m(kernel_calls, fp32_out):
    x = cuda(2, 3, 256, dtype=torch.bfloat16)  # leading dims flatten to M = 6
    weight, bias = cuda(40, 256, dtype=torch.bfloat16), cuda(40, dtype=torch.bfloat16)
    out = ops.linear(x, weight, bias, fp32_out=fp32_out)
    assert kernel_calls == [(6, 256)]
    assert out.shape == (2, 3, 40)
    assert_close_to_reference(out.flatten(0, 1), x.flatten(0, 1), weight, bias, fp32_out)


@pytest.mark.parametrize("fp32_out", [False, True])
def test_wrapper_falls_back_beyond_the_kernel(kernel_calls, fp32_out):
    """M > 16, K not a multiple of 8, an unaligned x, fp32 tensors and the CPU go to torch, with the same
    result types."""
    w = cuda(40, 256, dtype=torch.bfloat16)
    b = cuda(40, dtype=torch.bfloat16)
    cases = [
        (cuda(SMALL_M_MAX_ROWS + 1, 256, dtype=torch.bfloat16), w, b),
        (cuda(3, 252, dtype=torch.bfloat16), cuda(40, 252, dtype=torch.bfloat16), None),
        (cuda(3 * 256 + 1, dtype=torch.bfloat16)[1:].view(3, 256), w, b),
        (cuda(3, 256, dtype=torch.float32), w.float(), b.float()),
        (cuda(3, 256, dtype=torch.bfloat16).cpu(), w.cpu(), b.cpu()),
    ]
    for x, weight, bias in cases:
        out = ops.linear(x, weight, bias, fp32_out=fp32_out)
        assert out.device == x.device and out.shape == (x.shape[0], 40)
        assert out.dtype == (torch.float32 if fp32_out else x.dtype)
        expected = F.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
        assert torch.allclose(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert kernel_calls == []


@pytest.mark.parametrize("n, runs_kernel", [(SMALL_M_MAX_OUTPUTS, True), (SMALL_M_MAX_OUTPUTS + 8, False)])
def test_wrapper_leaves_wide_products_to_cublas(kernel_calls, n, runs_kernel):
    """Beyond SMALL_M_MAX_OUTPUTS (the lm_head, gate_up) cuBLAS streams the weights faster."""
    x, weight = cuda(2, 256, dtype=torch.bfloat16), cuda(n, 256, dtype=torch.bfloat16)
    out = ops.linear(x, weight, fp32_out=True)
    assert kernel_calls == ([(2, 256)] if runs_kernel else [])
    assert_close_to_reference(out, x, weight, None, True)
