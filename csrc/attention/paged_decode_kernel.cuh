// Paged-attention decode on the tensor cores: one query token per sequence against its K/V pages.
//
// One CTA of kWarps warps serves one (sequence, kv head, chunk of up to kMaxHeads query heads of that kv
// head's GQA group, split of the context). The query heads are the M dimension of mma.sync m16n8k16 (padded
// to 16 rows with zeros: Qwen3-0.6B's group of 2 wastes 14 rows, which costs nothing, since decode needs
// about 2 flop a byte and the tensor cores give hundreds), so each K/V byte costs a few instructions
// instead of v4's scalar FFMA chains:
//   S = Q K^T   (q fragments held in registers for the whole kernel, K tiles through ldmatrix)
//   online softmax per row in fp32, in registers: a row lives in the 4 lanes of a quad, so shuffles, no barrier
//   O += P V    (S's accumulators repacked as P's A fragments, the FA2 register trick; V through ldmatrix.trans)
// Every warp runs its own cp.async pipeline of kPipelineStages stages over its own tokens (chunks w, w + kWarps, ...
// of kWarpTokens tokens), so the main loop has no CTA barrier at all: a warp waits only for its own copies.
// At the end the warps' (max, sum, O) are merged through shared memory with one barrier.
//
// Long contexts are split so that every SM gets work of about equal size: each split writes a normalised
// partial output and its log-sum-exp, and the last split of a (sequence, kv head, head chunk) to finish
// combines them (it counts the splits done in split_counters): a merge kernel of its own cost more than its work
// at small batches, where its launch followed every layer's decode. The split size comes from the batch's
// total context (split_tiles below), read on the device, so a captured graph adapts to each step's lengths;
// only the grid's bound on splits per sequence is fixed by shapes (paged_decode_launch.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/pdl.cuh"
#include "common/online_softmax.cuh"
#include "common/ptx.cuh"
#include "common/split_counters.cuh"
#include "paged_decode.cuh"

namespace minivllm::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpTokens = 16;              // tokens a warp takes per stage: the k of one P.V mma
constexpr int kTile = kWarps * kWarpTokens;  // tokens the CTA's warps take together; splits are whole tiles
// Stages per warp. Decode is memory-bound once the mma's take the arithmetic (ncu, H200, workload batch:
// about 360 instructions issued per 8 KB of K/V against v4's 1,860; the main loop is 307 SASS instructions a
// stage), so what matters is bytes in flight: 2 CTAs x 4 warps x 2 stages ahead x 8 KB = 128 KB an SM, 4 times
// what the H200 needs at 4 TB/s and ~1 us of loaded latency (30 KB an SM). GPUs whose blocks get less than
// the 106 KB this takes at head_dim 128 (sm_86, sm_89: 99 KB) run kFallbackStages (paged_decode_launch.cuh).
constexpr int kPipelineStages = 3;
constexpr int kFallbackStages = 2;
constexpr int kMaxHeads = 16;  // query heads one CTA serves: the mma's M; larger groups take more CTAs
constexpr int kMaxSplits = 128;
// Split sizing; each has a MINIVLLM_DECODE_* override for sweeps (paged_decode_launch.cuh).
constexpr float kGridWaves = 8;     // the grid holds (sequence, split) CTAs for about this many waves
constexpr float kUnsplitWaves = 4;  // ... unless whole sequences fill this many
constexpr float kCtaCostTiles = 4;  // fixed cost of a CTA (start, merge), in tiles of streaming (NOTES)
constexpr float kWholeWaves = 0;    // full waves split_tiles may round the split size to; 0: none (NOTES)

