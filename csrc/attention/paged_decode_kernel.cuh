// Paged-attention decode: one query token per sequence against its K/V pages.
//
// One CTA serves one (sequence, kv head, chunk of up to kMaxHeads query heads of that kv head's GQA group,
// split of the context). It streams its context through shared memory in tiles of kTile tokens, the next
// tile loading (cp.async, no registers held by loads in flight) while this one is used, so each K/V row is
// read from memory once and used by every query head of the group. Per tile:
//   1. scores: four threads per token, each dotting a quarter of the row with every query head (q in
//      shared memory, pre-scaled by scale * log2(e) so the softmax can use exp2);
//   2. online softmax: the tile's max per head across the CTA, probabilities into shared memory, running
//      max and per-thread running sums rescaled;
//   3. P.V: each thread owns 8 output dims of one head and a strided subset of the tile's tokens, so
//      small groups spread the tokens over more threads.
// Long contexts are split, so that every SM gets work of about equal size: each split writes a normalised
// partial output and its log-sum-exp, and merge_splits_kernel combines them. The split size comes from the
// batch's total context (split_tiles below), read on the device, so a captured graph adapts to each step's
// lengths; only the grid's bound on splits per sequence is fixed by shapes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "paged_decode.cuh"

namespace minivllm::decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;                           // tokens per pipeline stage
constexpr int kStages = 2;                          // tiles in shared memory: one loading while one computes
constexpr int kCtasPerSm = 3;                       // 24 warps an SM: enough ready warps to hide latency
constexpr int kThreadsPerToken = kThreads / kTile;  // score phase: threads sharing one K row
constexpr int kMaxHeads = 8;                        // query heads one CTA serves; larger groups take more CTAs
constexpr int kVec = 8;                             // elements in one 16-byte access
constexpr int kMaxSplits = 128;
constexpr int kGridWaves = 8;       // the grid holds (sequence, split) CTAs for about this many waves
constexpr int kUnsplitWaves = 4;    // ... unless whole sequences fill this many
constexpr float kCtaCostTiles = 4;  // fixed cost of a CTA (start, merge), in tiles of streaming (a sweep: NOTES)
static_assert(kThreadsPerToken == 4, "the swizzle below assumes four threads per K row in the score phase");

template <int kHeadDim>
struct Layout {
  static constexpr int kChunks = kHeadDim / kVec;     // 16-byte chunks in one K or V row
  static constexpr int kPvSlots = kThreads / kChunks;  // P.V: thread groups of kChunks threads, one row each
  static constexpr int kTileChunks = kTile * kChunks;  // chunks in one K (or V) tile
  // Shared memory, in bytes: kStages x (K tile, V tile), q [kMaxHeads][kHeadDim] and
  // p [kMaxHeads][kTile] in fp32, per-warp partial maxima or sums [kWarps][kMaxHeads].
  static constexpr int kTileBytes = kStages * 2 * kTileChunks * 16;
  static constexpr int kQBytes = kMaxHeads * kHeadDim * 4;
  static constexpr int kPBytes = kMaxHeads * kTile * 4;
  static constexpr int kSmemBytes = kTileBytes + kQBytes + kPBytes + kWarps * kMaxHeads * 4;
  static_assert(kPvSlots >= kMaxHeads, "P.V needs a thread group for every head");
  static_assert(kPvSlots * kChunks * kVec * 4 <= kTileBytes, "the final merge reuses the tile buffers");
};

