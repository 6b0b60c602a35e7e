// The sampler's row reductions over fp32 logits [B, V] (V up to a vocabulary's 151,936), bound by reading them:
//
// - sampler_gumbel_argmax: per row, argmax over v of penalized(logits)[v] / max(T, 1e-5) - log(noise[v]), the
//   penalties (optional) exactly as minivllm/layers/penalties.py's penalized(), the temperature and the Gumbel
//   draw as layers/sampler.py's temperature_gumbel_max(); the first index wins a tie, as torch.argmax.
// - sampler_logsumexp_rank: per row, log(sum(exp(logits))) and the count of logits above logits[tokens[b]], as
//   layers/sampler.py's log_sum_exp_and_count_above() with chosen = logits[b, tokens[b]].
//
// One CTA a row would leave most of the GPU idle below ~2 waves of rows (an 8-row argmax took 252 us that way),
// so each row is split over several CTAs: grid (B, splits), splits from the shapes alone (a captured CUDA graph
// stays valid, and nothing is read back to the host) so that B x splits makes about kGridWaves waves, but no
// split shorter than kMinChunk elements. A CTA reduces its chunk with 16-byte loads (when the row length and
// the pointers allow; element loads otherwise), writes its partial, and the last CTA of the row to finish
// merges the row's partials (common/split_counters.cuh) and writes the result: no second kernel.
//
// Exactness: the argmax must pick torch's token, so the per-element arithmetic is IEEE-rounded as torch's eager
// ops are (the build's --use_fast_math would otherwise turn x / t into an approximate division, let a - b * c
// contract into an fma, and logf into the MUFU approximation). Within a split, among splits and in the merge a
// greater score wins and an equal one goes to the lower index, so ties resolve as torch's first index whatever
// order the CTAs finish in. A NaN score never wins (torch.argmax would return the first NaN); a row whose
// scores are all NaN gets token 0. (One difference from torch remains: the build flushes denormals to zero.)
// The log-sum-exp is fp32 with the fast exp2 (well within 1e-5 relative); a NaN logit makes it NaN, as torch,
// except in a row of NaN alone, which gives -inf.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/split_counters.cuh"
#include "ops.h"

// libdevice's accurate logf (the one torch's log uses): --use_fast_math maps logf itself to __logf, whose
// error would move near-tied Gumbel scores.
extern "C" __device__ float __nv_logf(float);

namespace {

using minivllm::aligned;
using minivllm::str;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 128;   // <= kThreads: in the merge each thread reads at most one partial
constexpr int kMinChunk = 2048;   // elements a split at least: 8 KB of logits, two 16-byte loads a thread
constexpr float kGridWaves = 2.f;
constexpr int kUnroll = 4;        // 16-byte loads of each input in flight a thread
constexpr float kLog2e = 1.4426950408889634f;

// ---- reductions ----------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T shfl_xor(const T& v, int mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffled word by word");
  int words[sizeof(T) / 4];
  memcpy(words, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < int(sizeof(T) / 4); ++i) words[i] = __shfl_xor_sync(0xffffffffu, words[i], mask);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// The CTA's reduction of one value a thread, valid in thread 0; `identity` changes nothing it is combined with.
// Begins with no barrier: a caller that reuses it must have passed a __syncthreads since the last call's shared
// reads (the merge passes last_to_arrive's).
template <typename T, typename Combine>
__device__ __forceinline__ T block_reduce(T v, const T& identity, Combine combine) {
  __shared__ T warp_values[kWarps];
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v = combine(v, shfl_xor(v, mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_values[lane] : identity;
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) v = combine(v, shfl_xor(v, mask));
  }
  return v;
}

// ---- argmax --------------------------------------------------------------------------------------------

struct Best {
  float score;
  int index;  // INT_MAX: nothing yet
};

// a when it beats b: a greater score, or an equal one at a lower index (torch.argmax's first index). NaN never
// beats anything, and nothing is ever NaN in b but a NaN a, so a NaN score is never kept.
__device__ __forceinline__ Best better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index) ? a : b;
}

struct PenaltyArgs {
  const int* output_counts;  // [num_slots, V]
  const bool* in_prompt;     // [num_slots, V]
  const int64_t* slots;      // [B]
  const float* presence;     // [B]
  const float* frequency;
  const float* repetition;
  int64_t num_slots;
};

struct ArgmaxArgs {
  const float* logits;  // [B, V]
  const float* noise;   // [B, V], Exp(1) draws
  const float* temperatures;
  int64_t* tokens;  // [B]
  int2* partials;   // [B, splits]: (score bits, index)
  int* counters;    // [B], zero between launches
  int64_t vocab;
  int64_t chunk;  // elements a split, a multiple of 4
  int splits;
  PenaltyArgs pen;
};

