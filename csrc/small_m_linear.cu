// small_m_linear: out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) for the few rows of a decode step
// (M <= kMaxRows = 64). There cuBLAS reaches about half the copy bandwidth or less; the product is bound by reading
// the weights once (a weight byte feeds M flops, far below the ridge), so both kernels are built around that stream.
//
// M <= kMaxM = 16, small_m_linear_kernel:
// - A CTA owns 8 weight rows (8 output columns) and its 8 warps split K; their partial sums meet in shared
//   memory, so there is no second pass, and ceil(N / 8) CTAs fill the GPU even at N = 1024.
// - A lane streams 16-byte chunks of one weight row, kUnroll of them in flight, around L1 (read once).
// - The products run on tensor cores (mma m16n8k16: x as the 16-row A operand, the 8 weight rows as the B
//   columns), so even at M = 16 the arithmetic hides behind the loads. The order in which k runs does not
//   matter to a dot product, so a chunk feeds the fragments without shuffling: lane (g, t) = (lane / 4,
//   lane % 4) loads 8 consecutive elements of weight row g and uses them as its k values {2t, 2t+1, 2t+8,
//   2t+9} of two mmas; the same 8 elements of x's rows g and g + 8 are the matching A values. x is read
//   through L1, where every CTA on an SM finds it after the first.
//
// 16 < M <= 64, wide_m_linear_kernel: with x as A, each 16-byte weight chunk would need M / 8 chunks of x, more
// than L1 delivers at the weight rate. So the roles swap and x is shared:
// - The weight rows are the mma's A operand (16 rows a warp, the same k permutation: a lane loads chunk t of a
//   step from rows g and g + 8), x's rows its B columns, 8 at a time; a chunk of x then feeds 16 weight rows, and
//   a weight chunk M / 16 x chunks (4 at M = 64, about 60 B/clk/SM at the weight rate, under half of what shared
//   memory delivers).
// - A CTA owns kWideRows = 64 weight rows (4 warps along N) over a slice of K (2 warps along it, meeting in shared
//   memory). Its x slice [M, slice] is staged in shared memory once (cp.async), so x crosses L2 once a CTA:
//   M / 64 of the weight bytes. Fewer output columns a CTA than the small kernel has would multiply that.
// - N = 1024 gives 16 such CTAs, so K is split over CTAs too (up to kMaxSplits, at least kMinSplitSteps steps of
//   32 a slice): each writes its fp32 partial tile, and the last of a tile to arrive merges them in split order
//   (common/split_counters.cuh), so the bits do not depend on arrival order and no second kernel runs. A partial
//   costs 2M / slice of the weight bytes to write and as much to read, and the merging CTA reads splits - 1 of
//   them at the end, so the splits stop at about one CTA an SM.
// - A lane keeps kWideUnroll steps (2 chunks each) in flight and reloads a step's registers as soon as its mmas
//   have read them, so the stream does not drain between batches; x comes from shared memory as needed.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>

#include "common/checks.h"
#include "common/ptx.cuh"
#include "common/split_counters.cuh"
#include "ops.h"

