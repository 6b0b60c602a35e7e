// The work of one CTA of either flash prefill kernel (mma.sync and sm_90a): which (sequence, head) and query
// tile it owns, where the sequence's rows lie, and how many key tiles its rows see.
#pragma once

#include "attention/flash_params.cuh"

namespace minivllm::flash {

struct PrefillTile {
  int head, seq;
  int q_start, len_q;  // the sequence's rows of q (packed)
  int row0;            // the tile's first query row, in the sequence
  int k_start, len_k;  // the sequence's keys (packed rows, or the paged cache's positions)
  int diag;            // len_k - len_q: bottom-right causal alignment, row r sees keys 0 .. r + diag
  int n_blocks;        // key tiles of kBlockN the tile's rows see: every tile, or under the mask up to the diagonal
};

// Grid: x = (sequence, head) with heads fastest, so the query heads of one KV group run side by side and share
// its K/V in L2; y = query tile, the heaviest (last, under a causal mask) scheduled first. A tile with
// row0 >= len_q (past a shorter sequence's end) has no work: the caller returns.
template <int kBlockM, int kBlockN>
__device__ __forceinline__ PrefillTile prefill_tile(const FlashParams& p) {
  PrefillTile t;
  t.head = blockIdx.x % p.num_heads;
  t.seq = blockIdx.x / p.num_heads;
  t.q_start = p.cu_seqlens_q[t.seq];
  t.len_q = p.cu_seqlens_q[t.seq + 1] - t.q_start;
  t.row0 = (p.num_m_blocks - 1 - static_cast<int>(blockIdx.y)) * kBlockM;
  t.k_start = p.cu_seqlens_k[t.seq];
  t.len_k = p.cu_seqlens_k[t.seq + 1] - t.k_start;
  t.diag = t.len_k - t.len_q;
  t.n_blocks = (t.len_k + kBlockN - 1) / kBlockN;
  if (p.causal) {
    const int keys_seen_by_last_row = min(t.row0 + kBlockM, t.len_q) + t.diag;
    t.n_blocks = min(t.n_blocks, keys_seen_by_last_row <= 0 ? 0 : (keys_seen_by_last_row + kBlockN - 1) / kBlockN);
  }
  return t;
}

}  // namespace minivllm::flash