template <int kHeadDim, int kStages>
struct Layout {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "paged decode supports head_dim 64 and 128");
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks in one K or V row
  // Rows padded by one 16-byte chunk: the 8 rows of an ldmatrix phase then start in 8 different bank groups,
  // and every fragment address is a per-lane base plus an immediate (as flash prefill's kPaddedRows).
  static constexpr int kRowBytes = kHeadDim * 2 + 16;
  static constexpr int kLaneRows = 32 / kChunks;             // rows one warp-wide 16-byte copy covers
  static constexpr int kPasses = kWarpTokens / kLaneRows;    // copies per lane per stage, each of K and V
  static constexpr int kKvBytes = kWarpTokens * kRowBytes;   // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kKvBytes;
  static constexpr int kWarpBytes = kStages * kStageBytes;   // one warp's pipeline
  static constexpr int kQBytes = kMaxHeads * kRowBytes;
  // Three stages: D=128 106 KB, two CTAs an SM (228 KB); D=64 54 KB, four.
  static constexpr int kSmemBytes = kWarps * kWarpBytes + kQBytes;
  static constexpr int kCtasPerSm = kHeadDim == 128 ? 2 : 4;
  // The end-of-CTA merge reuses each warp's pipeline buffers: O [kMaxHeads][kScratchStride] fp32, then the
  // rows' max and sum. 8 floats of padding put the 8 rows a warp's store touches 32 bytes apart in the banks.
  static constexpr int kScratchStride = kHeadDim + 8;
  static constexpr int kStatsOffset = kMaxHeads * kScratchStride;  // floats
  static_assert((kStatsOffset + 2 * kMaxHeads) * 4 <= kWarpBytes, "the merge scratch must fit a warp's buffers");
  static_assert(kWarpTokens % kLaneRows == 0 && kWarpTokens % 16 == 0, "a stage is whole copy passes and mma k");
};

struct KernelParams {
  DecodeArgs args;
  int head_chunks;  // CTAs per kv head along the query heads: ceil(group / kMaxHeads)
  int num_splits;   // the grid's CTAs per (sequence, kv head, head chunk) along the context: at most this many
  int slots;        // CTAs the GPU holds at once
  float cta_cost_tiles;  // kCtaCostTiles unless MINIVLLM_DECODE_CTA_COST says otherwise
  float whole_waves;     // kWholeWaves unless MINIVLLM_DECODE_WHOLE_WAVES says otherwise
  float* partial_out;    // [batch * num_heads, num_splits, head_dim], when num_splits > 1
  float* partial_lse;    // [batch * num_heads, num_splits], log2 domain
  // [CTAs along blockIdx.x], when num_splits > 1: the splits of each that have written their partials. Zero
  // between launches: the split that merges sets its count back (so a captured graph replays as it ran).
  int* split_counters;
};

// Tiles per split for a sequence of `tiles` tiles, the same in every CTA of the sequence and in the merge.
// A step's decode takes about (all tiles + cost x CTAs) / slots + the longest CTA: splits of s tiles make
// about work / s CTAs, and s = sqrt(cost x work / slots) minimises the sum. Work counts every (sequence, kv
// head, head chunk)'s tiles, from the batch's total context, over split_kv_heads heads (see DecodeArgs).
// With whole_waves = n > 0, where the work fits k <= n full waves of CTAs at most twice that size, those k
// whole waves are taken: when all CTAs run in step (batch 1) each wave pays their start unhidden, and
// splitting finer only adds waves (a cost of 1 took 1 x 8k from 18.8 us in one wave of 4-tile CTAs to 23.8 us
// in two of 2 tiles, while it sped the mixed batch up by 10%: NOTES). The sequence is then cut into that many
// splits of equal size (not s, s, ..., remainder), never more than the grid has.
__device__ __forceinline__ int split_tiles(int tiles, int64_t total_context, const KernelParams& p) {
  const float work = float(max(total_context, int64_t(0))) / kTile * (p.args.split_kv_heads * p.head_chunks);
  float size = ceilf(sqrtf(p.cta_cost_tiles * work / p.slots));
  for (int waves = 1; waves <= p.whole_waves; ++waves) {
    const float whole_waves = ceilf(work / (p.slots * waves));
    if (whole_waves <= 2.f * size) {
      size = whole_waves;
      break;
    }
  }
  const int wanted = max(static_cast<int>(fminf(size, float(max(tiles, 1)))), 1);
  const int splits = min((tiles + wanted - 1) / wanted, p.num_splits);
  return splits > 0 ? (tiles + splits - 1) / splits : 1;
}