// Position of chunk `chunk` of tile row `row`, in 16-byte units. Rows are 128 or 256 bytes, so without
// the XOR every row would start in the same bank; in the score phase a quarter-warp reads chunks 4i..4i+3
// of two consecutive rows, which the XOR on bit 2 spreads over all 8 16-byte bank groups.
template <int kChunks>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kChunks + (chunk ^ ((row & 1) << 2));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Eight fp16 or bf16 values packed in 16 bytes, widened to fp32.
template <typename scalar_t>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&out)[kVec]) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<scalar_t, at::Half>) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    } else {  // a bf16 is the top half of an fp32
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ uint4 from_float8(const float (&in)[kVec]) {
  uint4 raw;
  scalar_t* out = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = scalar_t(in[i]);
  return raw;
}

struct KernelParams {
  DecodeArgs args;
  int head_chunks;  // CTAs per kv head along the query heads: ceil(group / kMaxHeads)
  int num_splits;   // the grid's CTAs per (sequence, kv head, head chunk) along the context: at most this many
  int slots;        // CTAs the GPU holds at once
  float* partial_out;  // [batch * num_heads, num_splits, head_dim], when num_splits > 1
  float* partial_lse;  // [batch * num_heads, num_splits], log2 domain
};

// Tiles per split for a sequence of `tiles` tiles, the same in every CTA of the sequence and in the merge.
// A step's decode takes about (all tiles + kCtaCostTiles x CTAs) / slots + the longest CTA: splits of s tiles
// make about work / s CTAs, and s = sqrt(kCtaCostTiles x work / slots) minimises the sum. Work counts every
// (sequence, kv head, head chunk)'s tiles, from the batch's total context, over split_kv_heads heads (see
// DecodeArgs). Whatever that total says, a sequence never needs more splits than the grid has.
__device__ __forceinline__ int split_tiles(int tiles, int64_t total_context, const KernelParams& p) {
  const float work = float(max(total_context, int64_t(0))) / kTile * (p.args.split_kv_heads * p.head_chunks);
  const float balanced = ceilf(sqrtf(kCtaCostTiles * work / p.slots));
  const int whole = static_cast<int>(fminf(balanced, float(max(tiles, 1))));  // no split beyond the context
  return max(max(whole, 1), (tiles + p.num_splits - 1) / p.num_splits);
}

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) paged_decode_kernel(const KernelParams p) {
  using L = Layout<kHeadDim>;
  constexpr int kChunks = L::kChunks;
  const DecodeArgs& a = p.args;

  const int work = blockIdx.x;  // (sequence, kv head, head chunk)
  const int head_chunk = work % p.head_chunks;
  const int kv_head = (work / p.head_chunks) % a.num_kv_heads;
  const int seq = work / (p.head_chunks * a.num_kv_heads);
  const int split = blockIdx.y;
  const int group = a.num_heads / a.num_kv_heads;
  const int head0 = kv_head * group + head_chunk * kMaxHeads;  // first query head served here
  const int num_heads = min(kMaxHeads, group - head_chunk * kMaxHeads);

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
  const int num_tiles = begin < end ? (end - begin + kTile - 1) / kTile : 0;

  extern __shared__ __align__(16) unsigned char smem[];
  uint4* tiles = reinterpret_cast<uint4*>(smem);  // [kStages][K, V][kTile x kChunks], swizzled
  float* q_s = reinterpret_cast<float*>(smem + L::kTileBytes);
  float* p_s = q_s + kMaxHeads * kHeadDim;
  float* warp_s = p_s + kMaxHeads * kTile;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  // Loader: thread tid copies chunk tid % kChunks of rows tid / kChunks + i * kRowsPerPass of K and V.
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int load_chunk = tid % kChunks;
  const int load_row = tid / kChunks;
  const int32_t* table = a.block_tables + seq * a.block_table_stride;
  const int block_shift = __ffs(a.block_size) - 1;
  const int64_t token_stride = int64_t(a.num_kv_heads) * kHeadDim;
  const int64_t head_offset = int64_t(kv_head) * kHeadDim + load_chunk * kVec;
  auto load_tile = [&](int tile, int stage) {
    uint4* k_dst = tiles + stage * 2 * L::kTileChunks;
    uint4* v_dst = k_dst + L::kTileChunks;
#pragma unroll
    for (int i = 0; i < kTile / kRowsPerPass; ++i) {
      const int row = load_row + i * kRowsPerPass;
      const int pos = begin + tile * kTile + row;
      if (pos < end) {  // table entries past the last page may be garbage: never read them
        const int64_t page = __ldg(table + (pos >> block_shift));
        const int64_t offset = (page * a.block_size + (pos & (a.block_size - 1))) * token_stride + head_offset;
        const int dst = swizzle<kChunks>(row, load_chunk);
        cp_async_16(k_dst + dst, static_cast<const scalar_t*>(a.k_cache) + offset);
        cp_async_16(v_dst + dst, static_cast<const scalar_t*>(a.v_cache) + offset);
      }
    }
  };

  // Start the first tiles loading, then fetch q while they are in flight.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    cp_async_commit();
  }
  const float q_scale = a.scale * 1.4426950408889634f;  // log2(e): softmax in base 2
  for (int i = tid; i < num_heads * kChunks; i += kThreads) {
    const int h = i / kChunks, c = i % kChunks;
    const auto* src = static_cast<const scalar_t*>(a.q) + seq * a.q_stride_batch + (head0 + h) * a.q_stride_head;
    float v[kVec];
    to_float8<scalar_t>(*reinterpret_cast<const uint4*>(src + c * kVec), v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) q_s[h * kHeadDim + c * kVec + e] = v[e] * q_scale;
  }

  // Score phase: token `my_token` of the tile, chunks kThreadsPerToken * i + my_part of its row.
  const int my_token = tid / kThreadsPerToken;
  const int my_part = tid % kThreadsPerToken;
  // P.V phase: 8 dims (chunk pv_chunk) of head pv_head, tokens pv_lane, pv_lane + pv_lanes, ...
  const int pv_chunk = tid % kChunks;
  const int pv_slot = tid / kChunks;
  const int pv_lanes = L::kPvSlots / num_heads;
  const int pv_head = pv_slot % num_heads;
  const int pv_lane = pv_slot / num_heads;

  float running_max[kMaxHeads], running_sum[kMaxHeads];  // max: CTA-uniform; sum: this thread's tokens
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    running_max[h] = -INFINITY;
    running_sum[h] = 0.f;
  }
  float acc[kVec] = {};

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `tile` has landed for everyone, and everyone is done with tile - 1's buffer
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1, (tile + kStages - 1) % kStages);
    cp_async_commit();

    const uint4* k_tile = tiles + (tile % kStages) * 2 * L::kTileChunks;
    const uint4* v_tile = k_tile + L::kTileChunks;
    const int tile_tokens = min(kTile, end - begin - tile * kTile);

    // 1. Scores of this thread's token, summed over its quarter of the row and then the four threads.
    float score[kMaxHeads] = {};
    const bool token_valid = my_token < tile_tokens;
    if (token_valid) {
#pragma unroll
      for (int i = 0; i < kChunks / kThreadsPerToken; ++i) {
        const int c = i * kThreadsPerToken + my_part;
        float k[kVec];
        to_float8<scalar_t>(k_tile[swizzle<kChunks>(my_token, c)], k);
#pragma unroll
        for (int h = 0; h < kMaxHeads; ++h) {
          if (h < num_heads) {
            const float4* q4 = reinterpret_cast<const float4*>(q_s + h * kHeadDim + c * kVec);
            const float4 qa = q4[0], qb = q4[1];
            score[h] = fmaf(qa.x, k[0], score[h]);
            score[h] = fmaf(qa.y, k[1], score[h]);
            score[h] = fmaf(qa.z, k[2], score[h]);
            score[h] = fmaf(qa.w, k[3], score[h]);
            score[h] = fmaf(qb.x, k[4], score[h]);
            score[h] = fmaf(qb.y, k[5], score[h]);
            score[h] = fmaf(qb.z, k[6], score[h]);
            score[h] = fmaf(qb.w, k[7], score[h]);
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      if (h < num_heads) {
#pragma unroll
        for (int off = 1; off < kThreadsPerToken; off *= 2) score[h] += __shfl_xor_sync(0xffffffffu, score[h], off);
      }
      if (!token_valid) score[h] = -INFINITY;
    }

    // 2. The tile's max per head across the CTA (a token's threads hold equal scores: skip their xors).
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      if (h < num_heads) {
        float m = score[h];
#pragma unroll
        for (int off = 16; off >= kThreadsPerToken; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        if (lane == 0) warp_s[warp * kMaxHeads + h] = m;
      }
    }
    __syncthreads();
    float pv_correction = 0.f;  // rescales this thread's P.V accumulator to the new max of its head
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      if (h < num_heads) {
        float tile_max = warp_s[h];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, warp_s[w * kMaxHeads + h]);
        // Every tile holds a valid token, so new_max is finite and the first correction is exp2(-inf) = 0.
        const float new_max = fmaxf(running_max[h], tile_max);
        const float correction = exp2f(running_max[h] - new_max);
        running_max[h] = new_max;
        const float prob = exp2f(score[h] - new_max);  // 0 for tokens past the end
        running_sum[h] = running_sum[h] * correction + prob;
        if (my_part == 0) p_s[h * kTile + my_token] = prob;
        if (h == pv_head) pv_correction = correction;
      }
    }
    __syncthreads();

    // 3. acc = acc * correction + sum_t p[t] * v[t] over this thread's tokens.
    if (pv_lane < pv_lanes) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] *= pv_correction;
