"""The flash prefill kernels against the fp32 torch reference over random packed and paged batches: the mma.sync
kernel everywhere, and on sm_90 GPUs also the TMA + wgmma one (MINIVLLM_PREFILL_SM90 picks).

Run on a GPU after building the extension (scripts/gpu_build.sh); skipped otherwise.
"""

import math
import random

import pytest
import torch

from minivllm import ops
from minivllm.ops import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.KERNELS_BUILT), reason="needs a CUDA GPU and the built minivllm._C"
)

# ||out - ref|| / ||ref|| per sequence, and max |out - ref| / max |ref| over the batch. Rounding P and the
# output to the storage type costs up to 2.3e-3 (bf16) and 2.9e-4 (fp16) in the norm (H100, 2026-11-26).
TOLERANCE = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3)}
EDGE_LENGTHS = (1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257)
NUM_CASES = 120
MAX_TOKENS = 12288  # per case, to keep the file fast

SM90_CASES = 240  # shapes for the sm_90 kernel's tiles on top of the shared cases
GQA_GROUPS = (1, 2, 3, 4, 5, 6, 7, 8, 16)  # any Hq / Hkv is taken; these cover the models' and odd ones

worst = {}  # (kernel, dtype, head_dim) -> largest relative error norm seen, printed at the end


def select_kernel(kernel: str, monkeypatch) -> str:
    """Makes flash_attn_varlen run `kernel` (it reads the variable at every call); the sm_90 one runs only on sm_90
    GPUs of a build with sm_90a code."""
    if kernel == "sm90" and not ops.flash_prefill_sm90_available():
        pytest.skip("needs an sm_90 GPU and a build with 9.0a in TORCH_CUDA_ARCH_LIST")
    monkeypatch.setenv("MINIVLLM_PREFILL_SM90", "1" if kernel == "sm90" else "0")
    return kernel


@pytest.fixture(params=["mma_sync", "sm90"])
def kernel(request, monkeypatch):
    return select_kernel(request.param, monkeypatch)


def random_length(rng: random.Random, limit: int) -> int:
    pick = rng.random()
    if pick < 0.4:
        return rng.choice([n for n in EDGE_LENGTHS if n <= limit] or [1])
    if pick < 0.8:
        return rng.randint(1, min(limit, 600))
    return rng.randint(1, limit)


def case_fields(rng: random.Random, group: int, num_kv_heads: int, lens_q: list[int], lens_k: list[int]) -> dict:
    """The fields every random prefill case has: its dtype and head_dim drawn first, then its shapes."""
    return dict(
        dtype=rng.choice((torch.bfloat16, torch.float16)),
        head_dim=rng.choice((64, 128)),
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        lens_q=lens_q,
        lens_k=lens_k,
    )


def random_case(case: int) -> dict:
    rng = random.Random(case)
    group = rng.choice((1, 2, 4, 8))
    num_kv_heads = rng.choice((1, 2, 3))
    batch = rng.choice((1, 1, 2, 3, 5, 8, 16, 33, 64))
    budget = MAX_TOKENS // batch
    lens_q = [random_length(rng, min(4096, budget)) for _ in range(batch)]
    paged = rng.random() < 0.45
    with_prefix = rng.random() < (0.7 if paged else 0.3)
    lens_k = [lq + (random_length(rng, min(4096, budget)) if with_prefix else 0) for lq in lens_q]
    return dict(
        **case_fields(rng, group, num_kv_heads, lens_q, lens_k),
        causal=rng.random() < 0.7,
        block_size=rng.choice((16, 32, 256)) if paged else None,
        q_scale=rng.choice((1.0, 1.0, 4.0)),  # 4: peaked softmax, large logits
        seed=case,
    )


