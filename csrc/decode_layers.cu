// decode_layers: every decoder layer of a small decode step (1..8 sequences, Qwen3's layer) in one persistent
// kernel, sm_90 and later (issue 17).
//
// Why: a batch-1 step as a chain of ~6 kernels a layer pays each kernel's ramp and drain; in that chain the four
// products cost 3.1x their weight-streaming floor and attention 8x its KV floor (benchmarks/NOTES_decode.md). Here
// one CTA an SM stays resident for the whole step, and the weights and KV bytes, which do not depend on this
// step's activations, stream without a break while the arithmetic follows the activations' dependencies.
//
// - Warp 8 of each CTA is the producer: it walks the CTA's share of the step's work items in order and copies each
//   item's bytes into a ring of 16 KB shared-memory slots, each with a full and an empty mbarrier; it waits only
//   for free slots, so it runs up to a ring's depth ahead, across stage and layer boundaries. A product's slot is 8
//   weight rows x 1024 of K (bulk copies: one where the rows are contiguous); an attention slot is 32 cached
//   tokens of one kv head's K and V (TMA boxes of 16 tokens from one tensor map over the whole cache).
// - Warps 0..7 consume. Per layer the stages are: qkv (input RMSNorm folded in), attention (q/k RMSNorm, rotary,
//   the new K/V into the cache, split-KV attention and its merge), o_proj + residual, gate_up (post-attention
//   RMSNorm folded in, SiLU-and-mul in the epilogue), down + residual. Items of a stage go to CTAs round-robin
//   (item i to CTA i % grid), so every CTA knows its order from the shapes and the context lengths alone.
// - A stage waits for the one before it through device-wide counters: a CTA done with its items of a stage adds 1
//   (release); a CTA's first item of a stage waits (acquire) until every CTA with items of the stage before has.
//   Data made in this kernel is read through L2 (__ldcg): L1 is not coherent between SMs.
// - Products: per slot, warp w takes 4 steps of 32 elements of K; lane (g, t) reads 16 bytes of weight row g and
//   of x row g at the same offset and feeds two mma.m16n8k16 (x's rows as A, weight rows as B's 8 columns; the
//   mapping of k inside an mma does not matter to a dot product, as in small_m_linear.cu). x is staged in shared
//   memory once a stage (normalised where a norm comes first, rounded as the unfused RMSNorm rounds); each warp's
//   partial sums of up to kFlushItems items meet in one epilogue.
// - Attention: an item is (sequence, kv head, split); a split is a run of at least kMinSplitChunks 32-token chunks,
//   splits per sequence up to about one wave of items. Each warp takes whole slots of the item (w, w + 8, ...) on the tensor
//   cores, as paged decode v6 does (query heads as the mma's rows, online softmax in registers, no CTA barrier a
//   slot); the warps' states merge once the item is done. The new token's K and V come from the qkv output
//   (normalised and rotated here) and are written to the cache by the item that holds that position; its cached
//   row is never read. The last split of a (sequence, kv head) to finish merges the partials.
// - With `timings`, thread 0 of each CTA stamps each stage's start, end of wait, end of staging, first slot in, last
//   slot done, signal and end, and optionally each ring slot's issue, wait and use
//   (benchmarks.decode_layers --stages). Measured figures and what bounds the kernel: benchmarks/NOTES_decode.md.
// Grid: one CTA an SM, all resident (the dependencies spin, so every CTA must run at once).
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>

#include <cmath>

#include "common/checks.h"
#include "common/convert.cuh"
#include "common/online_softmax.cuh"
#include "common/tensor_map.h"
#include "common/ptx.cuh"
#include "common/ptx_sm90.cuh"
#include "ops.h"

