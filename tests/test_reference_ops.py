"""The torch reference ops (the CPU path and the GPU kernels' oracle) against plain dense attention."""

import math

import pytest
import torch

from minivllm.ops import reference


def dense_attention(q, k, v, scale, causal):
    """Textbook attention of one sequence, fp64: q [Lq, Hq, D], k/v [Lk, Hkv, D], bottom-right causal."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged(keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int, num_blocks: int,
          generator: torch.Generator):
    """Scatter each sequence's keys and values into randomly chosen pages of caches poisoned with large values."""
    heads, dim = keys[0].shape[1:]
    k_cache = torch.full((num_blocks, block_size, heads, dim), 1e4)
    v_cache = torch.full((num_blocks, block_size, heads, dim), 1e4)
    free = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for k, v in zip(keys, values):
        table = [free.pop() for _ in range(math.ceil(len(k) / block_size))]
        for i, block in enumerate(table):
            rows = slice(i * block_size, (i + 1) * block_size)
            k_cache[block, : len(k[rows])] = k[rows]
            v_cache[block, : len(v[rows])] = v[rows]
        tables.append(table)
    width = max(map(len, tables))
    table_tensor = torch.tensor([t + [free[0]] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, table_tensor


SHAPES = [(4, 4, 64), (8, 2, 64), (8, 1, 128), (6, 3, 32)]  # (Hq, Hkv, D)


@pytest.mark.parametrize("heads, kv_heads, dim", SHAPES)
@pytest.mark.parametrize("paged_keys", [False, True])
def test_flash_attn_varlen_matches_dense(heads, kv_heads, dim, paged_keys):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    q_lens = [1, 7, 33, 16]
    cached = [0, 5, 20, 16] if paged_keys else [0, 0, 0, 0]  # keys already in the cache before the queries
    k_lens = [a + b for a, b in zip(q_lens, cached)]
    qs = [torch.randn(n, heads, dim, generator=g) for n in q_lens]
    ks = [torch.randn(n, kv_heads, dim, generator=g) for n in k_lens]
    vs = [torch.randn(n, kv_heads, dim, generator=g) for n in k_lens]
    scale = dim**-0.5
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.cat(qs)
    if paged_keys:
        k_cache, v_cache, table = paged(ks, vs, 16, 32, g)
        out = reference.flash_attn_varlen(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), scale, True,
                                          block_table=table)
    else:
        out = reference.flash_attn_varlen(q, torch.cat(ks), torch.cat(vs), cu_q, cu_k, max(q_lens), max(k_lens),
                                          scale, True)
    expected = torch.cat([dense_attention(*args, scale, True) for args in zip(qs, ks, vs)])
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("heads, kv_heads, dim", SHAPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_decode_matches_dense(heads, kv_heads, dim, block_size):
    g = torch.Generator().manual_seed(heads + dim + block_size)
    lengths = [1, 15, 16, 17, 70]
    ks = [torch.randn(n, kv_heads, dim, generator=g) for n in lengths]
    vs = [torch.randn(n, kv_heads, dim, generator=g) for n in lengths]
    q = torch.randn(len(lengths), heads, dim, generator=g)
    k_cache, v_cache, table = paged(ks, vs, block_size, 40, g)
    out = reference.paged_attention_decode(q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32),
                                           dim**-0.5)
    expected = torch.stack([dense_attention(q[i : i + 1], ks[i], vs[i], dim**-0.5, False)[0] for i in range(5)])
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reshape_and_cache_writes_slots_and_skips_padding(dtype):
    g = torch.Generator().manual_seed(7)
    k_cache = torch.full((4, 16, 2, 64), -7.0, dtype=dtype)
    v_cache = torch.full((4, 16, 2, 64), -7.0, dtype=dtype)
    key = torch.randn(5, 2, 64, generator=g).to(dtype)
    value = torch.randn(5, 2, 64, generator=g).to(dtype)
    slots = torch.tensor([3, 17, -1, 63, 40])
    reference.reshape_and_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], key[i]) and torch.equal(flat_v[slot], value[i])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(64) if s not in written]
    assert (flat_k[untouched] == -7).all() and (flat_v[untouched] == -7).all()


def test_half_precision_attention_accumulates_in_fp32():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(300, 4, 64, generator=g) for _ in range(3))
    cu = torch.tensor([0, 300], dtype=torch.int32)
    expected = dense_attention(q, k, v, 0.125, True)
    for dtype, tolerance in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        out = reference.flash_attn_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, 300, 300, 0.125, True)
        assert out.dtype == dtype
        assert (out.double() - expected).abs().max() < tolerance


def norm_rope_fp64(x, weight, eps, cos, sin):
    """Per-head RMSNorm (when weight is given) then neox rotary, in fp64: x [T, H, D], cos/sin [T, D]."""
    x = x.double()
    if weight is not None:
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), -1)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 4e-2),
                                               (torch.float16, 3e-3, 5e-3)])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (8, 2, 32)])