namespace {

using minivllm::str;
using minivllm::ptx::cp_async_16;
using minivllm::ptx::cp_async_commit;
using minivllm::ptx::cp_async_wait;
using minivllm::ptx::load_streaming_16;
using minivllm::ptx::mma_16816;
using minivllm::ptx::smem_address;

constexpr int kMaxM = 16;  // the 16 rows of the mma's A operand
constexpr int kRows = 8;   // weight rows per CTA: the mma's 8 B columns
constexpr int kWarps = 8;  // split K
constexpr int kThreads = kWarps * 32;
// Chunks in flight per lane (with M > 8 each also holds a second x chunk; 8 of them would spill at the 128
// registers that two CTAs per SM allow).
template <bool kHighRows>
constexpr int kUnroll = kHighRows ? 6 : 8;
constexpr int kChunkElems = 8;      // 16 bytes
constexpr int kChunksPerStep = 4;   // a row's chunks per load instruction: lanes t = 0..3
constexpr int kAccumulators = 4;    // independent mma chains, so the products do not serialise

template <typename T, typename OutT>
struct Params {
  const T* x;       // [m, x_stride]
  const T* weight;  // [n, weight_stride]
  const T* bias;    // [n] or nullptr
  OutT* out;        // [m, n], contiguous
  int64_t x_stride;
  int64_t weight_stride;
  int m;
  int n;
  int k_chunks;  // K / 8
};

// 16 bytes of an x row through L1 (every CTA reads all of x), zeros when !valid.
__device__ __forceinline__ uint4 load_x_chunk(const uint4* ptr, bool valid) {
  return valid ? __ldg(ptr) : make_uint4(0, 0, 0, 0);
}

// torch builds with __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__: convert explicitly.
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename OutT>
__device__ __forceinline__ OutT from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// kHighRows: M > 8, so x's rows 8..15 (A rows g + 8) are loaded too; otherwise they are zeros.
template <typename T, typename OutT, bool kHighRows>
__global__ void __launch_bounds__(kThreads, 2) small_m_linear_kernel(const Params<T, OutT> p) {
  __shared__ float partial[kWarps][kMaxM][kRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int first_row = blockIdx.x * kRows;
  const bool row_valid = first_row + g < p.n;
  const bool low_valid = g < p.m, high_valid = kHighRows && g + 8 < p.m;
  // Clamped so that no pointer leaves its tensor; the loads of invalid rows are predicated off.
  const uint4* weight_row =
      reinterpret_cast<const uint4*>(p.weight + int64_t(min(first_row + g, p.n - 1)) * p.weight_stride);
  const uint4* x_low = reinterpret_cast<const uint4*>(p.x + int64_t(min(g, p.m - 1)) * p.x_stride);
  const uint4* x_high = reinterpret_cast<const uint4*>(p.x + int64_t(min(g + 8, p.m - 1)) * p.x_stride);

  // Warp w takes a contiguous range of steps; a step is 4 chunks of each of the 8 rows (32 elements of K).
  const int steps = (p.k_chunks + kChunksPerStep - 1) / kChunksPerStep;
  const int step_end = (warp + 1) * steps / kWarps;
  float acc[kAccumulators][4] = {};
  for (int step = warp * steps / kWarps; step < step_end; step += kUnroll<kHighRows>) {
    uint4 w[kUnroll<kHighRows>], low[kUnroll<kHighRows>], high[kUnroll<kHighRows>];
#pragma unroll
    for (int u = 0; u < kUnroll<kHighRows>; ++u) {
      const int chunk = (step + u) * kChunksPerStep + t;
      const bool in_k = step + u < step_end && chunk < p.k_chunks;
      w[u] = load_streaming_16(weight_row + chunk, in_k && row_valid);
      low[u] = load_x_chunk(x_low + chunk, in_k && low_valid);
      high[u] = kHighRows ? load_x_chunk(x_high + chunk, in_k && high_valid) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll<kHighRows>; ++u) {
      const uint32_t a0[4] = {low[u].x, high[u].x, low[u].y, high[u].y};
      const uint32_t a1[4] = {low[u].z, high[u].z, low[u].w, high[u].w};
      mma_16816<T>(acc[(2 * u) % kAccumulators], a0, w[u].x, w[u].y);
      mma_16816<T>(acc[(2 * u + 1) % kAccumulators], a1, w[u].z, w[u].w);
    }
  }

  // acc: (x row g, weight row 2t and 2t+1) in [0], [1]; x row g + 8 in [2], [3].
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 1; j < kAccumulators; ++j) acc[0][i] += acc[j][i];
  }
  partial[warp][g][2 * t] = acc[0][0];
  partial[warp][g][2 * t + 1] = acc[0][1];
  partial[warp][g + 8][2 * t] = acc[0][2];
  partial[warp][g + 8][2 * t + 1] = acc[0][3];
  __syncthreads();
  if (threadIdx.x >= kMaxM * kRows) return;
  const int m = threadIdx.x / kRows, col = first_row + threadIdx.x % kRows;
  if (m >= p.m || col >= p.n) return;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) sum += partial[i][m][threadIdx.x % kRows];
  if (p.bias != nullptr) sum += to_float(p.bias[col]);
  p.out[int64_t(m) * p.n + col] = from_float<OutT>(sum);
}