namespace {

using minivllm::str;

constexpr int kD = 128;               // head_dim
constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kMaxRows = 8;           // sequences: x's rows are the mma's A rows 0..7
constexpr int kMaxGroup = 8;          // query heads a kv head
constexpr int kSlotK = 1024;          // a weight row's elements a slot
constexpr int kSlotRows = 8;
constexpr int kSlotTokens = 32;
constexpr int kMaxSlots = 16;
constexpr int kMinSplitChunks = 4;    // a split's fewest slots (fewer split merges; H200: best of 1, 2, 4, 8 at 128..1k)
constexpr int kQPitch = kD + 8;       // elements of a staged q row: 16 bytes of padding for ldmatrix
constexpr int kXPad = 32;             // elements of padding a staged x row: row g + 1 starts 16 banks on
constexpr int kFlushItems = 8;        // product items whose partial sums wait in shared memory for one epilogue
constexpr int kStages = 5;
constexpr int kStamps = 7;
constexpr int kSlotStamps = 4096;  // slots a CTA stamps with timings (a batch-1 step at 32k has about 2,150)
constexpr int kSlotFields = 5;     // a slot's stamps: its stage, issued, asked, ready, done (see Plan::slot_stamp)
enum Stage { kQkv, kAttn, kO, kGateUp, kDown };
// The columns of the layer table, one row a layer: device pointers.
enum Field { kInputNorm, kQkvW, kQNorm, kKNorm, kOW, kPostNorm, kGateUpW, kDownW, kKCache, kVCache, kFields };

template <typename T>
constexpr int kSlotBytes = kSlotRows * kSlotK * sizeof(T);

// The products' partial sums [kFlushItems, warps, m, 8] (a multiple of 16 bytes).
__host__ __device__ constexpr int red_floats(int m) { return kFlushItems * kConsumerWarps * m * kSlotRows; }

// The attention warps' states on their way to warp 0 (merge_warps), past Scratch: sized by the group, not
// kMaxGroup, as every KB of shared memory not spent here is ring (a slot more keeps the products fed).
__host__ __device__ constexpr int merge_floats(int group) { return kConsumerWarps / 2 * group * (kD + 2); }

template <typename T>
struct Params {
  CUtensorMap kv_map;     // the whole cache [2, num_layers, blocks * block_size, kv_heads, D]: 16-token boxes
  const int64_t* layers;  // [num_layers, kFields]
  float* residual;        // [m, hidden]: in, the embeddings; out, the stream after the last layer
  const int64_t* positions;
  const int64_t* slot_mapping;
  const int* context_lens;  // including this step's token
  const int* block_tables;  // [m, block_table_stride]
  const float* cos;         // [max_position, D]
  const float* sin;
  T* qkv;                   // [m, (num_heads + 2 * num_kv_heads) * D]
  T* attn_out;              // [m, num_heads * D]
  T* h;                     // [m, intermediate]
  float* partial_o;         // [m, num_heads, splits, D]
  float* partial_lse;       // [m, num_heads, splits]
  int* counters;            // [num_layers, kStages], then [num_layers, m, num_kv_heads]
  int64_t* timings;         // [grid, num_layers, kStages, kStamps] or nullptr (see consume)
  int64_t* slot_timings;    // [grid, kSlotStamps, kSlotFields] or nullptr (see Plan::slot_stamp)
  int64_t block_table_stride;
  int64_t max_position;
  int64_t num_cache_slots;
  int num_layers, m, hidden, num_heads, num_kv_heads, intermediate, block_size, splits, num_slots, x_pitch;
  float eps;
  float scale_log2;  // softmax scale * log2(e)
};

// Shared memory past the ring and the staged x.
struct Scratch {
  alignas(16) uint16_t q[16][kQPitch];                  // the item's query heads in T, the mma's A rows
  float sum_sq[kMaxRows];
  alignas(16) uint16_t new_kv[2][kD];  // this step's k and v of the item's kv head, in T
  uint64_t full[kMaxSlots], empty[kMaxSlots];
  int lens[kMaxRows];
  int last;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

namespace ptx = minivllm::ptx;
using minivllm::from_float;
using minivllm::to_float;
constexpr int kStepsPerWarp = kSlotK / 32 / kConsumerWarps;  // 32 elements of K a step
constexpr int kBarrierConsumers = 1;  // named barrier of the 8 consumer warps

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// The work of a stage, the same for producer and consumers.
template <typename T>
struct Plan {
  const Params<T>& p;
  const Scratch& s;
  __device__ int qkv_rows() const { return (p.num_heads + 2 * p.num_kv_heads) * kD; }
  __device__ int group() const { return p.num_heads / p.num_kv_heads; }
  // An attention item: tokens [begin, end) of sequence m for kv head `head`, in chunks [chunk_begin, chunk_end).
  struct AttnItem {
    int m, head, split, splits, len, begin, end, chunk_begin, chunk_end;
  };
  __device__ int splits_of(int len) const {
    const int chunks = (len + kSlotTokens - 1) / kSlotTokens;
    return max(1, min(p.splits, chunks / kMinSplitChunks));
  }
  __device__ AttnItem attn_item(int item) const {
    for (int m = 0;; ++m) {
      const int len = s.lens[m], splits = splits_of(len), n = p.num_kv_heads * splits;
      if (item < n || m == p.m - 1) {
        AttnItem it{m, item / splits, item % splits, splits, len, 0, 0, 0, 0};
        const int chunks = (len + kSlotTokens - 1) / kSlotTokens;
        it.chunk_begin = it.split * chunks / splits;
        it.chunk_end = (it.split + 1) * chunks / splits;
        it.begin = it.chunk_begin * kSlotTokens;
        it.end = min(it.chunk_end * kSlotTokens, len);
        return it;
      }
      item -= n;
    }
  }
  __device__ int items(int stage) const {
    switch (stage) {
      case kQkv: return qkv_rows() / kSlotRows;
      case kAttn: {
        int n = 0;
        for (int m = 0; m < p.m; ++m) n += p.num_kv_heads * splits_of(s.lens[m]);
        return n;
      }
      case kO: return p.hidden / kSlotRows;
      case kGateUp: return p.intermediate / (kSlotRows / 2);
      default: return p.hidden / kSlotRows;
    }
  }
  // K of a product stage (its slots an item: K / kSlotK).
  __device__ int k_of(int stage) const {
    return stage == kO ? p.num_heads * kD : stage == kDown ? p.intermediate : p.hidden;
  }
  // The stage before this one (in this layer, or the last of the layer before): its counter and how many CTAs
  // count in it, those with an item of it (none before the first qkv).
  __device__ int dependency(int layer, int stage, int*& counter) const {
    const int flat = layer * kStages + stage - 1;
    if (flat < 0) return 0;
    counter = p.counters + flat;
    return min(items(stage == kQkv ? kDown : stage - 1), static_cast<int>(gridDim.x));
  }
  __device__ const T* field(int layer, Field f) const {
    return reinterpret_cast<const T*>(p.layers[layer * kFields + f]);
  }
  // With slot timings, the CTA's first kSlotStamps slots get [layer * kStages + stage, issued, asked, ready, done]: the
  // global timer (ns) when the producer had the slot free and issued its copies, and, seen by warp 0 (products) or
  // the warp that takes the slot (attention), when it began to wait for the slot, when the bytes were in, and when
  // it was done with them (benchmarks.decode_layers --stages: is the producer ahead, what a slot costs).
  __device__ void slot_stamp(int pos, int field, int64_t value) const {
    if (p.slot_timings == nullptr || pos >= kSlotStamps) return;
    p.slot_timings[(int64_t(blockIdx.x) * kSlotStamps + pos) * kSlotFields + field] = value;
  }
  __device__ void slot_time(int pos, int field) const {
    if (p.slot_timings != nullptr) slot_stamp(pos, field, ptx::global_timer_ns());
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The producer warp.

// An attention item's cached K and V, 32 tokens a slot: K then V, each two slabs [32 rows][64 dims] with 128-byte
// swizzled rows (attend_slot's ldmatrix reads them without bank conflicts). A row is one token's head, 256
// contiguous bytes of the cache; the 16 rows of a half slot lie in one page (the block size is a multiple of 16):
// per half slot, one TMA box of 16 rows x 64 dims for each slab of K and V (copies of single rows cost the TMA
// unit, or one warp's cp.async, about 2 us a slot). Lane h < 2 loads half h's page a slot ahead, so that its latency
// hides behind the copies. The sequence's last token is this step's, made by the consumers: its row is loaded
// with its box but never read.
template <typename T, typename Claim>
__device__ void produce_kv(const Plan<T>& plan, int layer, const typename Plan<T>::AttnItem& it, int& pos,
                           Claim& claim) {
  const Params<T>& p = plan.p;
  constexpr int kHalf = kSlotTokens / 2;
  constexpr uint32_t kBoxBytes = kHalf * kD * sizeof(T);
  const int lane = threadIdx.x % 32;
  const int cached_end = min(it.end, it.len - 1);
  auto slot_of = [&](int c) {  // the cache slot of half `lane`'s first token, or -1 when it has no cached token
    const int token = c * kSlotTokens + lane * kHalf;
    if (lane >= 2 || token >= cached_end) return -1;
    return p.block_tables[it.m * p.block_table_stride + token / p.block_size] * p.block_size + token % p.block_size;
  };
  int first = slot_of(it.chunk_begin);
  for (int c = it.chunk_begin; c < it.chunk_end; ++c, ++pos) {
    const int next = c + 1 < it.chunk_end ? slot_of(c + 1) : -1;
    uint32_t full;
    const uint32_t dst = claim(full);
    const int halves = __popc(__ballot_sync(0xffffffffu, first >= 0));
    if (lane == 0) ptx::mbarrier_arrive_expect_tx(full, halves * 2 * kBoxBytes);
    __syncwarp();
    if (first >= 0) {  // K then V, each as two slabs of 64 dims (128-byte swizzled rows), half `lane`'s 16 rows
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
#pragma unroll
        for (int slab = 0; slab < 2; ++slab) {
          const uint32_t at = dst + (kv * 2 + slab) * kSlotTokens * 128 + lane * kHalf * 128;
          ptx::tma_load_5d(at, &p.kv_map, full, slab * 64, it.head, first, layer, kv);
        }
      }
    }
    if (lane != 0) ptx::mbarrier_arrive(full);
    first = next;
  }
}

template <typename T>
__device__ void produce(const Plan<T>& plan, char* ring, Scratch& s) {
  const Params<T>& p = plan.p;
  const int lane = threadIdx.x % 32;
  int pos = 0;
  // The next slot, once free: its shared address, and its full barrier, which all 32 lanes arrive at.
  auto claim = [&](uint32_t& full) {
    const int r = pos % p.num_slots;
    ptx::mbarrier_wait(ptx::smem_address(&s.empty[r]), ((pos / p.num_slots) & 1) ^ 1);
    if (lane == 0) plan.slot_time(pos, 1);
    full = ptx::smem_address(&s.full[r]);
    return ptx::smem_address(ring + int64_t(r) * kSlotBytes<T>);
  };
  for (int layer = 0; layer < p.num_layers; ++layer) {
    for (int stage = 0; stage < kStages; ++stage) {
      const int n = plan.items(stage);
      for (int item = blockIdx.x; item < n; item += gridDim.x) {
        if (stage == kAttn) {
          produce_kv(plan, layer, plan.attn_item(item), pos, claim);
          continue;
        }
        const Field f = stage == kQkv ? kQkvW : stage == kO ? kOW : stage == kGateUp ? kGateUpW : kDownW;
        const T* weight = plan.field(layer, f);
        const int k = plan.k_of(stage);
        // Slot row g: weight row 8i + g, or with the SiLU gate gate rows 4i.. then up rows I + 4i..
        const int first_row = stage == kGateUp ? item * 4 : item * kSlotRows;
        auto row_of = [&](int g) {
          return stage == kGateUp && g >= 4 ? p.intermediate + first_row + g - 4 : first_row + g;
        };
        for (int c = 0; c < k / kSlotK; ++c, ++pos) {
          uint32_t full;
          const uint32_t dst = claim(full);
          if (lane == 0) {
            ptx::mbarrier_arrive_expect_tx(full, kSlotBytes<T>);
            if (k == kSlotK) {  // the rows are contiguous: one copy (two with the SiLU gate's halves)
              const int runs = stage == kGateUp ? 2 : 1, rows = kSlotRows / runs;
              for (int run = 0; run < runs; ++run) {
                const T* src = weight + int64_t(row_of(run * rows)) * k;
                ptx::bulk_copy_to_shared(dst + run * rows * kSlotK * sizeof(T), src, rows * kSlotK * sizeof(T), full);
              }
            }
          }
          __syncwarp();
          if (k != kSlotK && lane < kSlotRows) {  // a row's 1024 elements of this slot
            ptx::bulk_copy_to_shared(dst + lane * kSlotK * sizeof(T), weight + int64_t(row_of(lane)) * k + c * kSlotK,
                                     kSlotK * sizeof(T), full);
          }
          if (lane != 0) ptx::mbarrier_arrive(full);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The consumer warps.

__device__ __forceinline__ void consumers_sync() { ptx::named_barrier_sync(kBarrierConsumers, kConsumers); }

// Thread 0 spins until *counter >= target, then every consumer may read what the counted CTAs wrote.
__device__ void wait_for(const int* counter, int target) {
  if (threadIdx.x == 0) {
    while (ptx::load_acquire_gpu(counter) < target) __nanosleep(32);
  }
  consumers_sync();
}

// This CTA is done with a stage: the barrier orders every consumer's global writes before thread 0's release of
// the count (CUTLASS's generic barrier: release and acquire, no separate fence).
__device__ void signal(int* counter) {
  consumers_sync();
  if (threadIdx.x == 0) ptx::add_release_gpu(counter, 1);
}

// x for a product stage into shared memory [m, x_pitch] in T: rms_norm(residual) * gamma (qkv, gate_up), rounded
// as the unfused RMSNorm rounds (to T, then times gamma, to T), or a copy of attn_out (o) or h (down). It waits for
// the stage before (counter, target; nullptr: nothing) once what does not depend on it is loaded, and thread 0
// stamps the time after the wait at `waited`.
template <typename T>
__device__ void stage_x(const Plan<T>& plan, int layer, int stage, T* xs, Scratch& s, const int* counter, int target,
                        int64_t* waited) {
  const Params<T>& p = plan.p;
  const int k = plan.k_of(stage);
  auto wait = [&] {
    if (counter != nullptr) wait_for(counter, target);
    if (waited != nullptr && threadIdx.x == 0) *waited = ptx::global_timer_ns();
  };
  if (stage == kO || stage == kDown) {
    wait();
    const T* src = stage == kO ? p.attn_out : p.h;
    const int vecs = k / 8;  // 16-byte chunks a row
    for (int i = threadIdx.x; i < p.m * vecs; i += kConsumers) {
      const int m = i / vecs, v = i % vecs;
      const uint4 chunk = __ldcg(reinterpret_cast<const uint4*>(src + int64_t(m) * k) + v);
      *reinterpret_cast<uint4*>(xs + m * p.x_pitch + v * 8) = chunk;
    }
    consumers_sync();
    return;
  }
  // One read of the residual: the first kHeld float4s a thread stay in registers for the second pass, with their
  // gamma, loaded before the wait. k is a multiple of 1024, so a warp's 32 consecutive float4s lie in one row and
  // its sum goes in with one atomic.
  constexpr int kHeld = 8;  // all of 8 rows at hidden 1024
  const float4* residual = reinterpret_cast<const float4*>(p.residual);
  const int quads = k / 4, total = p.m * quads;
  const T* gamma = plan.field(layer, stage == kQkv ? kInputNorm : kPostNorm);
  auto gamma_of = [&](int i) { return __ldg(reinterpret_cast<const uint2*>(gamma) + i % quads); };
  float4 held[kHeld];
  uint2 held_gamma[kHeld];
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = threadIdx.x + j * kConsumers;
    if (i < total) held_gamma[j] = gamma_of(i);
  }
  if (threadIdx.x < kMaxRows) s.sum_sq[threadIdx.x] = 0.f;
  wait();  // (its barrier also orders the zeros before the sums)
  auto add_squares = [&](int i, const float4& v) {
    float sum = v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % 32 == 0) atomicAdd(&s.sum_sq[i / quads], sum);
  };
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = threadIdx.x + j * kConsumers;
    if (i < total) add_squares(i, held[j] = __ldcg(residual + i));
  }
  for (int i = threadIdx.x + kHeld * kConsumers; i < total; i += kConsumers) add_squares(i, __ldcg(residual + i));
  consumers_sync();
  auto normalise = [&](int i, const float4& v, const uint2& g) {
    const int m = i / quads, e = (i % quads) * 4;
    const float inv_rms = rsqrtf(s.sum_sq[m] / k + p.eps);
    const float x[4] = {v.x, v.y, v.z, v.w};
    const T* gm = reinterpret_cast<const T*>(&g);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      xs[m * p.x_pitch + e + j] = from_float<T>(to_float(gm[j]) * round_to<T>(x[j] * inv_rms));
    }
  };
#pragma unroll
  for (int j = 0; j < kHeld; ++j) {
    const int i = threadIdx.x + j * kConsumers;
    if (i < total) normalise(i, held[j], held_gamma[j]);
  }
  for (int i = threadIdx.x + kHeld * kConsumers; i < total; i += kConsumers) {
    normalise(i, __ldcg(residual + i), gamma_of(i));
  }
  consumers_sync();
}

// Products of a CTA's items 8 weight rows (with the SiLU gate 4 gate and 4 up rows) each, over the slots of an
// item; each warp's partial sums [m, 8] of an item go to red[item % kFlushItems], and every kFlushItems items (and
// after the last) one barrier, then the epilogue of those items. With stamps (the stage's, see consume), thread 0
// stamps when the first slot is in and when the last one is done.
template <typename T>
__device__ void product_stage(const Plan<T>& plan, int layer, int stage, int& pos, const char* ring, const T* xs,
                              float* red, Scratch& s, int64_t* stamps) {
  const Params<T>& p = plan.p;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const bool row_valid = g < p.m;
  const int n = plan.items(stage), slots = plan.k_of(stage) / kSlotK;
  const int cols = stage == kGateUp ? kSlotRows / 2 : kSlotRows;
  auto red_at = [&](int j, int w, int m, int col) -> float& {
    return red[((j * kConsumerWarps + w) * p.m + m) * kSlotRows + col];
  };
  // The ring position as slot and phase, advanced a slot at a time (no division a slot).
  int r = pos % p.num_slots, phase = (pos / p.num_slots) & 1;
  const bool stamp_slots = p.slot_timings != nullptr && threadIdx.x == 0;
  int pending = 0, first = blockIdx.x;
  for (int item = blockIdx.x; item < n; item += gridDim.x) {
    float acc[2][4] = {};
    for (int c = 0; c < slots; ++c, ++pos) {
      if (stamp_slots) plan.slot_time(pos, 2);
      ptx::mbarrier_wait(ptx::smem_address(&s.full[r]), phase);
      if (stamp_slots) plan.slot_time(pos, 3);
      if (stamps != nullptr && threadIdx.x == 0 && item == blockIdx.x && c == 0) stamps[4] = ptx::global_timer_ns();
      const T* w_row = reinterpret_cast<const T*>(ring + int64_t(r) * kSlotBytes<T>) + g * kSlotK;
      const T* x_row = xs + (row_valid ? g : 0) * p.x_pitch + c * kSlotK;
#pragma unroll
      for (int i = 0; i < kStepsPerWarp; ++i) {
        const int e = ((warp * kStepsPerWarp + i) * 4 + t) * 8;
        const uint4 w = *reinterpret_cast<const uint4*>(w_row + e);
        const uint4 x = row_valid ? *reinterpret_cast<const uint4*>(x_row + e) : make_uint4(0, 0, 0, 0);
        const uint32_t a0[4] = {x.x, 0u, x.y, 0u}, a1[4] = {x.z, 0u, x.w, 0u};
        ptx::mma_16816<T>(acc[0], a0, w.x, w.y);
        ptx::mma_16816<T>(acc[1], a1, w.z, w.w);
      }
      __syncwarp();
      if (lane == 0) ptx::mbarrier_arrive(ptx::smem_address(&s.empty[r]));
      if (stamp_slots) {
        plan.slot_time(pos, 4);
        plan.slot_stamp(pos, 0, layer * kStages + stage);
      }
      if (++r == p.num_slots) r = 0, phase ^= 1;
    }
    // acc[.][0..1]: x row g, B columns 2t, 2t + 1 (rows g + 8 are padding).
    if (row_valid) {
      red_at(pending, warp, g, 2 * t) = acc[0][0] + acc[1][0];
      red_at(pending, warp, g, 2 * t + 1) = acc[0][1] + acc[1][1];
    }
    if (++pending < kFlushItems && item + gridDim.x < n) continue;
    if (stamps != nullptr && threadIdx.x == 0 && item + gridDim.x >= n) stamps[5] = ptx::global_timer_ns();
    consumers_sync();
    for (int o = threadIdx.x; o < pending * p.m * cols; o += kConsumers) {
      const int j = o / (p.m * cols), m = o / cols % p.m, c = o % cols, out_item = first + j * gridDim.x;
      auto column = [&](int col) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kConsumerWarps; ++w) sum += red_at(j, w, m, col);
        return sum;
      };
      if (stage == kQkv) {
        p.qkv[int64_t(m) * plan.qkv_rows() + out_item * kSlotRows + c] = from_float<T>(column(c));
      } else if (stage == kGateUp) {
        const float gate = column(c), up = column(c + cols);
        p.h[int64_t(m) * p.intermediate + out_item * cols + c] = from_float<T>(gate / (1.f + __expf(-gate)) * up);
      } else {
        float* out = p.residual + int64_t(m) * p.hidden + out_item * kSlotRows + c;
        *out = __ldcg(out) + column(c);
      }
    }
    consumers_sync();  // red is free again
    first = item + gridDim.x;
    pending = 0;
  }
}

// What q/k normalisation and rotary need of a head besides its values, loaded before the wait for qkv: lane l
// holds elements l + 32 j (rotate_half's partners, j and j + 2, are in the same lane).
struct HeadConstants {
  float cos[4], sin[4], weight[4];
  bool norm;
};

template <typename T>
__device__ HeadConstants head_constants(const T* weight, const float* cos, const float* sin) {
  const int lane = threadIdx.x % 32;
  HeadConstants h;
  h.norm = weight != nullptr;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int d = lane + 32 * j;
    h.cos[j] = cos[d];
    h.sin[j] = sin[d];
    h.weight[j] = h.norm ? to_float(weight[d]) : 1.f;
  }
  return h;
}

// RMSNorm (when a weight) and the neox rotary embedding, as qk_norm_rope_cache.cu computes them, rounded to T.
template <typename T>
__device__ void norm_rope(float (&x)[4], const HeadConstants& h, float eps) {
  if (h.norm) {
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) sum_sq += x[j] * x[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    const float inv_rms = rsqrtf(sum_sq / kD + eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = round_to<T>(h.weight[j] * round_to<T>(x[j] * inv_rms));
  }
  float out[4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    out[j] = round_to<T>(x[j] * h.cos[j] - x[j + 2] * h.sin[j]);
    out[j + 2] = round_to<T>(x[j + 2] * h.cos[j + 2] + x[j] * h.sin[j + 2]);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) x[j] = out[j];
}

// Attention of one warp over 32-token slots, on the tensor cores (as paged decode v6): the item's query heads are
// the 16 rows of mma.m16n8k16's A (rows past the group are zeros), held as fragments for the whole item;
//   S = Q K^T  (K rows through ldmatrix: B's columns), scaled in fp32, tokens past the slot's cached ones masked;
//   online softmax per row in registers (a row lives in a quad: two shuffles, no barrier);
//   O += P V   (S's accumulators repacked as P's A fragments; V through ldmatrix.trans).
// Lane (g, t) holds rows g and g + 8 of every accumulator tile, columns 2t and 2t + 1 of it. A slot's K and V are
// each two 128-byte swizzled slabs of 32 rows (dims 0..63, 64..127), as the TMA boxes wrote them: chunk c of row r
// sits at chunk c ^ (r % 8).
struct WarpAttention {
  float acc[kD / 8][4];
  float row_max[2];
  float row_sum[2];  // this lane's columns; the quad is summed at the end
};

__device__ __forceinline__ uint32_t swizzled(uint32_t slab, int row, int chunk) {
  return slab + row * 128 + ((chunk ^ (row & 7)) << 4);
}

// exp2(a - b), 0 when both are -inf (a warp, or a merged state, that has seen no token).
__device__ __forceinline__ float rescale(float a, float b) { return b == -INFINITY ? 0.f : exp2f(a - b); }

template <typename T>
__device__ __forceinline__ void attend_slot(WarpAttention& w, uint32_t q_lane, uint32_t slot, int n, float scale_log2) {
  const int lane = threadIdx.x % 32;
  constexpr uint32_t kSlab = kSlotTokens * 128, kV = 2 * kSlab;
  float s[kSlotTokens / 8][4] = {};
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    // q's A fragment, from shared memory each time (held for the item, q's 32 registers spilled the accumulators)
    uint32_t q_frag[4];
    ptx::ldmatrix_x4(q_frag, q_lane + kk * 32);
    const int chunk = kk * 2 + (lane / 8) % 2;  // matrix j: keys +8 (j / 2), chunk +j % 2
#pragma unroll
    for (int nn = 0; nn < kSlotTokens / 16; ++nn) {
      uint32_t b[4];
      const int row = nn * 16 + (lane / 16) * 8 + lane % 8;
      ptx::ldmatrix_x4(b, swizzled(slot + (chunk / 8) * kSlab, row, chunk % 8));
      ptx::mma_16816<T>(s[2 * nn], q_frag, b[0], b[1]);
      ptx::mma_16816<T>(s[2 * nn + 1], q_frag, b[2], b[3]);
    }
  }
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < kSlotTokens / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = j * 8 + col + (e & 1) < n ? s[j][e] * scale_log2 : -INFINITY;
  }
  float correction[2];  // (n > 0: key 0 is a finite score of every row)
  minivllm::online_softmax_step(s, w.row_max, w.row_sum, correction);
#pragma unroll
  for (int d = 0; d < kD / 8; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w.acc[d][e] *= correction[e / 2];
  }
#pragma unroll
  for (int kk = 0; kk < kSlotTokens / 16; ++kk) {
    const uint32_t p_frag[4] = {
        ptx::pack2<T>(s[2 * kk][0], s[2 * kk][1]), ptx::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
        ptx::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), ptx::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
    const int row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;  // matrix j: keys +8 (j % 2), chunk +j / 2
#pragma unroll
    for (int dd = 0; dd < kD / 16; ++dd) {
      const int chunk = dd * 2 + lane / 16;
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, swizzled(slot + kV + (chunk / 8) * kSlab, row, chunk % 8));
      ptx::mma_16816<T>(w.acc[2 * dd], p_frag, b[0], b[1]);
      ptx::mma_16816<T>(w.acc[2 * dd + 1], p_frag, b[2], b[3]);
    }
  }
}