#pragma unroll 4
      for (int t = pv_lane; t < tile_tokens; t += pv_lanes) {
        const float prob = p_s[pv_head * kTile + t];
        float v[kVec];
        to_float8<scalar_t>(v_tile[swizzle<kChunks>(t, pv_chunk)], v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += prob * v[e];
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // tile buffers, p_s and warp_s are free for the merge below

  // Softmax denominators: only the first thread of each token counted its probabilities.
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    if (h < num_heads) {
      float s = my_part == 0 ? running_sum[h] : 0.f;
#pragma unroll
      for (int off = 16; off >= 1; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) warp_s[warp * kMaxHeads + h] = s;
    }
  }
  // Partial P.V sums of the token lanes, gathered per (head, chunk) by lane 0's threads.
  float* merge_s = reinterpret_cast<float*>(smem);  // [kPvSlots][kChunks][kVec]
  if (pv_lane > 0 && pv_lane < pv_lanes) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) merge_s[(pv_slot * kChunks + pv_chunk) * kVec + e] = acc[e];
  }
  __syncthreads();
  if (pv_lane != 0) return;

  for (int j = 1; j < pv_lanes; ++j) {
    const float* other = merge_s + ((j * num_heads + pv_head) * kChunks + pv_chunk) * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += other[e];
  }
  float sum = 0.f, head_max = 0.f;
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    if (h == pv_head) {
      head_max = running_max[h];
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_s[w * kMaxHeads + h];
    }
  }
  // An empty context (padding rows of a captured batch) gives sum 0: write zeros, not NaN.
  const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] *= inv_sum;

  const int head = head0 + pv_head;
  if (writes_output) {
    auto* out = static_cast<scalar_t*>(a.out) + (int64_t(seq) * a.num_heads + head) * kHeadDim;
    reinterpret_cast<uint4*>(out)[pv_chunk] = from_float8<scalar_t>(acc);
  } else {
    const int64_t row = (int64_t(seq) * a.num_heads + head) * p.num_splits + split;
    float4* out = reinterpret_cast<float4*>(p.partial_out + row * kHeadDim + pv_chunk * kVec);
    out[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    out[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    if (pv_chunk == 0) p.partial_lse[row] = head_max + log2f(sum);
  }
}

// out = sum_s 2^(lse_s - max) * partial_s / sum_s 2^(lse_s - max) over the splits that hold tokens.
// One CTA per (sequence, query head), one thread per output dim (one CTA a sequence, looping over the heads,
// made batch-1 decode slower: benchmarks/NOTES_decode.md). A context in one split was written by the decode
// kernel.
template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) merge_splits_kernel(const KernelParams p) {
  const DecodeArgs& a = p.args;
  const int row = blockIdx.x;  // sequence * num_heads + head
  const int seq = row / a.num_heads;
  const int d = threadIdx.x;
  const int tiles = (a.context_lens[seq] + kTile - 1) / kTile;
  const int per_split = split_tiles(tiles, *a.total_context, p);
  const int used = (tiles + per_split - 1) / per_split;
  if (used <= 1) return;
  const float* lse = p.partial_lse + int64_t(row) * p.num_splits;
  const float* partial = p.partial_out + int64_t(row) * p.num_splits * kHeadDim;

  float lse_max = -INFINITY;
  for (int s = 0; s < used; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < used; ++s) {
    const float w = exp2f(lse[s] - lse_max);
    num += w * partial[s * kHeadDim + d];
    den += w;
  }
  static_cast<scalar_t*>(a.out)[int64_t(row) * kHeadDim + d] = scalar_t(num / den);
}