// The wide kernel (16 < M <= kMaxRows); see the header.
constexpr int kMaxRows = 64;
constexpr int kWideWarpsN = 4;                 // warps along N, 16 weight rows each (the mma's A rows)
constexpr int kWideWarpsK = 2;                 // warps along the CTA's slice of K
constexpr int kWideRows = 16 * kWideWarpsN;    // weight rows (output columns) a CTA
constexpr int kStepElems = kChunksPerStep * kChunkElems;  // a step: 4 lanes x 8 elements of a row
constexpr int kStepBytes = kStepElems * 2;
constexpr int kMaxSplits = 8;       // CTAs along K before the merge at the end costs more than the wider grid wins
constexpr int kMinSplitSteps = 8;   // 256 elements of K a slice at least: 4 steps a warp
constexpr int kWideCtasPerSm = 2;   // the grid the splits aim at: __launch_bounds__' two CTAs an SM, one wave
constexpr int kMaxSliceBytes = 96 * 1024;  // x's slice in shared memory: two CTAs an SM on every supported GPU
constexpr int kReduceStride = kWideRows + 4;  // floats a row of the reduction tile: lanes t = 0..3 on other banks
// Steps in flight a lane, 2 weight chunks each: 32 KB a CTA, 64 KB an SM, more than DRAM's latency needs (~40 KB
// at 4 TB/s and ~1.2 us), and within the 128 registers that two CTAs an SM allow (6 spills at M <= 32).
constexpr int kWideUnroll = 4;

template <typename T, typename OutT>
struct WideParams : Params<T, OutT> {
  float* partials;  // [splits, m, partial_stride] when splits > 1
  int* counters;    // a counter a tile of kWideRows columns when splits > 1
  int64_t partial_stride;
  int splits;       // CTAs along K
  int split_steps;  // steps of kStepElems a split (the last may have fewer)
};

// Shared memory a wide CTA needs: x's slice (rows kStepBytes-strided, an odd number of steps so that lanes g and
// g + 1 read opposite halves of the banks), later reused for the two K-warps' partial tiles.
template <int kMTiles>
constexpr int wide_smem_bytes(int split_steps) {
  const int x_bytes = 8 * kMTiles * (split_steps | 1) * kStepBytes;
  const int reduce_bytes = kWideWarpsK * 8 * kMTiles * kReduceStride * int(sizeof(float));
  return x_bytes > reduce_bytes ? x_bytes : reduce_bytes;
}

// Stages rows 0..8 * kMTiles - 1 of x's columns [first_step, first_step + steps) * kStepElems; rows past m and
// columns past K are zeros (their weights are zeros too).
template <typename T, int kMTiles>
__device__ __forceinline__ void stage_x_slice(const T* x, int64_t x_stride, int m, int k_chunks, int first_step,
                                              int steps, int row_steps, T* xs) {
  const int chunks = steps * kChunksPerStep;
  for (int i = threadIdx.x; i < 8 * kMTiles * chunks; i += kThreads) {
    const int row = i / chunks, c = i % chunks, chunk = first_step * kChunksPerStep + c;
    const bool valid = row < m && chunk < k_chunks;
    const T* src = valid ? x + row * x_stride + int64_t(chunk) * kChunkElems : x;
    cp_async_16(smem_address(xs + (row * row_steps * kStepElems + c * kChunkElems)), src, valid);
  }
  cp_async_commit();
}

__device__ __forceinline__ float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

