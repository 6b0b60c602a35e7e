"""The naive CUDA prefill kernel against the fp32 torch reference over random packed causal batches.

Run on a GPU after building the extension (scripts/gpu_build.sh); skipped otherwise.
"""

import random

import pytest
import torch

from minivllm import ops
from minivllm.ops import reference
from tests.gpu.test_flash_prefill import case_fields, cu_seqlens
from tests.gpu.test_flash_prefill import make_inputs as flash_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C"
)

# ||out - ref|| / ||ref|| per sequence, and max |out - ref| / max |ref| over the batch: the flash test's bounds.
# This kernel keeps P in fp32, so only the output's rounding to the storage type should show.
TOLERANCE = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3)}
EDGE_LENGTHS = (1, 15, 16, 17, 64, 255, 256, 257, 1024)
NUM_CASES = 40
MAX_TOKENS = 4096  # queries per case, to keep the scratch and the file small

worst = {}  # (dtype, head_dim) -> largest relative error norm seen, printed at the end


def random_length(rng: random.Random, limit: int) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice([n for n in EDGE_LENGTHS if n <= limit] or [1])
    return rng.randint(1, limit)


def random_case(case: int) -> dict:
    rng = random.Random(case)
    group = rng.choice((1, 2, 4, 8))
    num_kv_heads = rng.choice((1, 2, 3))
    batch = rng.choice((1, 1, 2, 3, 5, 8, 16))
    budget = min(1024, MAX_TOKENS // batch)
    lens_q = [random_length(rng, budget) for _ in range(batch)]
    with_prefix = rng.random() < 0.4  # q_len < k_len: queries after a cached prefix, bottom-right causal
    lens_k = [lq + (random_length(rng, 1024) if with_prefix else 0) for lq in lens_q]
    return dict(
        **case_fields(rng, group, num_kv_heads, lens_q, lens_k),
        q_scale=rng.choice((1.0, 1.0, 4.0)),  # 4: peaked softmax, large logits
        seed=case,
    )


def make_inputs(c: dict):
    """Packed q, k, v of a case, as the flash kernel's tests make them."""
    return flash_inputs({**c, "block_size": None})[:3]


def run_poisoned(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """The op allocates its output, then its score scratch: free NaN-filled blocks of those sizes first, so the
    caching allocator hands them back and an output element the kernel fails to write, or a score it reads
    before writing, shows up as NaN instead of stale memory."""
    poison = [torch.full_like(q, float("nan")), torch.full((*q.shape[:2], max_k), float("nan"), device="cuda")]
    del poison  # both blocks free at once, so neither allocation is carved out of the other's block
    return ops.naive_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def check_against_reference(q, k, v, lens_q, lens_k, dtype, key=None):
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), q.shape[-1] ** -0.5)
    out = run_poisoned(q, k, v, *args)
    ref = reference.flash_attn_varlen(q.float(), k.float(), v.float(), *args, True)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    assert torch.equal(out, run_poisoned(q, k, v, *args)), "a second launch differs (a race?)"
    norm_tol, max_tol = TOLERANCE[dtype]
    err = out.float() - ref
    starts = cu_q.tolist()
    seq_errors = [(err[a:b].norm() / ref[a:b].norm().clamp_min(1e-6)).item() for a, b in zip(starts[:-1], starts[1:])]
    if key is not None:
        worst[key] = max(worst.get(key, 0.0), *seq_errors)
    assert max(seq_errors) < norm_tol, f"relative error {max(seq_errors):.2e} > {norm_tol}"
    max_err = (err.abs().max() / ref.abs().max()).item()
    assert max_err < max_tol, f"max error {max_err:.2e} > {max_tol}"


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_matches_reference(case):
    c = random_case(case)
    q, k, v = make_inputs(c)
    key = (str(c["dtype"]).removeprefix("torch."), c["head_dim"])
    try:
        check_against_reference(q, k, v, c["lens_q"], c["lens_k"], c["dtype"], key)
    except AssertionError as e:
        raise AssertionError(f"{e} in {c}") from None


def test_report_worst_errors():
    """Runs after the random cases (pytest keeps file order): prints the largest error norm per dtype/head_dim."""
    print("\nnaive prefill worst relative error norms:", {f"{k[0]} D={k[1]}": f"{v:.2e}" for k, v in worst.items()})