// CTAs of the decode kernel one SM holds at once, read once per device.
template <typename scalar_t, int kHeadDim>
int resident_ctas_per_sm(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0: not read yet; racing threads write the same value
  TORCH_CHECK(device < kMaxDevices, "paged_attention_decode: device index ", device, " is beyond ", kMaxDevices);
  if (cache[device] == 0) {
    auto kernel = paged_decode_kernel<scalar_t, kHeadDim>;
    constexpr int smem = Layout<kHeadDim>::kSmemBytes;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
    cache[device] = std::max(ctas, 1);
  }
  return cache[device];
}

// The grid's splits per sequence, from shapes only (a captured graph stays valid for any lengths): enough
// CTAs for kGridWaves waves, so that split_tiles can cut any mix of lengths into pieces of about equal size.
// CTAs past their sequence's last split return at once, but not for free: where whole sequences already
// fill kUnsplitWaves waves, the tail is short and the grid does not split (a second, empty split and the merge
// cost more than the shorter tail wins: benchmarks/NOTES_decode.md).
inline int grid_splits(int work_items, int max_tokens, int resident_slots) {
  if (work_items >= kUnsplitWaves * resident_slots) return 1;
  const int max_tiles = (max_tokens + kTile - 1) / kTile;
  const int wanted = (kGridWaves * resident_slots + work_items - 1) / work_items;
  return std::clamp(wanted, 1, std::clamp(max_tiles, 1, kMaxSplits));
}