template <typename T, typename OutT, int kMTiles>
__global__ void __launch_bounds__(kThreads, 2) wide_m_linear_kernel(const WideParams<T, OutT> p) {
  constexpr int kUnroll = kWideUnroll;
  constexpr int kXRows = 8 * kMTiles;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int split = blockIdx.x, first_row = blockIdx.y * kWideRows;
  const int first_step = split * p.split_steps;
  const int slice_steps = min(p.split_steps, (p.k_chunks + kChunksPerStep - 1) / kChunksPerStep - first_step);
  const int row_steps = p.split_steps | 1;
  stage_x_slice<T, kMTiles>(p.x, p.x_stride, p.m, p.k_chunks, first_step, slice_steps, row_steps, xs);

  // This warp's 16 weight rows and half of the slice.
  const int warp_steps = (slice_steps + kWideWarpsK - 1) / kWideWarpsK;
  const int begin = first_step + warp / kWideWarpsN * warp_steps;
  const int end = min(begin + warp_steps, first_step + slice_steps);
  const int row = first_row + 16 * (warp % kWideWarpsN) + g;
  const bool low_valid = row < p.n, high_valid = row + 8 < p.n;
  const uint4* w_low = reinterpret_cast<const uint4*>(p.weight + int64_t(min(row, p.n - 1)) * p.weight_stride);
  const uint4* w_high = reinterpret_cast<const uint4*>(p.weight + int64_t(min(row + 8, p.n - 1)) * p.weight_stride);
  uint4 low[kUnroll], high[kUnroll];
  const auto load_step = [&](int u, int step) {
    const int chunk = step * kChunksPerStep + t;
    const bool in_k = step < end && chunk < p.k_chunks;
    low[u] = load_streaming_16(w_low + chunk, in_k && low_valid);
    high[u] = load_streaming_16(w_high + chunk, in_k && high_valid);
  };
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) load_step(u, begin + u);
  cp_async_wait<0>();
  __syncthreads();

  // acc[j]: (weight rows g, g + 8) x (x rows 8j + 2t, 8j + 2t + 1), as mma's C = A B lays them out.
  float acc[kMTiles][4] = {};
  for (int step = begin; step < end; step += kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (step + u < end) {  // the same for the whole warp
        const uint32_t a0[4] = {low[u].x, high[u].x, low[u].y, high[u].y};
        const uint32_t a1[4] = {low[u].z, high[u].z, low[u].w, high[u].w};
        const T* x_step = xs + (step + u - first_step) * kStepElems + t * kChunkElems;
#pragma unroll
        for (int j = 0; j < kMTiles; ++j) {
          const uint4 b = *reinterpret_cast<const uint4*>(x_step + (8 * j + g) * row_steps * kStepElems);
          mma_16816<T>(acc[j], a0, b.x, b.y);
          mma_16816<T>(acc[j], a1, b.z, b.w);
        }
      }
      load_step(u, step + u + kUnroll);  // the registers are free again: keep kUnroll steps in flight
    }
  }

  // The two K-warps' tiles [x row][weight row] in shared memory, where x's slice was.
  __syncthreads();
  float* reduce = reinterpret_cast<float*>(smem) + warp / kWideWarpsN * kXRows * kReduceStride;
  const int col = 16 * (warp % kWideWarpsN) + g;
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) {
    float* r = reduce + (8 * j + 2 * t) * kReduceStride + col;
    r[0] = acc[j][0];
    r[kReduceStride] = acc[j][1];
    r[8] = acc[j][2];
    r[kReduceStride + 8] = acc[j][3];
  }
  __syncthreads();

  // Each thread takes kPerThread float4s of the tile: x row q / 16, weight rows 4 (q % 16) .. + 3.
  constexpr int kQuadsPerRow = kWideRows / 4;
  static_assert(kXRows * kQuadsPerRow % kThreads == 0, "each thread takes the same number of the tile's float4s");
  constexpr int kPerThread = kXRows * kQuadsPerRow / kThreads;
  float4 sum[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int q = threadIdx.x + i * kThreads;
    const float* r = reinterpret_cast<const float*>(smem) + q / kQuadsPerRow * kReduceStride + 4 * (q % kQuadsPerRow);
    sum[i] = *reinterpret_cast<const float4*>(r);
#pragma unroll
    for (int w = 1; w < kWideWarpsK; ++w) {
      sum[i] = sum[i] + *reinterpret_cast<const float4*>(r + w * kXRows * kReduceStride);
    }
  }
  if (p.splits > 1) {
    const auto partial = [&](int s, int q) {
      return p.partials + (int64_t(s) * p.m + q / kQuadsPerRow) * p.partial_stride + first_row + 4 * (q % kQuadsPerRow);
    };
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q / kQuadsPerRow < p.m) *reinterpret_cast<float4*>(partial(split, q)) = sum[i];
    }
    if (!minivllm::last_to_arrive(p.counters + blockIdx.y, p.splits)) return;
    // In split order whichever CTA merges: the same bits every run.
    float4 merged[kPerThread] = {};