// out = sum_s 2^(lse_s - max) * partial_s / sum_s 2^(lse_s - max) over the `used` splits of query head row
// (sequence * num_heads + head), for output dims d and d + 1. The partials come from other CTAs of this launch:
// read from L2 (__ldcg), never from a stale L1 line. The loops are unrolled so that several of those L2 reads are
// in flight at once: this merge now runs at the end of a context's last split, on the step's critical path.
template <typename T, int kHeadDim>
__device__ __forceinline__ void merge_splits(const KernelParams& p, int64_t row, int d, int used) {
  const float* lse = p.partial_lse + row * p.num_splits;
  const float* partial = p.partial_out + row * p.num_splits * kHeadDim;
  float lse_max = -INFINITY;
#pragma unroll 4
  for (int s = 0; s < used; ++s) lse_max = fmaxf(lse_max, __ldcg(lse + s));
  float num0 = 0.f, num1 = 0.f, den = 0.f;
#pragma unroll 4
  for (int s = 0; s < used; ++s) {
    const float w = exp2f(__ldcg(lse + s) - lse_max);
    const float2 x = __ldcg(reinterpret_cast<const float2*>(partial + s * kHeadDim + d));
    num0 += w * x.x;
    num1 += w * x.y;
    den += w;
  }
  T* out = static_cast<T*>(p.args.out) + row * kHeadDim + d;
  *reinterpret_cast<uint32_t*>(out) = ptx::pack2<T>(num0 / den, num1 / den);
}