def random_sm90_case(case: int) -> dict:
    """Shapes for the sm_90 kernel: its tile edges (128 queries, 128 keys), single-token and short sequences, long
    prefixes (k_len up to thousands of times q_len), every group size in GQA_GROUPS, q/k/v as strided views, and
    paged k/v with every block size (one cache block a tile and up to 8 blocks a tile)."""
    rng = random.Random(10_000 + case)
    group = GQA_GROUPS[case % len(GQA_GROUPS)]
    num_kv_heads = rng.choice((1, 2, 3))
    batch = rng.choice((1, 1, 2, 3, 4, 7, 16, 40))
    budget = MAX_TOKENS // batch
    shape = rng.random()
    if shape < 0.3:  # short sequences, many of them single tokens
        lens_q = [rng.choice((1, 1, 2, 3, 5, 8, 15, 31)) for _ in range(batch)]
    else:
        lens_q = [random_length(rng, min(2048, budget)) for _ in range(batch)]
    if shape < 0.6:  # a prefix, often much longer than the new tokens
        lens_k = [lq + rng.choice((0, 1, 127, 128, 129, rng.randint(1, max(1, budget - lq)))) for lq in lens_q]
    else:
        lens_k = list(lens_q)
    return dict(
        **case_fields(rng, group, num_kv_heads, lens_q, lens_k),
        causal=rng.random() < 0.75,
        block_size=rng.choice((16, 32, 64, 128, 256)) if rng.random() < 0.35 else None,
        q_scale=rng.choice((1.0, 1.0, 4.0)),
        strided=rng.random() < 0.3,  # q, k, v slices of one [T, Hq + 2 Hkv, D] tensor, as the model passes them
        seed=case,
    )


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def make_inputs(c: dict):
    """q, k, v as the kernel takes them and as the reference takes them (packed/paged alike)."""
    gen = torch.Generator(device="cuda").manual_seed(c["seed"])
    d, dtype = c["head_dim"], c["dtype"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    total_q, total_k = sum(c["lens_q"]), sum(c["lens_k"])
    hq, hkv = c["num_heads"], c["num_kv_heads"]
    if c.get("strided") and total_q == total_k and c["block_size"] is None:
        qkv = randn(total_q, hq + 2 * hkv, d)
        qkv[:, :hq] = (qkv[:, :hq].float() * c["q_scale"]).to(dtype)
        return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :], None
    q = (randn(total_q, hq, d).float() * c["q_scale"]).to(dtype)
    k, v = randn(total_k, hkv, d), randn(total_k, hkv, d)
    if c["block_size"] is None:
        return q, k, v, None
    # Scatter each sequence's keys into randomly permuted pages of a cache. The spare blocks and the slots past
    # each sequence's last key hold NaN: a kernel that reads them (the sm_90 one loads whole cache blocks) must
    # keep them out of the output, since a masked key's zero weight times NaN is still NaN.
    bs = c["block_size"]
    blocks_per_seq = [math.ceil(lk / bs) for lk in c["lens_k"]]
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").int()
    table = torch.full((len(c["lens_k"]), max(blocks_per_seq) + 2), 0, dtype=torch.int32, device="cuda")
    k_cache = randn(num_blocks, bs, c["num_kv_heads"], d) * 1000
    v_cache = randn(num_blocks, bs, c["num_kv_heads"], d) * 1000
    used, start = 0, 0
    for i, (lk, nb) in enumerate(zip(c["lens_k"], blocks_per_seq)):
        table[i, :nb] = perm[used : used + nb]
        for j in range(nb):
            n = min(bs, lk - j * bs)
            k_cache[table[i, j], :n] = k[start + j * bs : start + j * bs + n]
            v_cache[table[i, j], :n] = v[start + j * bs : start + j * bs + n]
        k_cache[table[i, nb - 1], lk - (nb - 1) * bs :] = float("nan")
        v_cache[table[i, nb - 1], lk - (nb - 1) * bs :] = float("nan")
        used, start = used + nb, start + lk
    k_cache[perm[used:]] = float("nan")
    v_cache[perm[used:]] = float("nan")
    return q, k_cache, v_cache, table


def run_poisoned(*args):
    """The op allocates its output: free a NaN-filled block of that size first, so the caching allocator hands
    it back and an element the kernel fails to write stays NaN instead of holding stale memory."""
    torch.full_like(args[0], float("nan"))
    return ops.flash_attn_varlen(*args)


def first_shape(lens_q, lens_k, *, head_dim=128, dtype=torch.bfloat16, causal=False, heads=(1, 1), block_size=None,
                strided=False) -> dict:
    return dict(dtype=dtype, head_dim=head_dim, num_heads=heads[0], num_kv_heads=heads[1], lens_q=lens_q,
                lens_k=lens_k, causal=causal, block_size=block_size, q_scale=1.0, strided=strided, seed=1)