#pragma unroll 2
    for (int s = 0; s < p.splits; ++s) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int q = threadIdx.x + i * kThreads;
        if (q / kQuadsPerRow < p.m) {
          merged[i] = merged[i] + (s == split ? sum[i] : __ldcg(reinterpret_cast<const float4*>(partial(s, q))));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sum[i] = merged[i];
    if (threadIdx.x == 0) p.counters[blockIdx.y] = 0;  // ready for the next launch
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int q = threadIdx.x + i * kThreads, m = q / kQuadsPerRow, n = first_row + 4 * (q % kQuadsPerRow);
    if (m >= p.m) continue;
    const float v[4] = {sum[i].x, sum[i].y, sum[i].z, sum[i].w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (n + e >= p.n) break;
      const float b = p.bias != nullptr ? to_float(p.bias[n + e]) : 0.f;
      p.out[int64_t(m) * p.n + n + e] = from_float<OutT>(v[e] + b);
    }
  }
}

// The split of K over a wide grid, from shapes alone (a captured graph stays valid for any data): CTAs for
// kWideCtasPerSm an SM where N alone gives fewer, each slice at least kMinSplitSteps steps (none wasted on a
// merge for little work) and at most what kMaxSliceBytes holds. No split is empty.
struct SplitPlan {
  int splits;
  int split_steps;
};

template <int kMTiles>
SplitPlan plan_splits(int tiles, int k_chunks, int sms) {
  const int steps = (k_chunks + kChunksPerStep - 1) / kChunksPerStep;
  const int max_slice_steps = kMaxSliceBytes / (8 * kMTiles * kStepBytes) - 1;  // rounded up to odd, it still fits
  int splits = std::clamp(kWideCtasPerSm * sms / tiles, 1, kMaxSplits);
  splits = std::min(splits, std::max(1, steps / kMinSplitSteps));
  splits = std::max(splits, (steps + max_slice_steps - 1) / max_slice_steps);
  const int split_steps = (steps + splits - 1) / splits;
  return {(steps + split_steps - 1) / split_steps, split_steps};
}

// One family of split counters for every wide instantiation (their launches run one after another on a stream).
minivllm::SplitCounters& wide_split_counters() {
  static minivllm::SplitCounters counters("small_m_linear");
  return counters;
}