// Zeroes a slot's V rows n..31 (both slabs; a row's 128 bytes hold all its swizzled chunks). Their probabilities
// are 0, but the rows hold whatever the cache had past the sequence (the engine's cache starts zeroed, a caller's
// need not) or this step's stale row, and 0 times NaN or inf is NaN. The fence orders these writes before the TMA
// copies that refill the slot.
__device__ __forceinline__ void zero_v_tail(char* slot, int n) {
  constexpr int kSlab = kSlotTokens * 128;
  const int lane = threadIdx.x % 32;
  for (int i = n * 8 + lane; i < kSlotTokens * 8; i += 32) {  // 16-byte chunks of rows n.. in each V slab
    reinterpret_cast<uint4*>(slot + 2 * kSlab)[i] = make_uint4(0, 0, 0, 0);
    reinterpret_cast<uint4*>(slot + 3 * kSlab)[i] = make_uint4(0, 0, 0, 0);
  }
  ptx::fence_proxy_async_shared();
  __syncwarp();
}

// This step's token (K and V in shared memory, T) into a warp's state, on CUDA cores: lane (g, t) scores row g's
// dims 32t..32t+31 against k, the quad adds them up; row g's columns of the lane then take p v. Rows g + 8 are
// padding (a group has at most 8 query heads).
template <typename T>
__device__ __forceinline__ void attend_new_token(WarpAttention& w, const T* q, int q_pitch, const T* k, const T* v,
                                 float scale_log2) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float score = 0.f;