// penalized() of layers/penalties.py for one element, in torch's order and rounding.
__device__ __forceinline__ float penalize(float x, int count, bool prompt, float rep, float freq, float pres) {
  if (prompt || count > 0) x = x > 0.f ? __fdiv_rn(x, rep) : __fmul_rn(x, rep);
  x = __fsub_rn(x, __fmul_rn(freq, static_cast<float>(count)));
  return __fsub_rn(x, __fmul_rn(pres, count > 0 ? 1.f : 0.f));
}

template <bool kPenalties>
__device__ __forceinline__ void consider(Best& best, float x, float noise, int count, bool prompt, float t,
                                         float rep, float freq, float pres, int index) {
  if constexpr (kPenalties) x = penalize(x, count, prompt, rep, freq, pres);
  const Best here{__fsub_rn(__fdiv_rn(x, t), __nv_logf(noise)), index};
  best = better(here, best);
}

// kVec: 16-byte loads (the row length a multiple of 4 and every pointer aligned for it; the host checks).
template <bool kVec, bool kPenalties>
__global__ void __launch_bounds__(kThreads) gumbel_argmax_kernel(ArgmaxArgs a) {
  const int row = blockIdx.x, split = blockIdx.y;
  const int64_t begin = split * a.chunk, end = std::min(a.vocab, begin + a.chunk);
  const float* logits = a.logits + row * a.vocab + begin;
  const float* noise = a.noise + row * a.vocab + begin;
  const float temp = a.temperatures[row];
  const float t = temp < 1e-5f ? 1e-5f : temp;  // clamp(min=1e-5): a NaN stays NaN, as in torch
  const int* counts = nullptr;
  const bool* prompt = nullptr;
  float rep = 1.f, freq = 0.f, pres = 0.f;
  if constexpr (kPenalties) {
    // A slot out of range reads no table: the row is scored without penalties (the host cannot check slots
    // without a sync; torch's gather would stop the device instead).
    const int64_t slot = a.pen.slots[row];
    if (slot >= 0 && slot < a.pen.num_slots) {
      counts = a.pen.output_counts + slot * a.vocab + begin;
      prompt = a.pen.in_prompt + slot * a.vocab + begin;
    }
    rep = a.pen.repetition[row], freq = a.pen.frequency[row], pres = a.pen.presence[row];
  }
  const int n = static_cast<int>(end - begin);
  const int first = static_cast<int>(begin);
  constexpr Best kNone{-INFINITY, INT_MAX};
  Best best = kNone;

  if constexpr (kVec) {
    const int n4 = n / 4;
    for (int base = threadIdx.x; base < n4; base += kThreads * kUnroll) {
      float4 x[kUnroll], e[kUnroll];
      int4 c[kUnroll];
      uchar4 p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load before any use: kUnroll x 2..4 loads in flight
        const int i = base + u * kThreads;
        if (i < n4) {
          // logits and noise are read once: streamed past the caches
          x[u] = __ldcs(reinterpret_cast<const float4*>(logits) + i);
          e[u] = __ldcs(reinterpret_cast<const float4*>(noise) + i);
          c[u] = make_int4(0, 0, 0, 0);
          p[u] = make_uchar4(0, 0, 0, 0);
          if (kPenalties && counts != nullptr) {
            c[u] = __ldg(reinterpret_cast<const int4*>(counts) + i);
            p[u] = __ldg(reinterpret_cast<const uchar4*>(prompt) + i);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        if (i < n4) {
          const int index = first + 4 * i;
          consider<kPenalties>(best, x[u].x, e[u].x, c[u].x, p[u].x, t, rep, freq, pres, index);
          consider<kPenalties>(best, x[u].y, e[u].y, c[u].y, p[u].y, t, rep, freq, pres, index + 1);
          consider<kPenalties>(best, x[u].z, e[u].z, c[u].z, p[u].z, t, rep, freq, pres, index + 2);
          consider<kPenalties>(best, x[u].w, e[u].w, c[u].w, p[u].w, t, rep, freq, pres, index + 3);
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int count = kPenalties && counts != nullptr ? counts[i] : 0;
      const bool in_prompt = kPenalties && prompt != nullptr ? prompt[i] : false;
      consider<kPenalties>(best, __ldcs(logits + i), __ldcs(noise + i), count, in_prompt, t, rep, freq, pres,
                           first + i);
    }
  }

  const auto combine = [](const Best& x, const Best& y) { return better(x, y); };
  best = block_reduce(best, kNone, combine);
  if (a.splits == 1) {
    if (threadIdx.x == 0) a.tokens[row] = best.index == INT_MAX ? 0 : best.index;
    return;
  }
  int2* partials = a.partials + int64_t(row) * a.splits;
  if (threadIdx.x == 0) partials[split] = make_int2(__float_as_int(best.score), best.index);
  if (!minivllm::last_to_arrive(a.counters + row, a.splits)) return;
  Best merged = kNone;
  if (threadIdx.x < a.splits) {
    const int2 v = __ldcg(partials + threadIdx.x);
    merged = Best{__int_as_float(v.x), v.y};
  }
  merged = block_reduce(merged, kNone, combine);
  if (threadIdx.x == 0) {
    a.tokens[row] = merged.index == INT_MAX ? 0 : merged.index;
    a.counters[row] = 0;  // ready for the next launch
  }
}

// ---- log-sum-exp and rank ------------------------------------------------------------------------------

struct LseCount {
  float max;  // -inf: nothing yet
  float sum;  // of exp(x - max)
  int above;  // elements above the chosen logit
  int pad;    // 16 bytes: one vector store and load a partial
};

// exp(from - to) for to >= from, 0 when both are -inf (an empty or all -inf part).
__device__ __forceinline__ float rescale(float from, float to) {
  return from == -INFINITY ? 0.f : exp2f((from - to) * kLog2e);
}

__device__ __forceinline__ LseCount merge(const LseCount& a, const LseCount& b) {
  const float m = fmaxf(a.max, b.max);
  return LseCount{m, a.sum * rescale(a.max, m) + b.sum * rescale(b.max, m), a.above + b.above, 0};
}

// Four elements into the running state: one rescale a vector, not one an element.
__device__ __forceinline__ void absorb4(LseCount& s, float x0, float x1, float x2, float x3, float chosen) {
  const float m = fmaxf(s.max, fmaxf(fmaxf(x0, x1), fmaxf(x2, x3)));
  if (m != -INFINITY) {
    s.sum = s.sum * rescale(s.max, m) + exp2f((x0 - m) * kLog2e) + exp2f((x1 - m) * kLog2e) +
            exp2f((x2 - m) * kLog2e) + exp2f((x3 - m) * kLog2e);
    s.max = m;
  }
  s.above += (x0 > chosen) + (x1 > chosen) + (x2 > chosen) + (x3 > chosen);
}

__device__ __forceinline__ void absorb(LseCount& s, float x, float chosen) {
  const float m = fmaxf(s.max, x);
  if (m != -INFINITY) {
    s.sum = s.sum * rescale(s.max, m) + exp2f((x - m) * kLog2e);
    s.max = m;
  }
  s.above += x > chosen;
}

struct LseArgs {
  const float* logits;   // [B, V]
  const int64_t* tokens;  // [B]
  float* lse;            // [B]
  int64_t* above;        // [B]
  int4* partials;        // [B, splits]: LseCount
  int* counters;         // [B], zero between launches
  int64_t vocab;
  int64_t chunk;
  int splits;
};

__device__ __forceinline__ void write_lse(const LseArgs& a, int row, const LseCount& s) {
  // torch.logsumexp: an infinite max is the result itself (its shifted sum would be inf - inf)
  a.lse[row] = isinf(s.max) ? s.max : s.max + __nv_logf(s.sum);
  a.above[row] = s.above;
}

template <bool kVec>
__global__ void __launch_bounds__(kThreads) logsumexp_rank_kernel(LseArgs a) {
  const int row = blockIdx.x, split = blockIdx.y;
  const int64_t begin = split * a.chunk, end = std::min(a.vocab, begin + a.chunk);
  const float* logits = a.logits + row * a.vocab + begin;
  // A token out of range compares as NaN: nothing is above it (the host cannot check tokens without a sync).
  const int64_t token = a.tokens[row];
  const float chosen = token >= 0 && token < a.vocab ? a.logits[row * a.vocab + token] : NAN;
  const int n = static_cast<int>(end - begin);
  constexpr LseCount kEmpty{-INFINITY, 0.f, 0, 0};
  LseCount s = kEmpty;
  if constexpr (kVec) {
    const int n4 = n / 4;
    for (int base = threadIdx.x; base < n4; base += kThreads * kUnroll) {
      float4 x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        if (i < n4) x[u] = __ldcs(reinterpret_cast<const float4*>(logits) + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < n4) absorb4(s, x[u].x, x[u].y, x[u].z, x[u].w, chosen);
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += kThreads) absorb(s, __ldcs(logits + i), chosen);
  }

  const auto combine = [](const LseCount& x, const LseCount& y) { return merge(x, y); };
  s = block_reduce(s, kEmpty, combine);
  if (a.splits == 1) {
    if (threadIdx.x == 0) write_lse(a, row, s);
    return;
  }
  int4* partials = a.partials + int64_t(row) * a.splits;
  if (threadIdx.x == 0) partials[split] = make_int4(__float_as_int(s.max), __float_as_int(s.sum), s.above, 0);
  if (!minivllm::last_to_arrive(a.counters + row, a.splits)) return;
  LseCount merged = kEmpty;
  if (threadIdx.x < a.splits) {
    const int4 v = __ldcg(partials + threadIdx.x);
    merged = LseCount{__int_as_float(v.x), __int_as_float(v.y), v.z, 0};
  }
  merged = block_reduce(merged, kEmpty, combine);
  if (threadIdx.x == 0) {
    write_lse(a, row, merged);
    a.counters[row] = 0;
  }
}

// ---- launch --------------------------------------------------------------------------------------------

struct RowSplits {
  int splits;
  int64_t chunk;
};

// From shapes alone: enough CTAs for kGridWaves waves of the kernel's resident CTAs, no split under kMinChunk
// elements, at most kMaxSplits; the chunk rounded up to whole 16-byte vectors, and the count recomputed from it
// so that no split is empty.
RowSplits row_splits(int64_t rows, int64_t vocab, int resident_ctas) {
  const int64_t wanted = static_cast<int64_t>(std::ceil(kGridWaves * resident_ctas / double(rows)));
  const int64_t most = std::min<int64_t>(kMaxSplits, (vocab + kMinChunk - 1) / kMinChunk);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::max<int64_t>(most, 1));
  const int64_t chunk = ((vocab + splits - 1) / splits + 3) / 4 * 4;
  return RowSplits{static_cast<int>((vocab + chunk - 1) / chunk), chunk};
}

// CTAs of `kernel` the device holds at once, read once per (kernel, device): the variants differ in registers.
template <typename Kernel>
int resident_ctas(Kernel kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  int& slots = cache[{reinterpret_cast<const void*>(kernel), device}];
  if (slots == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    slots = std::max(per_sm, 1) * at::cuda::getDeviceProperties(device)->multiProcessorCount;
  }
  return slots;
}

void check_contiguous(const char* op, const char* name, const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

// logits [B, V]: CUDA, fp32, contiguous, V >= 1 and below 2^31 (int indices).
void check_logits(const char* op, const torch::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": logits must be ", at::kFloat, ", got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [num_rows, vocab], got shape ", logits.sizes());
  check_contiguous(op, "logits", logits);
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < INT_MAX, op, ": logits' vocab must be in 1..", INT_MAX - 1,
              ", got ", logits.size(1));
}

// An input beside logits: on logits' device, of dtype.
void check_device_and_dtype(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& logits,
                            at::ScalarType dtype) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on logits' device ", logits.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// A per-row vector: on logits' device, of dtype, shape [B], contiguous.
void check_row_vector(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& logits,
                      at::ScalarType dtype) {
  check_device_and_dtype(op, name, t, logits, dtype);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name, " must be [num_rows=", logits.size(0),
              "], got shape ", t.sizes());
  check_contiguous(op, name, t);
}

