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