#pragma unroll 8
  for (int d = 32 * t; d < 32 * t + 32; ++d) score += to_float(q[g * q_pitch + d]) * to_float(k[d]);
  score += __shfl_xor_sync(0xffffffffu, score, 1);
  score += __shfl_xor_sync(0xffffffffu, score, 2);
  score *= scale_log2;
  const float m = fmaxf(w.row_max[0], score), correction = rescale(w.row_max[0], m), p = exp2f(score - m);
  w.row_max[0] = m;
  w.row_sum[0] = w.row_sum[0] * correction + (t == 0 ? p : 0.f);
#pragma unroll
  for (int d = 0; d < kD / 8; ++d) {
#pragma unroll
    for (int e = 0; e < 2; ++e) w.acc[d][e] = w.acc[d][e] * correction + p * to_float(v[8 * d + 2 * t + e]);
  }
}

// The warps' states merged into warp 0's, three rounds through shared memory (warps 4..7 into 0..3, 2..3 into
// 0..1, 1 into 0); merge [4][group][D + 2] floats (merge_floats): O, then max and the quad-summed sum, of each
// written row.
__device__ __forceinline__ void merge_warps(WarpAttention& w, int group, int active, float* merge) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  float sum = w.row_sum[0];
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  w.row_sum[0] = sum;
#pragma unroll
  for (int half = kConsumerWarps / 2; half >= 1; half /= 2) {
    if (half >= active) continue;  // warps `half` and up saw no slot: nothing to merge (uniform over the CTA)
    float* row = merge + ((warp % half) * group + g) * (kD + 2);
    if (warp >= half && warp < 2 * half && g < group) {
#pragma unroll
      for (int d = 0; d < kD / 8; ++d) {
        row[8 * d + 2 * t] = w.acc[d][0];
        row[8 * d + 2 * t + 1] = w.acc[d][1];
      }
      if (t == 0) {
        row[kD] = w.row_max[0];
        row[kD + 1] = w.row_sum[0];
      }
    }
    consumers_sync();
    if (warp < half && g < group) {
      const float other_max = row[kD], m = fmaxf(w.row_max[0], other_max);
      const float mine = rescale(w.row_max[0], m), theirs = rescale(other_max, m);
      w.row_max[0] = m;
      w.row_sum[0] = w.row_sum[0] * mine + row[kD + 1] * theirs;
#pragma unroll
      for (int d = 0; d < kD / 8; ++d) {
        w.acc[d][0] = w.acc[d][0] * mine + row[8 * d + 2 * t] * theirs;
        w.acc[d][1] = w.acc[d][1] * mine + row[8 * d + 2 * t + 1] * theirs;
      }
    }
    consumers_sync();
  }
}

