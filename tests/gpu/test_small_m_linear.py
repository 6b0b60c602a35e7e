"""The small-M linear kernel against a float64 torch reference: random M 1..16, N from 1 to the lm_head's
151936, K multiples of 8 up to 4096, with and without bias, fp32 or model-dtype output, weights that are
row-slices of wider matrices; the output allocation poisoned with NaN beforehand so an unwritten element
shows; capture in a CUDA graph, alone and as a dependent chain; the refusals of bad input; and the wrapper
`ops.linear` choosing the kernel only where it applies. Then the same for its fusions (RMSNorm prologue on fp32
or half x, residual epilogue, SiLU gate), their wrappers, and a bf16 model's decode on the fused path against the
unfused one."""

import gc
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from minivllm import ops
from minivllm.ops import KERNELS_BUILT, SMALL_M_FUSED_MAX_OUTPUTS, SMALL_M_MAX_OUTPUTS, SMALL_M_MAX_ROWS, reference

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
    assert_captured_chain_equals_eager(kernel, weights, x, g, smallest_peak=0.1)


def assert_captured_chain_equals_eager(link, weights, x, g, smallest_peak):
    """h = link(h, weight) for each weight, from x: captured in a CUDA graph and replayed on 3 new x, each replay
    bit-equal to the chain run eagerly with a synchronize after every call (the PDL oracle)."""

    def chain(h, sync):
        for weight in weights:
            h = link(h, weight)
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
        assert expected.abs().max().item() > smallest_peak, "the chain's values collapsed: the test would see nothing"
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


# ----- fusions -------------------------------------------------------------------------------------------------
def fused_kernel(x, weight, bias=None, fp32_out=False, norm_weight=None, eps=0.0, residual=None, silu_gate=False):
    return torch.ops.minivllm.small_m_linear(x, weight, bias, fp32_out, norm_weight, eps, residual, silu_gate)


def product_bounds(x, weight, bias, norm_weight, eps):
    """The kernel's product in float64 as csrc/small_m_linear.cu defines it (with the norm: x * gamma computed in
    fp32 and rounded to the weight's dtype, 1 / rms of the unrounded x applied to the sums, then bias), and its
    allowed error: fp32 accumulation in another order (as assert_close_to_reference), plus with the norm the
    fp32 sum of squares and rsqrt (at most K / 32 + 16 fp32 roundings relative to the product)."""
    k = x.shape[-1]
    a, scale = x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
    if norm_weight is not None:
        scale = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
        a = (x.float() * norm_weight.float()).to(weight.dtype).double()
    product = F.linear(a, weight.double()) * scale
    magnitude = F.linear(a.abs(), weight.double().abs()) * scale
    error = 8 * math.sqrt(k) * 2.0**-24 * magnitude
    if norm_weight is not None:
        error += (k / 32 + 16) * 2.0**-24 * magnitude
    if bias is not None:
        product, error = product + bias.double(), error + 2.0**-24 * bias.double().abs()
    return product, error


def fused_expected(x, weight, bias, norm_weight, eps, residual, silu_gate):
    """(expected, tolerance before the output's rounding) in float64. The SiLU gate propagates both halves' errors
    through silu(g) * u (|silu'| <= 1.1) and allows fp32 exp and division a few ulp."""
    product, error = product_bounds(x, weight, bias, norm_weight, eps)
    if silu_gate:
        (gate, up), (gate_error, up_error) = product.chunk(2, dim=-1), error.chunk(2, dim=-1)
        expected = F.silu(gate) * up
        return expected, (1.1 * up.abs() * gate_error + F.silu(gate).abs() * up_error + gate_error * up_error
                          + 2.0**-20 * expected.abs())
    if residual is not None:
        return product + residual.double(), error + 2.0**-24 * residual.double().abs()
    return product, error