template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(kThreads, Layout<kHeadDim, kStages>::kCtasPerSm)
    paged_decode_kernel(const __grid_constant__ KernelParams p) {
  using L = Layout<kHeadDim, kStages>;
  const DecodeArgs& a = p.args;
  pdl::allow_next_grid();

  const int work = blockIdx.x;  // (sequence, kv head, head chunk)
  const int head_chunk = work % p.head_chunks;
  const int kv_head = (work / p.head_chunks) % a.num_kv_heads;
  const int seq = work / (p.head_chunks * a.num_kv_heads);
  const int split = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int head0 = kv_head * group + head_chunk * kMaxHeads;  // first query head served here
  const int num_heads = min(kMaxHeads, group - head_chunk * kMaxHeads);

  // Everything below reads or writes what other kernels of the stream touch: q, the step's tables and lengths,
  // the caches, and the split counters and workspace, which the previous launch (the layer before) resets and
  // reads until it completes (common/pdl.cuh).
  pdl::wait_for_prior_grid();
  const int context = a.context_lens[seq];
  CUDA_KERNEL_ASSERT(context >= 0 && context <= a.max_blocks * a.block_size);
  const int context_tiles = (context + kTile - 1) / kTile;
  const int split_tokens = split_tiles(context_tiles, *a.total_context, p) * kTile;
  const int begin = split * split_tokens;
  const int end = min(context, begin + split_tokens);
  // The merge reads only the splits that hold tokens; the others have nothing to write. A context that
  // split 0 covers alone (an empty one too) needs no merge: that CTA writes the output itself.
  if (split > 0 && begin >= end) return;
  const bool writes_output = context <= split_tokens;

  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const uint32_t warp_smem = ptx::smem_address(smem + warp * L::kWarpBytes);  // [kStages][K, V][16][row]
  const uint32_t q_smem = ptx::smem_address(smem + kWarps * L::kWarpBytes);   // [kMaxHeads][row]

  // q of the CTA's heads, rows past num_heads zero-filled, in a copy group of its own (the first).
  const T* q = static_cast<const T*>(a.q) + seq * a.q_stride_batch + head0 * a.q_stride_head;
  for (int i = tid; i < kMaxHeads * L::kChunks; i += kThreads) {
    const int h = i / L::kChunks, c = i % L::kChunks;
    const bool valid = h < num_heads;
    ptx::cp_async_16(q_smem + h * L::kRowBytes + c * 16, valid ? q + h * a.q_stride_head + c * 8 : q, valid);
  }
  ptx::cp_async_commit();

  // This warp's stages: chunk `stage * kWarps + warp` of kWarpTokens tokens from `begin`, while it starts
  // before `end`. A chunk starts at a multiple of 16 and block_size is a power of two >= 16, so it lies
  // in one page.
  const int warp_stages = max(0, (end - begin - warp * kWarpTokens + kTile - 1) / kTile);
  auto stage_start = [&](int stage) { return begin + (stage * kWarps + warp) * kWarpTokens; };
  const int32_t* table = a.block_tables + seq * a.block_table_stride;
  const int block_shift = __ffs(a.block_size) - 1;
  // Table entries past a sequence's last page may be garbage: only the pages of this warp's stages are read.
  auto page_of = [&](int stage) {
    return stage < warp_stages ? __ldg(table + (stage_start(stage) >> block_shift)) : 0;
  };

  // Loader: lane copies chunk lane % kChunks of rows lane / kChunks + i * kLaneRows, of K and of V; one
  // warp-wide copy moves kLaneRows whole 2 x 128 or 256-byte rows.
  const int load_chunk = lane % L::kChunks;
  const int load_row = lane / L::kChunks;
  const int64_t token_stride = int64_t(a.num_kv_heads) * kHeadDim;
  const int64_t pass_stride = L::kLaneRows * token_stride;  // from one pass's rows to the next's
  const int64_t head_offset = int64_t(kv_head) * kHeadDim + load_chunk * 8;
  const T* k_head = static_cast<const T*>(a.k_cache) + head_offset;
  const T* v_head = static_cast<const T*>(a.v_cache) + head_offset;
  auto load_stage = [&](int stage, int page) {
    const int start = stage_start(stage);
    const int64_t first = (int64_t(page) * a.block_size + (start & (a.block_size - 1)) + load_row) * token_stride;
    const T* k_src = k_head + first;
    const T* v_src = v_head + first;
    const int rows_left = end - start - load_row;  // tokens from this lane's first row to the end
    const uint32_t dst = warp_smem + (stage % kStages) * L::kStageBytes + load_row * L::kRowBytes + load_chunk * 16;
#pragma unroll
    for (int i = 0; i < L::kPasses; ++i) {
      // Rows past the end (still inside the stage's page) are zero-filled, not read: their probabilities are 0,
      // and 0 x NaN of a stale row would be NaN.
      const bool valid = i * L::kLaneRows < rows_left;
      ptx::cp_async_16(dst + i * L::kLaneRows * L::kRowBytes, k_src + i * pass_stride, valid);
      ptx::cp_async_16(dst + L::kKvBytes + i * L::kLaneRows * L::kRowBytes, v_src + i * pass_stride, valid);
    }
  };

  // Prologue: the first kStages - 1 stages in flight (their page numbers fetched together first, and the
  // next one's), then q's fragments into registers once q has landed for every thread.
  int pages[kStages - 1];
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) pages[s] = page_of(s);
  int next_page = page_of(kStages - 1);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < warp_stages) load_stage(s, pages[s]);
    ptx::cp_async_commit();
  }
  ptx::cp_async_wait<kStages - 1>();  // this thread's part of q (the first group)
  __syncthreads();                      // ... and everyone's
  // A fragments of q: matrix j of an ldmatrix is rows +8*(j%2), chunk +j/2.
  uint32_t q_frag[kHeadDim / 16][4];
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    ptx::ldmatrix_x4(q_frag[kk], q_smem + (lane % 16) * L::kRowBytes + (lane / 16) * 16 + kk * 32);
  }

  // Each lane holds rows lane/4 ([.][0..1]) and lane/4 + 8 ([.][2..3]) of every 8-column accumulator tile.
  const float scale_log2 = a.scale * 1.4426950408889634f;  // softmax in base 2
  float acc[kHeadDim / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // in units of scale * log2(e) * q.k
  float row_sum[2] = {0.f, 0.f};              // this lane's columns; the quad is summed at the end
  const int lane_col = 2 * (lane % 4);
  // K rows are B's columns, so K loads untransposed: matrix j is keys +8*(j/2), chunk +j%2. V rows are B's k
  // dimension, so V loads transposed: matrix j is keys +8*(j%2), chunk +j/2.
  const uint32_t k_lane = ((lane / 16) * 8 + lane % 8) * L::kRowBytes + ((lane / 8) % 2) * 16;
  const uint32_t v_lane = L::kKvBytes + (((lane / 8) % 2) * 8 + lane % 8) * L::kRowBytes + (lane / 16) * 16;

  for (int stage = 0; stage < warp_stages; ++stage) {
    ptx::cp_async_wait<kStages - 2>();  // this lane's copies of `stage` have landed
    __syncwarp();                         // ... every lane's; and all are done reading stage - 1's buffer
    const int ahead = stage + kStages - 1;
    if (ahead < warp_stages) load_stage(ahead, next_page);
    ptx::cp_async_commit();
    next_page = page_of(ahead + 1);  // a stage early: its latency hides behind this stage's work

    const uint32_t buf = warp_smem + (stage % kStages) * L::kStageBytes;
    float s[kWarpTokens / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < kWarpTokens / 16; ++nn) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, buf + k_lane + nn * 16 * L::kRowBytes + kk * 32);
        ptx::mma_16816<T>(s[2 * nn], q_frag[kk], b[0], b[1]);
        ptx::mma_16816<T>(s[2 * nn + 1], q_frag[kk], b[2], b[3]);
      }
    }
    // Scale in fp32 (any sign of scale works) and mask the tokens past the end (only a last stage has any).
    const int valid_tokens = end - stage_start(stage);  // >= 1