template <typename scalar_t, int kHeadDim>
void launch_paged_decode(const DecodeArgs& args, const c10::Device& device) {
  using L = Layout<kHeadDim>;
  KernelParams p{};
  p.args = args;
  const int group = args.num_heads / args.num_kv_heads;
  p.head_chunks = (group + kMaxHeads - 1) / kMaxHeads;
  const int work_items = args.batch * args.num_kv_heads * p.head_chunks;
  const int max_tokens = args.max_blocks * args.block_size;
  p.slots = resident_ctas_per_sm<scalar_t, kHeadDim>(device.index()) *
            at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
  const int64_t split_items = int64_t(args.batch) * args.split_kv_heads * p.head_chunks;  // as split_tiles counts
  p.num_splits = grid_splits(static_cast<int>(std::min<int64_t>(split_items, INT32_MAX)), max_tokens, p.slots);

  // Workspace sized by shapes alone; the caching allocator makes this safe inside graph capture.
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
    const int64_t rows = int64_t(args.batch) * args.num_heads * p.num_splits;
    partial_out = at::empty({rows, kHeadDim}, opts);
    partial_lse = at::empty({rows}, opts);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  const dim3 grid(work_items, p.num_splits);
  paged_decode_kernel<scalar_t, kHeadDim><<<grid, kThreads, L::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    merge_splits_kernel<scalar_t, kHeadDim><<<args.batch * args.num_heads, kHeadDim, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace minivllm::decode