def assert_fused_close(out, x, weight, bias=None, fp32_out=False, norm_weight=None, eps=0.0, residual=None,
                       silu_gate=False):
    expected, error = fused_expected(x, weight, bias, norm_weight, eps, residual, silu_gate)
    out_dtype = torch.float32 if fp32_out else weight.dtype
    assert out.dtype == out_dtype and out.shape == expected.shape
    assert torch.isfinite(out).all(), "an output element was not written (still NaN from the poisoned allocation)"
    tolerance = torch.finfo(out_dtype).eps * expected.abs() + error
    ratio = ((out.double() - expected).abs() / tolerance.clamp(min=1e-30)).max().item()
    assert ratio <= 1.0, f"error {ratio:.2f}x the tolerance (M {x.shape[0]}, N {weight.shape[0]}, K {x.shape[1]})"


FUSIONS = ["norm", "norm_fp32_x", "residual", "norm_residual", "silu", "norm_silu", "norm_fp32_x_silu"]


def fused_case(fusion, m, n, k, dtype, with_bias, fp32_out, pad_weight, pad_x, eps, seed):
    """Random operands of one fusion: rows of x scaled apart (a row's 1 / rms applied to another shows), norm
    weights of both signs, an fp32 residual of order 1. silu: n is I, the weight [2I, K]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    norm = fusion.startswith("norm")
    full_x = torch.randn(m, k + pad_x, device="cuda", generator=g) * torch.randn(m, 1, device="cuda", generator=g).exp()
    full_x[:, k:] = float("nan")
    x = full_x.to(torch.float32 if "fp32_x" in fusion else dtype)[:, :k]
    rows = 2 * n if "silu" in fusion else n
    weight = row_slice(rows, k, pad_weight, dtype, g, scale=k**-0.5)
    args = dict(
        bias=torch.randn(rows, device="cuda", generator=g).to(dtype) if with_bias else None,
        fp32_out=(fp32_out or "residual" in fusion) and "silu" not in fusion,
        norm_weight=(torch.randn(k, device="cuda", generator=g) * 0.5 + 1).to(dtype) if norm else None,
        eps=eps if norm else 0.0,
        residual=torch.randn(m, n, device="cuda", generator=g) if "residual" in fusion else None,
        silu_gate="silu" in fusion,
    )
    return x, weight, args


def check_fused_case(fusion, m, n, k, dtype, with_bias=False, fp32_out=False, pad_weight=0, pad_x=0, eps=1e-6,
                     seed=0):
    x, weight, args = fused_case(fusion, m, n, k, dtype, with_bias, fp32_out, pad_weight, pad_x, eps, seed)
    poison_next_allocation((m, n), torch.float32 if args["fp32_out"] else dtype)
    out = fused_kernel(x, weight, **args)
    assert_fused_close(out, x, weight, **args)


EDGE_I = [1, 3, 4, 5, 7, 8, 9, 1023, 3072]  # silu outputs: a CTA takes 4


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("seed", range(30))
def test_fused_random_cases_match_reference(fusion, seed):
    rng = random.Random(1000 + seed)
    edges = EDGE_I if "silu" in fusion else EDGE_N
    if seed < 18:  # every edge M, N (I) and K at least once
        m, n, k = EDGE_M[seed % len(EDGE_M)], edges[seed % len(edges)], EDGE_K[seed % len(EDGE_K)]
    else:
        max_n = 3100 if "silu" in fusion else 5000  # silu: n is I, up to 6200 weight rows
        m, n, k = rng.randint(1, SMALL_M_MAX_ROWS), rng.randint(1, max_n), 8 * rng.randint(1, 512)
    check_fused_case(
        fusion, m, n, k, dtype=rng.choice(DTYPES), with_bias=rng.random() < 0.5, fp32_out=rng.random() < 0.5,
        pad_weight=rng.choice([0, 0, 8, 64]), pad_x=rng.choice([0, 0, 8]), eps=rng.choice([1e-6, 0.5]), seed=seed,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 8, 9, 16])
@pytest.mark.parametrize("fusion, n, k", [
    ("norm_fp32_x", 4096, 1024),  # qkv
    ("residual", 1024, 2048),  # o
    ("norm_fp32_x_silu", 3072, 1024),  # gate_up: I = 3072, 6144 weight rows
    ("residual", 1024, 3072),  # down
])
def test_fused_qwen3_shapes(fusion, n, k, m, dtype):
    """Qwen3-0.6B's products as the decoder fuses them, at the decode graphs' batch sizes."""
    check_fused_case(fusion, m, n, k, dtype, seed=n + k + m)


def test_norm_uses_eps_and_each_rows_own_rms():
    """Rows of zeros but for one element x5 (1, 4, 16), picked out by every weight row: out = x5 / sqrt(x5^2 / K +
    eps), sqrt(K) for each row with eps = 0 (another row's rms would scale it by 4 or 16), less with eps."""
    k = 256
    x5 = torch.tensor([1.0, 4.0, 16.0], device="cuda")
    x = torch.zeros(3, k, device="cuda")
    x[:, 5] = x5
    weight = torch.zeros(8, k, device="cuda", dtype=torch.bfloat16)
    weight[:, 5] = 1
    gamma = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    for eps in (0.0, 3.0 / k):
        out = fused_kernel(x, weight, None, True, gamma, eps)
        expected = (x5 / torch.sqrt(x5**2 / k + eps)).unsqueeze(1).expand(3, 8)
        assert torch.allclose(out, expected, rtol=1e-5), (eps, out[:, 0], expected[:, 0])


@pytest.mark.parametrize("fusion", ["norm_fp32_x", "residual", "norm_silu"])
def test_fused_cuda_graph_replay_follows_new_inputs(fusion):
    x, weight, args = fused_case(fusion, 5, 1000, 1024, torch.bfloat16, True, False, 0, 0, 1e-6, seed=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_kernel(x, weight, **args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_kernel(x, weight, **args)
    for t in (x, weight, args["norm_weight"], args["residual"]):
        if t is not None:
            t.copy_(torch.randn_like(t, dtype=torch.float32))
    graph.replay()
    torch.cuda.synchronize()
    assert_fused_close(out, x, weight, **args)


@pytest.mark.parametrize("fusion", ["norm", "norm_fp32_x", "residual", "norm_silu"])
def test_fused_cuda_graph_of_a_dependent_chain(fusion):
    """As test_cuda_graph_of_a_dependent_chain, each call reading the one before's output as the activation it
    fuses (x of the norm and SiLU paths, the residual): all of them must be read after the PDL wait. (The SiLU
    chain has the norm too: without it the values would shrink to nothing in 16 links.)"""
    g = torch.Generator(device="cuda").manual_seed(11)
    k, m = 1024, 3
    rows = 2 * k if fusion == "norm_silu" else k
    weights = [(torch.randn(rows, k, device="cuda", generator=g) * k**-0.5).bfloat16() for _ in range(16)]
    gamma = (torch.randn(k, device="cuda", generator=g) * 0.5 + 1).bfloat16()
    x0 = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    start = torch.randn(m, k, device="cuda", generator=g)
    if fusion in ("norm", "norm_silu"):
        start = start.bfloat16()

    def link(h, weight):
        if fusion == "residual":
            return fused_kernel(x0, weight, None, True, residual=h)
        return fused_kernel(h, weight, None, fusion == "norm_fp32_x", gamma, 1e-6, silu_gate=fusion == "norm_silu")

    assert_captured_chain_equals_eager(link, weights, start, g, smallest_peak=0.01)


FUSED_BAD_INPUTS = [
    (lambda: (cuda(2, 64, dtype=torch.float32), cuda(8, 64), {}), "dtype Float is not supported"),
    (lambda: (cuda(2, 64, dtype=torch.float32), cuda(8, 64, dtype=torch.float32),
              {"norm_weight": cuda(64, dtype=torch.float32)}), "dtype Float is not supported"),
    (lambda: (cuda(2, 64, dtype=torch.float32), cuda(8, 64),
              {"norm_weight": cuda(64), "bias": cuda(8, dtype=torch.float32)}),
     "bias must have the weight's dtype Half, got Float"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"norm_weight": cuda(64, dtype=torch.float32)}),
     "norm_weight must have the weight's dtype Half, got Float"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"norm_weight": cuda(32)}),
     "norm_weight must be a contiguous, 16-byte aligned [K] = [64] tensor, got shape [32]"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"norm_weight": cuda(128)[::2]}), "got shape [64] and strides [2]"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"norm_weight": cuda(65)[1:]}), "norm_weight must be a contiguous, 16-byte"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"norm_weight": cuda(64), "eps": -1.0}), "eps must be finite and >= 0"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"residual": cuda(2, 8, dtype=torch.float32)}),
     "a residual needs fp32_out=True"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"fp32_out": True, "residual": cuda(2, 8)}),
     "residual must have the fp32 output's dtype Float, got Half"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"fp32_out": True, "residual": cuda(2, 9, dtype=torch.float32)}),
     "residual must be a contiguous [M, N] = [2, 8] tensor, got shape [2, 9]"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"fp32_out": True, "residual": cuda(8, 2, dtype=torch.float32).t()}),
     "residual must be a contiguous [M, N] = [2, 8] tensor"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"fp32_out": True, "residual": torch.randn(2, 8)}),
     "residual must be a CUDA tensor on x's device"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"silu_gate": True, "fp32_out": True}), "pass fp32_out=False"),
    (lambda: (cuda(2, 64), cuda(9, 64), {"silu_gate": True}), "an even number of rows, got 9"),
    (lambda: (cuda(2, 64), cuda(8, 64), {"silu_gate": True, "residual": cuda(2, 4, dtype=torch.float32)}),
     "silu_gate and a residual cannot be combined"),
]