def test_qk_norm_rope_cache_matches_fp64(dtype, rtol, atol, normed, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads + dim + normed)
    tokens, width, block_size, num_blocks = 37, (heads + 2 * kv_heads) * dim, 16, 4
    buffer = torch.randn(tokens, width + 8, generator=g).to(dtype)
    qkv = buffer[:, :width]  # a padded row stride, as a strided projection output would have
    before = buffer.clone()
    positions = torch.randint(0, 50, (tokens,), generator=g)
    cos, sin = torch.randn(50, dim, generator=g), torch.randn(50, dim, generator=g)  # halves differ: both used
    q_weight = k_weight = None
    if normed:
        q_weight, k_weight = (torch.rand(dim, generator=g).add(0.5).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::5] = -1
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    reference.qk_norm_rope_cache(qkv, positions, cos, sin, q_weight, k_weight, 1e-6, k_cache, v_cache, slots,
                                 heads, kv_heads)

    q0, k0, v0 = before[:, :width].unflatten(1, (-1, dim)).split([heads, kv_heads, kv_heads], dim=1)
    q, k, v = qkv.unflatten(1, (-1, dim)).split([heads, kv_heads, kv_heads], dim=1)
    expected_q = norm_rope_fp64(q0, q_weight, 1e-6, cos[positions], sin[positions])
    expected_k = norm_rope_fp64(k0, k_weight, 1e-6, cos[positions], sin[positions])
    torch.testing.assert_close(q.double(), expected_q, rtol=rtol, atol=atol)
    torch.testing.assert_close(k.double(), expected_k, rtol=rtol, atol=atol)
    assert torch.equal(v, v0) and torch.equal(buffer[:, width:], before[:, width:])
    written = slots >= 0
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    assert torch.equal(flat_k[slots[written]], k[written]) and torch.equal(flat_v[slots[written]], v[written])
    unwritten = torch.ones(num_blocks * block_size, dtype=torch.bool)
    unwritten[slots[written]] = False
    assert flat_k[unwritten].isnan().all() and flat_v[unwritten].isnan().all()


def test_qk_norm_rope_cache_without_cache_still_transforms():
    """Empty caches (the engine's profiling forward before the KV cache exists): q and k still change."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 4 * 64, generator=g)
    before = qkv.clone()
    cos, sin = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    empty = torch.tensor([])
    reference.qk_norm_rope_cache(qkv, torch.arange(5), cos, sin, None, None, 1e-6, empty, empty,
                                 torch.full((5,), -1), 2, 1)
    expected = norm_rope_fp64(before[:, :192].view(5, 3, 64), None, 0.0, cos[:5], sin[:5])
    torch.testing.assert_close(qkv[:, :192].double(), expected.flatten(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, 192:], before[:, 192:])


def test_sampler_references_against_a_loop_over_elements():
    """reference.sampler_gumbel_argmax (the sampler kernels' oracle) against the penalties, temperature and Gumbel
    draw written out one element at a time, and ops' wrappers taking the references on the CPU."""
    from minivllm import ops

    g = torch.Generator().manual_seed(0)
    rows, vocab, num_slots = 5, 37, 3
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[1, 4] = float("-inf")
    noise = torch.empty(rows, vocab).exponential_(generator=g)
    temperatures = torch.tensor([0.0, 1e-6, 0.7, 1.0, 2.0])
    counts = torch.randint(0, 3, (num_slots, vocab), generator=g, dtype=torch.int32)
    in_prompt = torch.rand(num_slots, vocab, generator=g) < 0.3
    slots = torch.tensor([2, 0, 1, 2, 0])
    presence, frequency = torch.rand(rows, generator=g) - 0.5, torch.rand(rows, generator=g) * 4 + 1  # strong
    repetition = torch.rand(rows, generator=g) + 0.5
    penalties = (counts, in_prompt, slots, presence, frequency, repetition)
    expected = []
    for b in range(rows):
        scores = []
        for v in range(vocab):
            x, c = logits[b, v].item(), counts[slots[b], v].item()
            if in_prompt[slots[b], v] or c > 0:
                x = x / repetition[b].item() if x > 0 else x * repetition[b].item()
            x = x - frequency[b].item() * c - presence[b].item() * (c > 0)
            scores.append(x / max(temperatures[b].item(), 1e-5) - math.log(noise[b, v].item()))
        expected.append(max(range(vocab), key=lambda v: (scores[v], -v)))
    assert reference.sampler_gumbel_argmax(logits, noise, temperatures, *penalties).tolist() == expected
    assert torch.equal(ops.sampler_gumbel_argmax(logits, noise, temperatures, *penalties),
                       reference.sampler_gumbel_argmax(logits, noise, temperatures, *penalties))
    assert not torch.equal(reference.sampler_gumbel_argmax(logits, noise, temperatures), torch.tensor(expected))

    tokens = torch.tensor(expected)
    lse, above = ops.sampler_logsumexp_rank(logits, tokens)
    torch.testing.assert_close(lse.double(), logits.double().logsumexp(-1), rtol=1e-6, atol=1e-6)
    assert above.tolist() == [int((logits[b] > logits[b, tokens[b]]).sum()) for b in range(rows)]