// One attention item: (sequence, kv head, split). For the CTA's first item of the stage, counter and target say what
// to wait for once the constants are loaded (nullptr: nothing). With stamps (the stage's, see consume), thread 0
// stamps for the first item the time after the wait at [1] and [2] (attention stages nothing) and when its first
// slot is in at [4]; for every item, when its slots are done at [5] (the last item's stays).
template <typename T>
__device__ void attention_item(const Plan<T>& plan, int layer, int item, int& pos, char* ring, Scratch& s,
                               bool first, const int* counter, int target, int64_t* stamps) {
  const Params<T>& p = plan.p;
  const auto it = plan.attn_item(item);
  const int group = plan.group(), lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool has_new = it.len > 0 && it.len - 1 >= it.begin && it.len - 1 < it.end;
  T (*new_kv)[kD] = reinterpret_cast<T (*)[kD]>(s.new_kv);
  T* q_rows = reinterpret_cast<T*>(s.q);  // [16][kQPitch]: the mma's A, rows past the group zero (kernel start)
  // q heads, the new k and v: warp w takes vector w (w < group: q head; group: k; group + 1: v).
  const int64_t position = p.positions[it.m];
  CUDA_KERNEL_ASSERT(position >= 0 && position < p.max_position);
  const T* row = p.qkv + int64_t(it.m) * plan.qkv_rows();
  constexpr int kVecsPerWarp = (kMaxGroup + 2 + kConsumerWarps - 1) / kConsumerWarps;
  HeadConstants constants[kVecsPerWarp];
#pragma unroll
  for (int i = 0; i < kVecsPerWarp; ++i) {
    const int vec = warp + i * kConsumerWarps;
    if (vec <= group) {
      constants[i] = head_constants(plan.field(layer, vec < group ? kQNorm : kKNorm), p.cos + position * kD,
                                    p.sin + position * kD);
    }
  }
  if (counter != nullptr) wait_for(counter, target);
  if (first && stamps != nullptr && threadIdx.x == 0) stamps[1] = stamps[2] = ptx::global_timer_ns();
#pragma unroll
  for (int i = 0; i < kVecsPerWarp; ++i) {
    const int vec = warp + i * kConsumerWarps;
    if (vec >= group + 2) break;
    const int head = vec < group ? it.head * group + vec
                                 : p.num_heads + (vec == group ? 0 : p.num_kv_heads) + it.head;
    float x[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = to_float(__ldcg(row + head * kD + lane + 32 * j));
    if (vec <= group) norm_rope<T>(x, constants[i], p.eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (vec < group) {
        q_rows[vec * kQPitch + lane + 32 * j] = from_float<T>(x[j]);
      } else {
        new_kv[vec - group][lane + 32 * j] = from_float<T>(x[j]);
      }
    }
  }
  consumers_sync();
  if (has_new && threadIdx.x < 2 * kD) {
    const int64_t slot = p.slot_mapping[it.m];
    if (slot >= 0) {
      CUDA_KERNEL_ASSERT(slot < p.num_cache_slots);
      T* cache = const_cast<T*>(plan.field(layer, threadIdx.x < kD ? kKCache : kVCache));
      cache[(slot * p.num_kv_heads + it.head) * kD + threadIdx.x % kD] = new_kv[threadIdx.x / kD][threadIdx.x % kD];
    }
  }
  // This lane's row address of q's A fragments: matrix j of an ldmatrix is rows +8 (j % 2), chunk +j / 2.
  const uint32_t q_lane = ptx::smem_address(q_rows + (lane % 16) * kQPitch) + (lane / 16) * 16;
  // Warp w takes slots w, w + 8, ... of the item: no CTA barrier a slot; it frees each slot for the whole CTA.
  WarpAttention w;
#pragma unroll
  for (int d = 0; d < kD / 8; ++d) w.acc[d][0] = w.acc[d][1] = w.acc[d][2] = w.acc[d][3] = 0.f;
  w.row_max[0] = w.row_max[1] = -INFINITY;
  w.row_sum[0] = w.row_sum[1] = 0.f;
  const int slots = it.chunk_end - it.chunk_begin;
  for (int i = warp; i < slots; i += kConsumerWarps) {
    const int at = pos + i, r = at % p.num_slots;
    if (lane == 0) plan.slot_time(at, 2);
    ptx::mbarrier_wait(ptx::smem_address(&s.full[r]), (at / p.num_slots) & 1);
    if (lane == 0) plan.slot_time(at, 3);
    if (first && stamps != nullptr && threadIdx.x == 0 && i == 0) stamps[4] = ptx::global_timer_ns();
    const int c = it.chunk_begin + i;
    const int n = max(0, min(min(it.end, it.len - 1) - c * kSlotTokens, kSlotTokens));
    char* slot = ring + int64_t(r) * kSlotBytes<T>;
    if (n > 0 && n < kSlotTokens) zero_v_tail(slot, n);
    if (n > 0) attend_slot<T>(w, q_lane, ptx::smem_address(slot), n, p.scale_log2);
    __syncwarp();
    if (lane == 0) {
      ptx::mbarrier_arrive_count(ptx::smem_address(&s.empty[r]), kConsumerWarps);
      plan.slot_time(at, 4);
      plan.slot_stamp(at, 0, layer * kStages + kAttn);
    }
  }
  pos += slots;
  if (has_new && warp == 0) attend_new_token<T>(w, q_rows, kQPitch, new_kv[0], new_kv[1], p.scale_log2);
  if (stamps != nullptr && threadIdx.x == 0) stamps[5] = ptx::global_timer_ns();
  merge_warps(w, group, min(slots, kConsumerWarps), reinterpret_cast<float*>(&s + 1));

  // Warp 0's rows, normalised; one split writes attn_out, several write partials that the last of them merges.
  const int first_q = it.head * group, g = lane / 4, t = lane % 4;
  if (warp == 0 && g < group) {
    const float sum = w.row_sum[0], inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t head_row = int64_t(it.m) * p.num_heads + first_q + g;
    const int64_t at = head_row * p.splits + it.split;
#pragma unroll
    for (int d = 0; d < kD / 8; ++d) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * d + 2 * t + e;
        if (it.splits == 1) {
          p.attn_out[head_row * kD + col] = from_float<T>(w.acc[d][e] * inv);
        } else {
          p.partial_o[at * kD + col] = w.acc[d][e] * inv;
        }
      }
    }
    if (it.splits > 1 && t == 0) p.partial_lse[at] = sum > 0.f ? w.row_max[0] + __log2f(sum) : -INFINITY;
  }
  if (it.splits == 1) return consumers_sync();  // q, the new K/V and the merge buffer are free again
  int* arrivals = p.counters + p.num_layers * kStages + (layer * p.m + it.m) * p.num_kv_heads + it.head;
  consumers_sync();
  if (threadIdx.x == 0) s.last = ptx::fetch_add_acq_rel_gpu(arrivals, 1) == it.splits - 1;
  consumers_sync();
  if (!s.last) return;
  for (int o = threadIdx.x; o < group * kD; o += kConsumers) {
    const int g = o / kD, d = o % kD;
    const int64_t at = (int64_t(it.m) * p.num_heads + first_q + g) * p.splits;
    float lse_max = -INFINITY;
#pragma unroll 8
    for (int j = 0; j < it.splits; ++j) lse_max = fmaxf(lse_max, __ldcg(p.partial_lse + at + j));
    float num = 0.f, den = 0.f;
    if (lse_max > -INFINITY) {
#pragma unroll 8  // (the partials' loads in flight together)
      for (int j = 0; j < it.splits; ++j) {
        const float w = exp2f(__ldcg(p.partial_lse + at + j) - lse_max);
        num += w * __ldcg(p.partial_o + (at + j) * kD + d);
        den += w;
      }
    }
    p.attn_out[(int64_t(it.m) * p.num_heads + first_q + g) * kD + d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
  consumers_sync();
}

template <typename T>
__device__ void consume(const Plan<T>& plan, char* ring, T* xs, float* red, Scratch& s) {
  const Params<T>& p = plan.p;
  // With p.timings, thread 0's global timer (ns) at each of its stages' [0] start, [1] once the dependency is met,
  // [2] once x is staged, [3] once it has signalled, [4] once its first slot was in shared memory, [5] once its
  // last slot was done (warp 0's, before the barrier of the epilogue), [6] before it signals: where the step's time
  // goes (benchmarks.decode_layers --stages).
  auto stamps_of = [&](int layer, int stage) -> int64_t* {
    if (p.timings == nullptr) return nullptr;
    return p.timings + ((int64_t(blockIdx.x) * p.num_layers + layer) * kStages + stage) * kStamps;
  };
  auto stamp = [&](int64_t* stamps, int k) {
    if (stamps != nullptr && threadIdx.x == 0) stamps[k] = ptx::global_timer_ns();
  };
  int pos = 0;
  for (int layer = 0; layer < p.num_layers; ++layer) {
    for (int stage = 0; stage < kStages; ++stage) {
      const int n = plan.items(stage);
      if (blockIdx.x >= n) continue;
      int64_t* stamps = stamps_of(layer, stage);
      stamp(stamps, 0);
      int* counter = nullptr;
      const int target = plan.dependency(layer, stage, counter);
      if (stage == kAttn) {  // waits inside, once its first item's constants are loaded
        for (int item = blockIdx.x; item < n; item += gridDim.x) {
          const bool first = item == blockIdx.x;
          attention_item(plan, layer, item, pos, ring, s, first, first ? counter : nullptr, target, stamps);
        }
      } else {
        stage_x(plan, layer, stage, xs, s, counter, target, stamps == nullptr ? nullptr : stamps + 1);
        stamp(stamps, 2);
        product_stage(plan, layer, stage, pos, ring, xs, red, s, stamps);
      }
      stamp(stamps, 6);
      signal(p.counters + layer * kStages + stage);
      stamp(stamps, 3);  // (for attention, "work" is from its wait to here)
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_layers_kernel(const __grid_constant__ Params<T> p) {
  extern __shared__ __align__(128) char smem[];
  // The ring 1024-byte aligned (the 128-byte swizzle's atom, which the TMA boxes' addresses must start on) and
  // zeroed: a slot's rows past its tokens keep what the slot held before, which must be finite (probability 0
  // times NaN is NaN), and the first use of a slot finds what the kernel before left in shared memory.
  char* ring = smem + ((1024 - ptx::smem_address(smem) % 1024) % 1024);
  for (int i = threadIdx.x; i < p.num_slots * kSlotBytes<T> / 16; i += kThreads) {
    reinterpret_cast<uint4*>(ring)[i] = make_uint4(0, 0, 0, 0);
  }
  ptx::fence_proxy_async_shared();  // the zeros before the copies that overwrite them
  T* xs = reinterpret_cast<T*>(ring + int64_t(p.num_slots) * kSlotBytes<T>);
  float* red = reinterpret_cast<float*>(xs + int64_t(p.m) * p.x_pitch);
  Scratch& s = *reinterpret_cast<Scratch*>(red + red_floats(p.m));
  if (threadIdx.x < p.num_slots) {
    ptx::mbarrier_init(ptx::smem_address(&s.full[threadIdx.x]), 32);  // the producer's lanes
    ptx::mbarrier_init(ptx::smem_address(&s.empty[threadIdx.x]), kConsumerWarps);
  }
  if (threadIdx.x < kMaxRows) s.lens[threadIdx.x] = threadIdx.x < p.m ? p.context_lens[threadIdx.x] : 0;
  // q's rows past the group are the mma's padding: zero once (0 in fp16 and bf16), as items write only the group's
  for (int i = threadIdx.x; i < 16 * kQPitch; i += kThreads) s.q[i / kQPitch][i % kQPitch] = 0;
  ptx::fence_barrier_init();
  __syncthreads();
  const Plan<T> plan{p, s};
  if (threadIdx.x >= kConsumers) {
    produce(plan, ring, s);
  } else {
    consume(plan, ring, xs, red, s);
  }
}

#else  // older GPUs: never launched (the host refuses below sm_90)

template <typename T>
__global__ void decode_layers_kernel(const __grid_constant__ Params<T> p) {}

#endif

// The kernel's shared memory besides the ring: x staged, the products' partial sums, Scratch, the warps' merge,
// and up to 1 KB before the ring to align it.
template <typename T>
int64_t fixed_smem(int m, int x_pitch, int group) {
  return int64_t(m) * x_pitch * sizeof(T) + red_floats(m) * sizeof(float) + sizeof(Scratch) +
         merge_floats(group) * sizeof(float) + 1024;
}

template <typename T>
void launch(Params<T> p, int grid, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t available = int64_t(prop->sharedMemPerBlockOptin) - fixed_smem<T>(p.m, p.x_pitch, p.num_heads / p.num_kv_heads);
  p.num_slots = static_cast<int>(std::min<int64_t>(kMaxSlots, available / kSlotBytes<T>));
  // Attention's warps take a slot each, up to a warp's slot past the slowest one's: the ring must hold a slot a warp
  // so that no warp waits on a slot's phase one lap ahead.
  TORCH_CHECK(p.num_slots >= kConsumerWarps, "decode_layers: the staged activations leave room for ", p.num_slots,
              " ring slots in shared memory; the kernel needs ", kConsumerWarps, " (fewer rows or a smaller model)");
  const int64_t smem = int64_t(p.num_slots) * kSlotBytes<T> + fixed_smem<T>(p.m, p.x_pitch, p.num_heads / p.num_kv_heads);
  static const bool configured = [&] {  // one per instantiation (T)
    C10_CUDA_CHECK(cudaFuncSetAttribute(decode_layers_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(prop->sharedMemPerBlockOptin)));
    return true;
  }();
  (void)configured;
  decode_layers_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& residual, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == residual.device(), "decode_layers: ", name,
              " must be a CUDA tensor on residual's device ", residual.device().str(), ", got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == dtype, "decode_layers: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "decode_layers: ", name, " must be contiguous, got strides ", str(t.strides()));
}

}  // namespace

bool decode_layers_available() {
  return at::cuda::is_available() && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

void decode_layers(torch::Tensor& residual, const torch::Tensor& layers, const torch::Tensor& kv_cache,
                   const torch::Tensor& positions, const torch::Tensor& slot_mapping,
                   const torch::Tensor& context_lens, const torch::Tensor& block_tables, const torch::Tensor& cos,
                   const torch::Tensor& sin, int64_t num_heads, int64_t intermediate, double eps, double scale,
                   const std::optional<torch::Tensor>& timings) {
  TORCH_CHECK(residual.is_cuda() && residual.scalar_type() == at::kFloat && residual.dim() == 2 &&
                  residual.is_contiguous(),
              "decode_layers: residual must be a contiguous fp32 CUDA tensor [M, hidden], got ", residual.scalar_type(),
              " of shape ", str(residual.sizes()));
  TORCH_CHECK(decode_layers_available(), "decode_layers: the kernel needs an sm_90 or later GPU");
  const at::ScalarType dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "decode_layers: the model dtype ", dtype,
              " is not supported; use torch.float16 or torch.bfloat16");
  check_cuda(kv_cache, "kv_cache", residual, dtype);
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(0) == 2 && kv_cache.size(1) == layers.size(0) &&
                  kv_cache.size(3) % 16 == 0 && kv_cache.size(5) == kD,
              "decode_layers: kv_cache must be [2, num_layers, blocks, block_size, kv_heads, 128] with a block size "
              "that is a multiple of 16, got shape ", str(kv_cache.sizes()));
  const int64_t m = residual.size(0), hidden = residual.size(1), num_kv_heads = kv_cache.size(4);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "decode_layers: ", str(m), " rows; the kernel takes 1 to ", str(kMaxRows));
  const int64_t group = num_kv_heads > 0 && num_heads % num_kv_heads == 0 ? num_heads / num_kv_heads : 0;
  TORCH_CHECK(group == 1 || group == 2 || group == 4 || group == 8, "decode_layers: num_heads ", str(num_heads),
              " must be 1, 2, 4 or 8 times the ", str(num_kv_heads), " kv heads (query heads a kv head)");
  for (int64_t k : {hidden, num_heads * kD, intermediate}) {
    TORCH_CHECK(k > 0 && k % kSlotK == 0, "decode_layers: hidden, num_heads * 128 and intermediate must be "
                "positive multiples of ", str(kSlotK), ", got ", str(k));
  }
  check_cuda(layers, "layers", residual, at::kLong);
  TORCH_CHECK(layers.dim() == 2 && layers.size(1) == kFields && layers.size(0) >= 1 &&
                  layers.size(0) <= INT32_MAX,
              "decode_layers: layers must be [num_layers, ", str(kFields), "] device pointers, got shape ",
              str(layers.sizes()));
  check_cuda(positions, "positions", residual, at::kLong);
  check_cuda(slot_mapping, "slot_mapping", residual, at::kLong);
  check_cuda(context_lens, "context_lens", residual, at::kInt);
  TORCH_CHECK(positions.numel() == m && slot_mapping.numel() == m && context_lens.numel() == m,
              "decode_layers: positions, slot_mapping and context_lens need one entry a row (", str(m), ")");
  TORCH_CHECK(block_tables.is_cuda() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == m && block_tables.stride(1) == 1,
              "decode_layers: block_tables must be an int32 CUDA tensor [M, max_blocks], rows contiguous, got ",
              block_tables.scalar_type(), " of shape ", str(block_tables.sizes()));
  check_cuda(cos, "cos", residual, at::kFloat);
  check_cuda(sin, "sin", residual, at::kFloat);
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == kD && sin.sizes() == cos.sizes(),
              "decode_layers: cos and sin must be [max_position, 128], got ", str(cos.sizes()), " and ",
              str(sin.sizes()));

  const int grid = at::cuda::getDeviceProperties(residual.device().index())->multiProcessorCount;
  // timings: the stage stamps, optionally followed by the slot stamps
  const int64_t stage_stamps = int64_t(grid) * layers.size(0) * kStages * kStamps;
  const bool slot_stamps = timings.has_value() && timings->numel() > stage_stamps;
  if (timings.has_value()) {
    check_cuda(*timings, "timings", residual, at::kLong);
    const int64_t slots = grid * kSlotStamps * kSlotFields;
    TORCH_CHECK(timings->numel() == stage_stamps || timings->numel() == stage_stamps + slots, "decode_layers: "
                "timings must hold [SMs, num_layers, ", str(kStages), ", ", str(kStamps), "] int64s, or those then "
                "[SMs, ", str(kSlotStamps), ", ", str(kSlotFields), "]: ", str(stage_stamps), " or ",
                str(stage_stamps + slots), " for ", str(grid), " SMs and ", str(layers.size(0)), " layers, got ",
                str(timings->numel()));
  }
  const c10::cuda::CUDAGuard guard(residual.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto options = residual.options().dtype(dtype);
  const int64_t qkv_rows = (num_heads + 2 * num_kv_heads) * kD;
  const int num_layers = static_cast<int>(layers.size(0));
  // One CTA an SM; splits per (sequence, kv head) so that the attention items fill about one wave of them.
  const int splits = std::max<int>(1, grid / static_cast<int>(m * num_kv_heads));
  torch::Tensor qkv = torch::empty({m, qkv_rows}, options);
  torch::Tensor attn_out = torch::empty({m, num_heads * kD}, options);
  torch::Tensor h = torch::empty({m, intermediate}, options);
  torch::Tensor partial_o = torch::empty({m, num_heads, splits, kD}, residual.options());
  torch::Tensor partial_lse = torch::empty({m, num_heads, splits}, residual.options());
  torch::Tensor counters = at::zeros({num_layers * (kStages + m * num_kv_heads)}, residual.options().dtype(at::kInt));

  auto fill = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    Params<T> p{};
    p.layers = layers.data_ptr<int64_t>();
    p.residual = residual.data_ptr<float>();
    p.positions = positions.data_ptr<int64_t>();
    p.slot_mapping = slot_mapping.data_ptr<int64_t>();
    p.context_lens = context_lens.data_ptr<int>();
    p.block_tables = block_tables.data_ptr<int>();
    p.cos = cos.data_ptr<float>();
    p.sin = sin.data_ptr<float>();
    p.qkv = static_cast<T*>(qkv.data_ptr());
    p.attn_out = static_cast<T*>(attn_out.data_ptr());
    p.h = static_cast<T*>(h.data_ptr());
    p.partial_o = partial_o.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
    p.counters = counters.data_ptr<int>();
    p.timings = timings.has_value() ? timings->data_ptr<int64_t>() : nullptr;
    p.slot_timings = slot_stamps ? p.timings + stage_stamps : nullptr;
    p.block_table_stride = block_tables.stride(0);
    p.max_position = cos.size(0);
    p.num_cache_slots = kv_cache.size(2) * kv_cache.size(3);
    // [2, layers, slots, kv_heads, D], innermost first; boxes of 16 tokens of one head
    const cuuint64_t dims[5] = {kD, static_cast<cuuint64_t>(num_kv_heads), static_cast<cuuint64_t>(p.num_cache_slots),
                                static_cast<cuuint64_t>(num_layers), 2};
    const cuuint64_t strides[4] = {kD * sizeof(T), static_cast<cuuint64_t>(kv_cache.stride(3) * sizeof(T)),
                                   static_cast<cuuint64_t>(kv_cache.stride(1) * sizeof(T)),
                                   static_cast<cuuint64_t>(kv_cache.stride(0) * sizeof(T))};
    const cuuint32_t box[5] = {64, 1, kSlotTokens / 2, 1, 1};  // 128-byte rows: the widest a 128-byte swizzle takes
    p.kv_map = minivllm::encode_tensor_map("decode_layers", kv_cache.data_ptr(), std::is_same_v<T, __nv_bfloat16>,
                                           5, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B);
    p.num_layers = num_layers;
    p.m = static_cast<int>(m);
    p.hidden = static_cast<int>(hidden);
    p.num_heads = static_cast<int>(num_heads);
    p.num_kv_heads = static_cast<int>(num_kv_heads);
    p.intermediate = static_cast<int>(intermediate);
    p.block_size = static_cast<int>(kv_cache.size(3));
    p.splits = splits;
    p.x_pitch = static_cast<int>(std::max({hidden, num_heads * kD, intermediate}) + kXPad);
    p.eps = static_cast<float>(eps);
    p.scale_log2 = static_cast<float>(scale * M_LOG2E);
    launch<T>(p, grid, stream);
  };
  if (dtype == at::kHalf) {
    fill(static_cast<__half*>(nullptr));
  } else {
    fill(static_cast<__nv_bfloat16*>(nullptr));
  }
}