@pytest.mark.parametrize("make_args, message", FUSED_BAD_INPUTS)
def test_fused_bad_inputs_are_refused(make_args, message):
    x, weight, kwargs = make_args()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        fused_kernel(x, weight, **kwargs)


def wrapper_operands(m, n, k, silu=False):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    residual = torch.randn(m, k, device="cuda", generator=g)
    weight = (torch.randn(2 * n if silu else n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    bias = torch.randn(weight.shape[0], device="cuda", generator=g).bfloat16()
    gamma = (torch.randn(k, device="cuda", generator=g) * 0.5 + 1).bfloat16()
    return residual, weight, bias, gamma


@pytest.mark.parametrize("m, n, runs_kernel", [
    (1, 1024, True), (16, 4096, True), (SMALL_M_MAX_ROWS + 1, 1024, False), (4, SMALL_M_FUSED_MAX_OUTPUTS + 8, False),
])
def test_norm_linear_wrapper(kernel_calls, m, n, runs_kernel):
    residual, weight, bias, gamma = wrapper_operands(m, n, 256)
    out = ops.norm_linear(residual, gamma, 1e-6, weight, bias)
    assert kernel_calls == ([(m, 256)] if runs_kernel else [])
    expected = reference.norm_linear(residual, gamma, 1e-6, weight, bias)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    if runs_kernel:
        assert_fused_close(out, residual, weight, bias, False, gamma, 1e-6)


@pytest.mark.parametrize("m, i, runs_kernel", [
    (1, 3072, True),  # gate_up's 6144 rows: above SMALL_M_MAX_OUTPUTS, the fusion still runs the kernel
    (8, 100, True), (SMALL_M_MAX_ROWS + 1, 512, False), (2, SMALL_M_FUSED_MAX_OUTPUTS // 2 + 4, False),
])
def test_norm_gate_up_silu_wrapper(kernel_calls, m, i, runs_kernel):
    residual, weight, bias, gamma = wrapper_operands(m, i, 256, silu=True)
    out = ops.norm_gate_up_silu(residual, gamma, 1e-6, weight, bias)
    assert kernel_calls == ([(m, 256)] if runs_kernel else [])
    expected = reference.norm_gate_up_silu(residual, gamma, 1e-6, weight, bias)
    assert out.shape == (m, i) and torch.allclose(out.float(), expected.float(), rtol=3e-2, atol=3e-2)
    if runs_kernel:
        assert_fused_close(out, residual, weight, bias, False, gamma, 1e-6, silu_gate=True)


@pytest.mark.parametrize("m, runs_kernel", [(1, True), (16, True), (SMALL_M_MAX_ROWS + 1, False)])
def test_linear_add_residual_wrapper(kernel_calls, m, runs_kernel):
    _, weight, bias, _ = wrapper_operands(m, 256, 512)
    x, residual = cuda(m, 512, dtype=torch.bfloat16), torch.randn(m, 256, device="cuda")
    out = ops.linear_add_residual(x, weight, residual, bias)
    assert kernel_calls == ([(m, 512)] if runs_kernel else [])
    expected = reference.linear_add_residual(x, weight, residual, bias)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, rtol=2e-2, atol=2e-2)
    if runs_kernel:
        assert_fused_close(out, x, weight, bias, True, residual=residual)


def test_linear_add_residual_wrapper_falls_back_for_a_strided_residual(kernel_calls):
    residual, weight, bias, _ = wrapper_operands(2, 256, 512)
    x = cuda(2, 512, dtype=torch.bfloat16)
    strided = torch.randn(256, 2, device="cuda").t()
    out = ops.linear_add_residual(x, weight, strided, bias)
    assert kernel_calls == []
    assert torch.equal(out, reference.linear_add_residual(x, weight, strided, bias))


# ----- the model on the fused path -----------------------------------------------------------------------------
MODEL_FAMILIES = {
    "qwen3": {"head_dim": 128},
    "qwen2": {"head_dim": 64},  # q/k/v bias
    "llama": {"head_dim": 64, "attention_bias": True, "mlp_bias": True},  # every bias
}


@pytest.fixture(scope="module", params=sorted(MODEL_FAMILIES))
def model_checkpoint(request, tmp_path_factory):
    from tests.conftest import build_hf_model

    # initializer_range 0.1 (test_engine_gpu's): logits less flat than the default 0.02's, so fewer near-ties
    model = build_hf_model(request.param, seed=5, vocab_size=1024, hidden_size=256, intermediate_size=512,
                           max_position_embeddings=1024, initializer_range=0.1, **MODEL_FAMILIES[request.param])
    path = tmp_path_factory.mktemp(f"fused_{request.param}")
    model.save_pretrained(path)
    return str(path), model.cuda()


def run_engine(path, batch, max_tokens, fused, monkeypatch, **kwargs):
    """Greedy tokens and every step's logits of a bf16 engine with the fused path on, or forced off."""
    from minivllm import LLM, SamplingParams
    from minivllm.models.decoder import DecoderModel
    from tests.conftest import recorded_logits

    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(DecoderModel, "runs_fused", lambda self, x: False)
        llm = LLM(path, dtype="bfloat16", num_kv_blocks=256, **kwargs)
        with recorded_logits() as seen:
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
            outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, [logits.float() for logits in seen]


def prompt(length, seed):
    return torch.randint(0, 1024, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def relative_error(ours, exact):
    return ((ours - exact).norm() / exact.norm()).item()


def hf_greedy(hf, prompt_ids: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF fp32's greedy choice at each of the engine's steps, fed the engine's own context (teacher forcing, as
    test_engine_gpu: one near-tie of these random models must not turn every later token into a disagreement),
    and its logits there."""
    context = torch.tensor([prompt_ids + tokens[:-1]], device="cuda")
    with torch.inference_mode():
        logits = hf(context).logits[0, len(prompt_ids) - 1:].float()
    return logits.argmax(-1).tolist(), logits


def hf_agreement(hf, batch: list[list[int]], tokens: list[list[int]]) -> int:
    """How many of the engine's greedy tokens HF fp32 picks too, fed the same context."""
    return sum(sum(a == b for a, b in zip(t, hf_greedy(hf, p, t)[0])) for p, t in zip(batch, tokens))


def test_fused_decode_matches_unfused_within_bf16(model_checkpoint, monkeypatch):
    """Batch 1 (the issue's case), a 40-token prompt (its prefill unfused: > 16 tokens), 11 greedy decode steps in
    CUDA graphs. Up to the first step where the paths choose differently (they share the context until then), the
    fused logits are as close to the fp32 HF model as the unfused ones (1.5x + 1e-3, the bar test_engine_gpu sets
    our bf16 against HF's own bf16); at every step the fused path's token is HF fp32's on the same context, but
    for at most one near-tie, and it agrees with HF no less often than the unfused path (one near-tie of slack)."""
    path, hf = model_checkpoint
    batch = [prompt(40, 0)]
    fused_tokens, fused_logits = run_engine(path, batch, [12], True, monkeypatch)
    unfused_tokens, unfused_logits = run_engine(path, batch, [12], False, monkeypatch)
    exact_tokens, exact = hf_greedy(hf, batch[0], fused_tokens[0])  # the prefill's last position, then each decode
    assert len(fused_logits) == len(unfused_logits) == len(exact) == 12
    pairs = list(zip(fused_tokens[0], unfused_tokens[0]))
    shared = next((step for step, (a, b) in enumerate(pairs) if a != b), len(pairs) - 1)
    for step in range(shared + 1):
        ours, theirs = fused_logits[step][0], unfused_logits[step][0]
        fused_error, unfused_error = relative_error(ours, exact[step]), relative_error(theirs, exact[step])
        assert fused_error < 1.5 * unfused_error + 1e-3, f"step {step}: {fused_error:.3g} against {unfused_error:.3g}"
    fused_agree = sum(a == b for a, b in zip(fused_tokens[0], exact_tokens))
    unfused_agree = hf_agreement(hf, batch, unfused_tokens)
    print(f"teacher-forced agreement with HF fp32 of 12: fused {fused_agree}, unfused {unfused_agree}")
    assert fused_agree >= 11 and fused_agree >= unfused_agree - 1


def test_fused_batches_keep_greedy_tokens(model_checkpoint, monkeypatch):
    """Nine sequences finishing one after another, so that decode batches shrink through the graph sizes 16, 8, 4,
    2, 1, in graphs and eagerly, and a lone 9-token prompt whose prefill is fused too: HF fp32 fed each run's own
    context picks the same next token as often as for the unfused path's tokens, but for four near-ties (one for
    the lone prompt's 8), and for at least 85% of them (a broken path agrees by chance only). These short random
    prompts leave near-ties: the unfused path itself agreed on 84 and 85 of 90 (run 4 of the sixth session), and on
    88 for qwen2 once our own norm kernels replaced the Triton ones in both runs' prefill (run 3 of the seventh;
    the fused path's 85 unchanged). So the bar against it allows four: the spread of its own near-ties."""
    path, hf = model_checkpoint
    batch, max_tokens = [prompt(n, n) for n in (1, 3, 8, 16, 5, 2, 11, 16, 9)], [2 + 2 * i for i in range(9)]
    lone = [prompt(9, 1)]
    reference = hf_agreement(hf, batch, run_engine(path, batch, max_tokens, False, monkeypatch, max_num_seqs=16)[0])
    lone_reference = hf_agreement(hf, lone, run_engine(path, lone, [8], False, monkeypatch)[0])
    for eager in (False, True):
        tokens, _ = run_engine(path, batch, max_tokens, True, monkeypatch, max_num_seqs=16, enforce_eager=eager)
        assert [len(t) for t in tokens] == max_tokens
        agree = hf_agreement(hf, batch, tokens)
        print(f"eager={eager}: agreement with HF fp32 {agree} of {sum(max_tokens)}, unfused {reference}")
        assert agree >= 0.85 * sum(max_tokens) and agree >= reference - 4
    lone_agree = hf_agreement(hf, lone, run_engine(path, lone, [8], True, monkeypatch)[0])
    assert lone_agree >= 6 and lone_agree >= lone_reference - 1