template <typename T, typename OutT, int kMTiles>
void launch_wide(const Params<T, OutT>& params, const c10::Device& device, cudaStream_t stream) {
  WideParams<T, OutT> p{params};
  const int tiles = (p.n + kWideRows - 1) / kWideRows;
  const SplitPlan plan =
      plan_splits<kMTiles>(tiles, p.k_chunks, at::cuda::getDeviceProperties(device.index())->multiProcessorCount);
  p.splits = plan.splits;
  p.split_steps = plan.split_steps;
  at::Tensor partials;  // freed after the launch: the caching allocator reuses it only after this stream's kernel
  if (p.splits > 1) {
    // sized by shapes alone; the caching allocator makes this safe inside graph capture
    p.partial_stride = int64_t(tiles) * kWideRows;
    partials = at::empty({int64_t(p.splits) * p.m * p.partial_stride},
                         at::TensorOptions().dtype(at::kFloat).device(device));
    p.partials = partials.data_ptr<float>();
    p.counters = wide_split_counters().get(device, tiles, stream);
  }
  const auto kernel = wide_m_linear_kernel<T, OutT, kMTiles>;
  const int smem = wide_smem_bytes<kMTiles>(p.split_steps);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<dim3(p.splits, tiles), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename OutT>
void launch(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias,
            torch::Tensor& out, cudaStream_t stream) {
  Params<T, OutT> p{};
  p.x = static_cast<const T*>(x.data_ptr());
  p.weight = static_cast<const T*>(weight.data_ptr());
  p.bias = bias.has_value() ? static_cast<const T*>(bias->data_ptr()) : nullptr;
  p.out = static_cast<OutT*>(out.data_ptr());
  p.x_stride = x.stride(0);
  p.weight_stride = weight.stride(0);
  p.m = static_cast<int>(x.size(0));
  p.n = static_cast<int>(weight.size(0));
  p.k_chunks = static_cast<int>(x.size(1) / kChunkElems);
  if (p.m > kMaxM) {
    if (p.m <= 32) return launch_wide<T, OutT, 4>(p, x.device(), stream);
    if (p.m <= 48) return launch_wide<T, OutT, 6>(p, x.device(), stream);
    return launch_wide<T, OutT, 8>(p, x.device(), stream);
  }
  const int blocks = (p.n + kRows - 1) / kRows;
  if (p.m > 8) {
    small_m_linear_kernel<T, OutT, true><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    small_m_linear_kernel<T, OutT, false><<<blocks, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_on_device(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "small_m_linear: ", name,
              " must be a CUDA tensor on x's device ", x.device().str(), ", got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "small_m_linear: ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

// The kernel reads 16-byte chunks of every row.
void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(1) == 1 && t.stride(0) % kChunkElems == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "small_m_linear: ", name,
              " must be contiguous in its last dimension, 16-byte aligned, with a row stride that is a multiple of "
              "8 elements, got strides ",
              str(t.strides()));
}

}  // namespace

torch::Tensor small_m_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const std::optional<torch::Tensor>& bias, bool fp32_out) {
  TORCH_CHECK(x.is_cuda(), "small_m_linear: x must be a CUDA tensor, got ", x.device().str());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "small_m_linear: dtype ",
              x.scalar_type(), " is not supported; use torch.float16 or torch.bfloat16");
  check_on_device(weight, "weight", x);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_m_linear: x must be [M, K] and weight [N, K], got shapes ",
              str(x.sizes()), " and ", str(weight.sizes()));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "small_m_linear: weight must be [N, K=", str(k), "] to match x, got shape ",
              str(weight.sizes()));
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "small_m_linear: x has ", str(m), " rows; the kernel supports 1 to ",
              str(kMaxRows), " (larger batches belong to a GEMM)");
  TORCH_CHECK(k > 0 && k % kChunkElems == 0, "small_m_linear: K = ", str(k),
              " is not supported; it must be a positive multiple of 8");
  TORCH_CHECK(k <= INT32_MAX && n < INT32_MAX - kRows && (m <= kMaxM || (n + kWideRows - 1) / kWideRows <= 65535),
              "small_m_linear: weight shape ", str(weight.sizes()),
              " is too large for one launch");
  check_rows(x, "x");
  check_rows(weight, "weight");
  if (bias.has_value()) {
    check_on_device(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->stride(0) == 1, "small_m_linear: bias must be a "
                "contiguous [N] = [", str(n), "] tensor, got shape ", str(bias->sizes()), " and strides ",
                str(bias->strides()));
  }

  torch::Tensor out = torch::empty({m, n}, x.options().dtype(fp32_out ? at::kFloat : x.scalar_type()));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    fp32_out ? launch<__half, float>(x, weight, bias, out, stream) : launch<__half, __half>(x, weight, bias, out, stream);
  } else {
    fp32_out ? launch<__nv_bfloat16, float>(x, weight, bias, out, stream)
             : launch<__nv_bfloat16, __nv_bfloat16>(x, weight, bias, out, stream);
  }
  return out;
}