#pragma unroll
    for (int j = 0; j < kWarpTokens / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = j * 8 + lane_col + (e & 1) < valid_tokens ? s[j][e] * scale_log2 : -INFINITY;
      }
    }

    // Online softmax. Every stage holds a valid first token, so each row's new max is finite and the first
    // correction is exp2(-inf) = 0.
    float correction[2];
    minivllm::online_softmax_step(s, row_max, row_sum, correction);
    // Past the first stages a row's max rarely moves: skip the D/2 multiplies when no row of the warp needs them.
    if (!__all_sync(0xffffffffu, correction[0] == 1.f && correction[1] == 1.f)) {
#pragma unroll
      for (int d = 0; d < kHeadDim / 8; ++d) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[d][e] *= correction[e / 2];
      }
    }

    // O += P V: two adjacent 8-token accumulator tiles are the A fragment of one 16-token k step.
#pragma unroll
    for (int kk = 0; kk < kWarpTokens / 16; ++kk) {
      const uint32_t p_frag[4] = {
          ptx::pack2<T>(s[2 * kk][0], s[2 * kk][1]), ptx::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
          ptx::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), ptx::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < kHeadDim / 16; ++dd) {
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(b, buf + v_lane + kk * 16 * L::kRowBytes + dd * 32);
        ptx::mma_16816<T>(acc[2 * dd], p_frag, b[0], b[1]);
        ptx::mma_16816<T>(acc[2 * dd + 1], p_frag, b[2], b[3]);
      }
    }
  }

  // Merge of the warps: each writes its rows' (max, sum, O) into its own, now idle, pipeline buffers.
  ptx::cp_async_wait<0>();
  __syncwarp();
  float* scratch = reinterpret_cast<float*>(smem + warp * L::kWarpBytes);
  float* stats = scratch + L::kStatsOffset;  // [max of row 0..15][sum of row 0..15]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    const int row = lane / 4 + 8 * h;
    if (lane % 4 == 0) {
      stats[row] = row_max[h];
      stats[kMaxHeads + row] = row_sum[h];
    }
    if (row < num_heads) {
#pragma unroll
      for (int d = 0; d < kHeadDim / 8; ++d) {
        *reinterpret_cast<float2*>(scratch + row * L::kScratchStride + d * 8 + lane_col) =
            make_float2(acc[d][2 * h], acc[d][2 * h + 1]);
      }
    }
  }
  __syncthreads();

  // out = sum_w 2^(max_w - max) O_w / sum_w 2^(max_w - max) sum_w, 8 dims of one head a thread.
  for (int item = tid; item < num_heads * L::kChunks; item += kThreads) {
    const int h = item / L::kChunks, c = item % L::kChunks;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      m = fmaxf(m, reinterpret_cast<const float*>(smem + w * L::kWarpBytes)[L::kStatsOffset + h]);
    }
    float sum = 0.f, o[8] = {};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* ws = reinterpret_cast<const float*>(smem + w * L::kWarpBytes);
      const float warp_max = ws[L::kStatsOffset + h];
      if (warp_max == -INFINITY) continue;  // a warp without tokens in this split (or an empty context)
      const float weight = exp2f(warp_max - m);
      sum += weight * ws[L::kStatsOffset + kMaxHeads + h];
      const float4* ow = reinterpret_cast<const float4*>(ws + h * L::kScratchStride + c * 8);
      const float4 lo = ow[0], hi = ow[1];
      o[0] += weight * lo.x, o[1] += weight * lo.y, o[2] += weight * lo.z, o[3] += weight * lo.w;
      o[4] += weight * hi.x, o[5] += weight * hi.y, o[6] += weight * hi.z, o[7] += weight * hi.w;
    }
    // An empty context (padding rows of a captured batch) gives sum 0: write zeros, not NaN.
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv_sum;
    const int head = head0 + h;
    if (writes_output) {
      T* out = static_cast<T*>(a.out) + (int64_t(seq) * a.num_heads + head) * kHeadDim;
      reinterpret_cast<uint4*>(out)[c] = make_uint4(ptx::pack2<T>(o[0], o[1]), ptx::pack2<T>(o[2], o[3]),
                                                    ptx::pack2<T>(o[4], o[5]), ptx::pack2<T>(o[6], o[7]));
    } else {
      const int64_t row = (int64_t(seq) * a.num_heads + head) * p.num_splits + split;
      float4* out = reinterpret_cast<float4*>(p.partial_out + row * kHeadDim + c * 8);
      out[0] = make_float4(o[0], o[1], o[2], o[3]);
      out[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (c == 0) p.partial_lse[row] = m + log2f(sum);
    }
  }
  if (writes_output) return;

  // The last of the used splits to get here merges them all (the classic threadfence reduction): every
  // thread's partials are visible GPU-wide before the count that says they are written.
  const int used = (context + split_tokens - 1) / split_tokens;  // the splits that did not return at once
  if (!last_to_arrive(p.split_counters + work, used)) return;
  for (int item = tid; item < num_heads * (kHeadDim / 2); item += kThreads) {
    const int h = item / (kHeadDim / 2), d = 2 * (item % (kHeadDim / 2));
    merge_splits<T, kHeadDim>(p, int64_t(seq) * a.num_heads + head0 + h, d, used);
  }
  if (tid == 0) p.split_counters[work] = 0;  // ready for the next launch
}

}  // namespace minivllm::decode
