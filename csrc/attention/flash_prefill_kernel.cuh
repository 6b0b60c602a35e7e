// FlashAttention-2 forward over a packed variable-length batch, with tensor cores through mma.sync.
//
// One CTA owns kBlockM query rows of one (sequence, head); each warp owns 16 * kRowTilesPerWarp of those
// rows and keeps their scores, running max/sum and output accumulator in registers (Q stays in shared
// memory, re-read with ldmatrix each tile: the registers it would take are all in use). The CTA walks its
// key tiles from last to first (so the masked diagonal/edge tiles come first and the rest run mask-free),
// with the next K/V tile copied by cp.async into the other shared-memory buffer while this one is used:
//   S = Q K^T (mma) -> mask (edge tiles only) -> online softmax in fp32 (exp2, scale folded into log2 e)
//   -> P rounded to T in registers, reused as the A operand of O += P V (mma, V through ldmatrix.trans).
// Shared-memory tiles are laid out by Traits::tile_offset so that cp.async stores and every ldmatrix phase
// (8 rows, same chunk) touch 8 distinct bank groups.
#pragma once

#include <cmath>

#include "common/ptx.cuh"
#include "flash_kernel_traits.cuh"
#include "flash_params.cuh"
#include "prefill_tile.cuh"

namespace minivllm::flash {

using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_16816;
using ptx::pack2;
using ptx::smem_address;

// Max of a lane's values of one row (h = 0: elements 0, 1; h = 1: elements 2, 3 of each 8-column tile),
// taken as a tree: the max sits on the path from the last QK^T mma to the P V mma's, so its dependent chain
// is kept at log2(2N) operations rather than 2N.
template <int N>
__device__ __forceinline__ float lane_row_max(const float (&s)[N][4], int h) {
  float v[N];
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = fmaxf(s[j][2 * h], s[j][2 * h + 1]);
#pragma unroll
  for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
    for (int j = 0; j < width; ++j) v[j] = fmaxf(v[j], v[j + width]);
  }
  return v[0];
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSM)
    flash_prefill_kernel(const __grid_constant__ FlashParams p) {
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kChunks = Traits::kChunksPerRow;
  constexpr int kRowsPerPass = kThreads / kChunks;  // tile rows one pass of 16-byte copies covers

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + Traits::kSmemQ;                     // [kStages][kSmemKV]
  T* s_v = s_k + Traits::kStages * Traits::kSmemKV;  // [kStages][kSmemKV]

  const auto [head, seq, q_start, len_q, row0, k_start, len_k, diag, n_blocks] = prefill_tile<kBlockM, kBlockN>(p);
  if (row0 >= len_q) return;
  const int kv_head = head / p.group_size;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  // The 16-byte chunk (and first tile row) this thread copies in every pass of a tile load.
  const int copy_chunk = tid % kChunks;
  const int copy_row = tid / kChunks;

  const T* q = static_cast<const T*>(p.q) + q_start * p.q_token_stride + head * p.q_head_stride;
  // k and v share strides (checked on the host), so one offset serves both.
  const int64_t kv_base = kv_head * p.kv_head_stride + copy_chunk * 8;
  const T* k = static_cast<const T*>(p.k) + kv_base;
  const T* v = static_cast<const T*>(p.v) + kv_base;
  const int* block_table = p.block_table == nullptr ? nullptr : p.block_table + seq * p.block_table_stride;

#pragma unroll
  for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
    const int r = copy_row + i * kRowsPerPass;
    const bool valid = row0 + r < len_q;
    const T* src = valid ? q + (row0 + r) * p.q_token_stride + copy_chunk * 8 : q;
    cp_async_16(smem_address(s_q + Traits::tile_offset(r, copy_chunk)), src, valid);
  }

  // Copies key tile n_block into buffer `stage`; rows past len_k are zero-filled.
  auto load_kv = [&](int n_block, int stage) {
    T* dst_k = s_k + stage * Traits::kSmemKV;
    T* dst_v = s_v + stage * Traits::kSmemKV;
#pragma unroll
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int r = copy_row + i * kRowsPerPass;
      const int key = n_block * kBlockN + r;
      const bool valid = key < len_k;
      int64_t offset = 0;
      if (valid) {
        if (block_table != nullptr) {
          const int block = block_table[key >> p.block_size_log2];
          offset = block * p.kv_block_stride + (key & ((1 << p.block_size_log2) - 1)) * p.kv_token_stride;
        } else {
          offset = (k_start + key) * p.kv_token_stride;
        }
      }
      const int s = Traits::tile_offset(r, copy_chunk);
      cp_async_16(smem_address(dst_k + s), k + offset, valid);
      cp_async_16(smem_address(dst_v + s), v + offset, valid);
    }
  };

  if (n_blocks > 0) load_kv(n_blocks - 1, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Each lane holds, for every 16-row tile t of its warp, rows (lane/4) and (lane/4 + 8): index [t][0], [t][1].
  constexpr int kTiles = Traits::kRowTilesPerWarp;
  float acc_o[kTiles][D / 8][4] = {};
  float row_max[kTiles][2];
  float row_sum[kTiles][2] = {};  // this lane's partial sums; the 4 lanes of a row are reduced at the end
#pragma unroll
  for (int t = 0; t < kTiles; ++t) row_max[t][0] = row_max[t][1] = -INFINITY;
  const int warp_row0 = warp * 16 * kTiles;   // first tile row of this warp
  const int lane_row = lane / 4;               // row of index [t][0] within 16-row tile t
  const int lane_col = 2 * (lane % 4);         // first of the two columns a lane holds in each 8-wide tile

  for (int it = 0; it < n_blocks; ++it) {
    const int n_block = n_blocks - 1 - it;
    const int stage = it % Traits::kStages;
    // Tile n_block has landed and every warp is done with the buffer the next copy overwrites.
    cp_async_wait<0>();
    __syncthreads();
    if (n_block > 0) load_kv(n_block - 1, (it + 1) % Traits::kStages);
    cp_async_commit();

    // S = Q K^T. Q (A operand, row-major): matrix j of an ldmatrix is rows +8*(j%2), chunk +j/2. K rows are
    // B's columns, so K loads untransposed: matrix j is keys +8*(j/2), chunk +j%2. Each K fragment serves
    // all of the warp's row tiles.
    const T* tile_k = s_k + stage * Traits::kSmemKV;
    float s[kTiles][kBlockN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t q_frag[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const int r = warp_row0 + t * 16 + lane % 16;
        ldmatrix_x4(q_frag[t], smem_address(s_q + Traits::tile_offset(r, kk * 2 + lane / 16)));
      }
#pragma unroll
      for (int nn = 0; nn < kBlockN / 16; ++nn) {
        uint32_t b[4];
        const int r = nn * 16 + (lane / 16) * 8 + lane % 8;
        ldmatrix_x4(b, smem_address(tile_k + Traits::tile_offset(r, kk * 2 + (lane / 8) % 2)));
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          mma_16816<T>(s[t][2 * nn], q_frag[t], b[0], b[1]);
          mma_16816<T>(s[t][2 * nn + 1], q_frag[t], b[2], b[3]);
        }
      }
    }

    // Only the tile at the key edge and tiles crossing the causal diagonal need a mask.
    const int col0 = n_block * kBlockN;
    if (col0 + kBlockN > len_k || (p.causal && col0 + kBlockN - 1 > row0 + diag)) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = col0 + j * 8 + lane_col + (e & 1);
            const int row = row0 + warp_row0 + t * 16 + lane_row + (e / 2) * 8;
            if (col >= len_k || (p.causal && col > row + diag)) s[t][j][e] = -INFINITY;
          }
        }
      }
    }

    // Online softmax: rescale what was accumulated by exp(old max - new max), then P = exp(S - new max).
    float correction[kTiles][2];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = fmaxf(row_max[t][h], lane_row_max(s[t], h));
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
        // A row that has seen only masked keys keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
        const float m_scaled = m == -INFINITY ? 0.f : m * p.scale_log2;
        correction[t][h] = exp2f(row_max[t][h] * p.scale_log2 - m_scaled);
        row_max[t][h] = m;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          s[t][j][2 * h] = exp2f(fmaf(s[t][j][2 * h], p.scale_log2, -m_scaled));
          s[t][j][2 * h + 1] = exp2f(fmaf(s[t][j][2 * h + 1], p.scale_log2, -m_scaled));
          sum += s[t][j][2 * h] + s[t][j][2 * h + 1];
        }
        row_sum[t][h] = row_sum[t][h] * correction[t][h] + sum;
      }
    }
    // Past the first few tiles a row's max rarely moves: skip the 128 multiplies when no row of the warp needs them.
    bool unchanged = true;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) unchanged = unchanged && correction[t][0] == 1.f && correction[t][1] == 1.f;
    if (!__all_sync(0xffffffff, unchanged)) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_o[t][d][e] *= correction[t][e / 2];
        }
      }
    }

    // O += P V. The accumulator layout of two adjacent 8-key score tiles is the A layout of one 16-key step;
    // V rows are B's k dimension, so V loads transposed: matrix j covers keys +8*(j%2), chunk +j/2.
    const T* tile_v = s_v + stage * Traits::kSmemKV;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t p_frag[kTiles][4];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        p_frag[t][0] = pack2<T>(s[t][2 * kk][0], s[t][2 * kk][1]);
        p_frag[t][1] = pack2<T>(s[t][2 * kk][2], s[t][2 * kk][3]);
        p_frag[t][2] = pack2<T>(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
        p_frag[t][3] = pack2<T>(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t b[4];
        const int r = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
        ldmatrix_x4_trans(b, smem_address(tile_v + Traits::tile_offset(r, dd * 2 + lane / 16)));
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          mma_16816<T>(acc_o[t][2 * dd], p_frag[t], b[0], b[1]);
          mma_16816<T>(acc_o[t][2 * dd + 1], p_frag[t], b[2], b[3]);
        }
      }
    }
  }

  // Epilogue: O / rowsum, rounded to T, staged through this warp's own rows of s_q (no other warp reads
  // them) so the global stores are whole 16-byte chunks. A row that saw no key at all is written as zeros.
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[t][h];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
      const int r = warp_row0 + t * 16 + lane_row + h * 8;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        *reinterpret_cast<uint32_t*>(s_q + Traits::tile_offset(r, d) + lane_col) =
            pack2<T>(acc_o[t][d][2 * h] * inv_sum, acc_o[t][d][2 * h + 1] * inv_sum);
      }
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + q_start * p.out_token_stride + head * p.out_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * kTiles * kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = warp_row0 + idx / kChunks;
    const int chunk = idx % kChunks;
    if (row0 + r < len_q) {
      *reinterpret_cast<uint4*>(out + (row0 + r) * p.out_token_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(s_q + Traits::tile_offset(r, chunk));
    }
  }
}

}  // namespace minivllm::flash