# For the sm_90 kernel's first runs, simplest first, each adding one mechanism, so that with -x the first failure
# names the suspect: one tile (TMA, descriptors, fragments, epilogue), the second 64-column slab (D=128: the K
# step into slab 1 and V's leading-byte offset), fp16, two key tiles (the online rescale), a ring that wraps
# four times (stage parities), the causal diagonal, key and query tails (V's zeroed rows), varlen + GQA, paged.
FIRST_SHAPES = {
    "one_tile_d64": first_shape([128], [128], head_dim=64),
    "one_tile_d128": first_shape([128], [128]),
    "one_tile_fp16": first_shape([128], [128], dtype=torch.float16),
    "two_key_tiles": first_shape([128], [256]),
    "ring_wraps": first_shape([128], [1024]),
    "causal_square": first_shape([384], [384], causal=True),
    "key_and_query_tails": first_shape([100], [300], causal=True),
    "varlen_gqa": first_shape([1, 129, 64], [1, 200, 1000], causal=True, heads=(8, 2)),
    "strided_qkv": first_shape([200, 77], [200, 77], causal=True, heads=(4, 2), strided=True),
    "paged_block_16": first_shape([70, 33], [300, 33], causal=True, heads=(2, 1), block_size=16),
    "paged_block_256": first_shape([130, 5], [600, 300], causal=True, heads=(2, 1), block_size=256),
}


@pytest.mark.parametrize("name", FIRST_SHAPES)
def test_first_shapes_match_reference(name, kernel):
    check_against_reference(FIRST_SHAPES[name], kernel)


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_matches_reference(case, kernel):
    check_against_reference(random_case(case), kernel)


@pytest.mark.parametrize("case", range(SM90_CASES))
def test_sm90_shapes_match_reference(case, monkeypatch):
    check_against_reference(random_sm90_case(case), select_kernel("sm90", monkeypatch))


def check_against_reference(c: dict, kernel: str) -> None:
    q, k, v, table = make_inputs(c)
    cu_q, cu_k = cu_seqlens(c["lens_q"]), cu_seqlens(c["lens_k"])
    scale = c["head_dim"] ** -0.5
    args = (cu_q, cu_k, max(c["lens_q"]), max(c["lens_k"]), scale, c["causal"], table)
    out = run_poisoned(q, k, v, *args)
    ref = reference.flash_attn_varlen(q.float(), k.float(), v.float(), *args)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), f"non-finite output in {c}"
    assert torch.equal(out, run_poisoned(q, k, v, *args)), f"a second launch differs (a race?) in {c}"
    norm_tol, max_tol = TOLERANCE[c["dtype"]]
    err = out.float() - ref
    starts = cu_q.tolist()
    seq_errors = [(err[a:b].norm() / ref[a:b].norm().clamp_min(1e-6)).item() for a, b in zip(starts[:-1], starts[1:])]
    key = (kernel, str(c["dtype"]).removeprefix("torch."), c["head_dim"])
    worst[key] = max(worst.get(key, 0.0), *seq_errors)
    assert max(seq_errors) < norm_tol, f"relative error {max(seq_errors):.2e} > {norm_tol} in {c}"
    max_err = (err.abs().max() / ref.abs().max()).item()
    assert max_err < max_tol, f"max error {max_err:.2e} > {max_tol} in {c}"


def test_report_worst_errors():
    """Runs after the random cases (pytest keeps file order): prints the largest error norm per kernel, dtype and
    head_dim."""
    norms = {f"{kernel} {dtype} D={head_dim}": f"{v:.2e}" for (kernel, dtype, head_dim), v in worst.items()}
    print("\nflash prefill worst relative error norms:", norms)