// A penalty table [num_slots, V]: on logits' device, of dtype, contiguous.
void check_table(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& logits,
                 at::ScalarType dtype) {
  check_device_and_dtype(op, name, t, logits, dtype);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == logits.size(1), op, ": ", name, " must be [num_slots, vocab=",
              logits.size(1), "], got shape ", t.sizes());
  check_contiguous(op, name, t);
}

// Launches `kernel` (either of the two) over grid (rows, splits), with the workspace of a Partial a split and the
// family's split counters when the rows are split.
template <typename Partial, typename Args, typename Kernel>
void launch_split(Kernel kernel, Args& a, int64_t rows, const c10::Device& device, cudaStream_t stream,
                  minivllm::SplitCounters& counters) {
  const RowSplits s = row_splits(rows, a.vocab, resident_ctas(kernel, device.index()));
  a.splits = s.splits, a.chunk = s.chunk;
  at::Tensor partials;  // freed after the launch: the caching allocator reuses it only after this stream's kernel
  if (s.splits > 1) {
    // sized by shapes alone; the caching allocator makes this safe inside graph capture
    partials = at::empty({rows * s.splits, int64_t(sizeof(Partial) / 4)},
                         at::TensorOptions().dtype(at::kInt).device(device));
    a.partials = reinterpret_cast<Partial*>(partials.data_ptr<int>());
    a.counters = counters.get(device, rows, stream);
  }
  kernel<<<dim3(static_cast<unsigned>(rows), s.splits), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

torch::Tensor sampler_gumbel_argmax(const torch::Tensor& logits, const torch::Tensor& noise,
                                    const torch::Tensor& temperatures,
                                    const std::optional<torch::Tensor>& output_counts,
                                    const std::optional<torch::Tensor>& in_prompt,
                                    const std::optional<torch::Tensor>& slots,
                                    const std::optional<torch::Tensor>& presence,
                                    const std::optional<torch::Tensor>& frequency,
                                    const std::optional<torch::Tensor>& repetition) {
  constexpr const char* op = "sampler_gumbel_argmax";
  check_logits(op, logits);
  check_device_and_dtype(op, "noise", noise, logits, at::kFloat);
  TORCH_CHECK(noise.sizes() == logits.sizes(), op, ": noise must have logits' shape ", logits.sizes(), ", got ",
              noise.sizes());
  check_contiguous(op, "noise", noise);
  check_row_vector(op, "temperatures", temperatures, logits, at::kFloat);
  const int given = output_counts.has_value() + in_prompt.has_value() + slots.has_value() + presence.has_value() +
                    frequency.has_value() + repetition.has_value();
  TORCH_CHECK(given == 0 || given == 6, op, ": the penalty tensors (output_counts, in_prompt, slots, presence, "
              "frequency, repetition) must be given all together or not at all, got ", given, " of 6");
  const bool penalties = given == 6;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(rows <= INT_MAX, op, ": at most ", INT_MAX, " rows, got ", rows);
  bool vec = vocab % 4 == 0 && aligned(logits, 16) && aligned(noise, 16);
  ArgmaxArgs a{};
  if (penalties) {
    check_table(op, "output_counts", *output_counts, logits, at::kInt);
    check_table(op, "in_prompt", *in_prompt, logits, at::kBool);
    TORCH_CHECK(in_prompt->size(0) == output_counts->size(0), op, ": in_prompt must have output_counts' ",
                output_counts->size(0), " slots, got ", in_prompt->size(0));
    check_row_vector(op, "slots", *slots, logits, at::kLong);
    check_row_vector(op, "presence", *presence, logits, at::kFloat);
    check_row_vector(op, "frequency", *frequency, logits, at::kFloat);
    check_row_vector(op, "repetition", *repetition, logits, at::kFloat);
    vec = vec && aligned(*output_counts, 16) && aligned(*in_prompt, 4);
    a.pen = PenaltyArgs{output_counts->data_ptr<int>(), in_prompt->data_ptr<bool>(), slots->data_ptr<int64_t>(),
                        presence->data_ptr<float>(),   frequency->data_ptr<float>(), repetition->data_ptr<float>(),
                        output_counts->size(0)};
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  torch::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return tokens;
  a.logits = logits.data_ptr<float>();
  a.noise = noise.data_ptr<float>();
  a.temperatures = temperatures.data_ptr<float>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.vocab = vocab;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(logits.device().index());
  static minivllm::SplitCounters counters(op);
  const auto kernel = vec ? (penalties ? gumbel_argmax_kernel<true, true> : gumbel_argmax_kernel<true, false>)
                          : (penalties ? gumbel_argmax_kernel<false, true> : gumbel_argmax_kernel<false, false>);
  launch_split<int2>(kernel, a, rows, logits.device(), stream, counters);
  return tokens;
}

std::tuple<torch::Tensor, torch::Tensor> sampler_logsumexp_rank(const torch::Tensor& logits,
                                                                const torch::Tensor& tokens) {
  constexpr const char* op = "sampler_logsumexp_rank";
  check_logits(op, logits);
  check_row_vector(op, "tokens", tokens, logits, at::kLong);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(rows <= INT_MAX, op, ": at most ", INT_MAX, " rows, got ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  torch::Tensor lse = at::empty({rows}, logits.options());
  torch::Tensor above = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return {lse, above};
  LseArgs a{};
  a.logits = logits.data_ptr<float>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.lse = lse.data_ptr<float>();
  a.above = above.data_ptr<int64_t>();
  a.vocab = vocab;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(logits.device().index());
  static minivllm::SplitCounters counters(op);
  const bool vec = vocab % 4 == 0 && aligned(logits, 16);
  launch_split<int4>(vec ? logsumexp_rank_kernel<true> : logsumexp_rank_kernel<false>, a, rows, logits.device(),
                     stream, counters);
  return {lse, above};
}