@pytest.mark.parametrize("head_dim", [8, 40, 96, 256])
def test_other_head_dims(head_dim):
    """Any head_dim up to 256 runs: the lanes of a warp step through it 32 dims at a time."""
    c = dict(
        dtype=torch.float16,
        head_dim=head_dim,
        num_heads=4,
        num_kv_heads=2,
        lens_q=[17, 300, 1],
        lens_k=[17, 333, 40],
        q_scale=1.0,
        seed=head_dim,
    )
    q, k, v = make_inputs(c)
    check_against_reference(q, k, v, c["lens_q"], c["lens_k"], c["dtype"])


def test_query_without_keys_is_zero():
    """More queries than keys: the first queries of such a sequence see no key and get zeros; the rest match."""
    lens_q, lens_k = [6, 3], [2, 3]
    c = dict(
        dtype=torch.bfloat16,
        head_dim=64,
        num_heads=2,
        num_kv_heads=1,
        lens_q=lens_q,
        lens_k=lens_k,
        q_scale=1.0,
        seed=7,
    )
    q, k, v = make_inputs(c)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out = run_poisoned(q, k, v, cu_q, cu_k, 6, 3, 0.125)
    # Query i of sequence 0 sees keys j <= i + 2 - 6: none for i < 4.
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    ref = torch.cat(
        [
            reference.attend(q[4:6].float(), k[0:2].float(), v[0:2].float(), 0.125, True),
            reference.attend(q[6:9].float(), k[2:5].float(), v[2:5].float(), 0.125, True),
        ]
    )
    err = (out[4:].float() - ref).norm() / ref.norm()
    assert err < TOLERANCE[torch.bfloat16][0]


def small_inputs(dtype=torch.float16, head_dim=64, num_heads=4, num_kv_heads=2, device="cuda"):
    q = torch.randn(32, num_heads, head_dim, device=device).to(dtype)
    k = torch.randn(32, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    cu = torch.tensor([0, 10, 32], dtype=torch.int32, device=device)
    return q, k, v, cu


def call(q, k, v, cu_q, cu_k=None):
    cu_k = cu_q if cu_k is None else cu_k
    return torch.ops.minivllm.naive_attention_varlen(q, k, v, cu_q, cu_k, 22, 22, 0.125)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v, cu: (q.float(), k.float(), v.float(), cu), "q must be torch.float16 or torch.bfloat16, got"),
        (lambda q, k, v, cu: (q, k.bfloat16(), v.bfloat16(), cu), "share a dtype"),
        (
            lambda q, k, v, cu: (q.repeat(1, 1, 5), k.repeat(1, 1, 5), v.repeat(1, 1, 5), cu),
            "head_dim 320 is not supported; supported: 1 to 256",
        ),
        (lambda q, k, v, cu: (q, k[..., :32], v[..., :32], cu), "k and v head_dim 32 differs from q's 64"),
        (lambda q, k, v, cu: (q, k[:, :1].expand(32, 3, 64), v[:, :1].expand(32, 3, 64), cu), "multiple"),
        (lambda q, k, v, cu: (q, k.cpu(), v, cu), "CUDA tensor"),
        (lambda q, k, v, cu: (q, k, v, cu.long()), "torch.int32"),
        (lambda q, k, v, cu: (q, k, v, cu[:2]), r"batch \+ 1"),
        (lambda q, k, v, cu: (q.transpose(0, 2).contiguous().transpose(0, 2), k, v, cu), "contiguous"),
    ],
    ids=["fp32", "mixed-dtype", "head_dim", "kv-head_dim", "gqa", "cpu-k", "cu-int64", "cu-length", "strided"],
)
def test_bad_inputs_raise(mutate, message):
    q, k, v, cu = mutate(*small_inputs())
    cu_k = cu if cu.shape[0] == 3 else torch.tensor([0, 10, 32], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v, cu, cu_k)


def test_cpu_tensors_raise():
    q, k, v, cu = small_inputs(device="cpu")
    with pytest.raises(RuntimeError, match="CPU"):
        call(q, k, v, cu)