def small_inputs(dtype=torch.float16, head_dim=64, num_heads=4, num_kv_heads=2, device="cuda"):
    q = torch.randn(32, num_heads, head_dim, device=device).to(dtype)
    k = torch.randn(32, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    cu = torch.tensor([0, 10, 32], dtype=torch.int32, device=device)
    return q, k, v, cu


def call(q, k, v, cu_q, cu_k=None, block_table=None, out=None):
    cu_k = cu_q if cu_k is None else cu_k
    return torch.ops.minivllm.flash_attn_varlen(q, k, v, cu_q, cu_k, 22, 22, 0.125, True, block_table, out)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v, cu: (q.float(), k.float(), v.float(), cu), "float16 or torch.bfloat16"),
        (lambda q, k, v, cu: (q, k.bfloat16(), v.bfloat16(), cu), "share a dtype"),
        (
            lambda q, k, v, cu: (q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), cu),
            "head_dim 48 is not supported",
        ),
        (lambda q, k, v, cu: (q, k[:, :1].expand(32, 3, 64), v[:, :1].expand(32, 3, 64), cu), "multiple"),
        (lambda q, k, v, cu: (q, k.cpu(), v, cu), "CUDA tensor"),
        (lambda q, k, v, cu: (q, k, v, cu.long()), "torch.int32"),
        (lambda q, k, v, cu: (q, k, v, cu[:2]), r"batch \+ 1"),
        (lambda q, k, v, cu: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu), "contiguous"),
        (lambda q, k, v, cu: (q, k, v.transpose(0, 1).contiguous().transpose(0, 1), cu), "same strides"),
    ],
    ids=["fp32", "mixed-dtype", "head_dim", "gqa", "cpu-k", "cu-int64", "cu-length", "strided", "kv-strides"],
)
def test_bad_inputs_raise(mutate, message):
    q, k, v, cu = mutate(*small_inputs())
    cu_k = cu if cu.shape[0] == 3 else torch.tensor([0, 10, 32], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v, cu, cu_k)


def test_head_dim_96_raises():
    q, k, v, cu = small_inputs(head_dim=96)
    with pytest.raises(RuntimeError, match="head_dim 96 is not supported; supported: 64, 128"):
        call(q, k, v, cu)


def test_cpu_tensors_raise():
    q, k, v, cu = small_inputs(device="cpu")
    with pytest.raises(RuntimeError, match="CPU"):
        call(q, k, v, cu)


def test_bad_block_tables_raise():
    q, _, _, cu = small_inputs()
    cache = torch.randn(8, 16, 2, 64, device="cuda").half()
    table = torch.arange(8, dtype=torch.int32, device="cuda").view(2, 4)
    with pytest.raises(RuntimeError, match="block_table must be torch.int32"):
        call(q, cache, cache, cu, block_table=table.long())
    with pytest.raises(RuntimeError, match=r"block_table must be \[batch, max_blocks\]"):
        call(q, cache, cache, cu, block_table=table.view(1, 8))
    with pytest.raises(RuntimeError, match="block_size 8 is not supported"):
        call(q, cache.view(16, 8, 2, 64), cache.view(16, 8, 2, 64), cu, block_table=table)
    with pytest.raises(RuntimeError, match="paged, block_table given"):
        call(q, cache[0], cache[0], cu, block_table=table)


@pytest.mark.parametrize("switch, runs, not_runs", [("1", "sm90_kernel", "flash_prefill_kernel"),
                                                    ("0", "flash_prefill_kernel", "sm90_kernel")])
def test_switch_picks_the_kernel(switch, runs, not_runs, monkeypatch):
    """MINIVLLM_PREFILL_SM90 decides which kernel runs (read at every call), so the "sm90" cases test that one."""
    select_kernel("sm90", monkeypatch)
    monkeypatch.setenv("MINIVLLM_PREFILL_SM90", switch)
    q, k, v, cu = small_inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call(q, k, v, cu)
        torch.cuda.synchronize()
    names = [event.key for event in prof.key_averages()]
    assert any(runs in name for name in names) and not any(not_runs in name for name in names), names


def test_out_receives_the_result_and_rows_past_the_batch_stay(kernel):
    """With out, the result lands there (out returned), equal to a call without; rows no sequence covers (a padded
    graph step's) keep what they held. A wrong shape, dtype or layout raises."""
    q, k, v, cu = small_inputs(dtype=torch.bfloat16)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device="cuda")  # rows 24..31 are padding
    out = torch.full_like(q, 7.0)
    returned = call(q, k, v, cu, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert torch.equal(out[:24], call(q, k, v, cu)[:24])
    assert (out[24:] == 7.0).all()
    for bad, message in [(out[:31], "out must be q's dtype and shape"), (out.half(), "out must be q's dtype"),
                         (out.transpose(1, 2).contiguous().transpose(1, 2), "out must be contiguous")]:
        with pytest.raises(RuntimeError, match=message):
            call(q, k, v, cu, out=bad)
