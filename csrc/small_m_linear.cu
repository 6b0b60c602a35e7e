// small_m_linear: out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) for the few rows of a decode step
// (M <= kMaxM = 16). There cuBLAS reaches about half the copy bandwidth; the product is bound by reading the
// weights once, so the kernel is built around that stream.
//
// - A CTA owns 8 weight rows (8 output columns) and its 8 warps split K; their partial sums meet in shared
//   memory, so there is no second pass, and ceil(N / 8) CTAs fill the GPU even at N = 1024.
// - A lane streams 16-byte chunks of one weight row, kUnroll of them in flight, around L1 (read once).
// - The products run on tensor cores (mma m16n8k16: x as the 16-row A operand, the 8 weight rows as the B
//   columns), so even at M = 16 the arithmetic hides behind the loads. The order in which k runs does not
//   matter to a dot product, so a chunk feeds the fragments without shuffling: lane (g, t) = (lane / 4,
//   lane % 4) loads 8 consecutive elements of weight row g and uses them as its k values {2t, 2t+1, 2t+8,
//   2t+9} of two mmas; the same 8 elements of x's rows g and g + 8 are the matching A values. x is read
//   through L1, where every CTA on an SM finds it after the first.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>

#include "common/checks.h"
#include "common/pdl.cuh"
#include "common/ptx.cuh"
#include "ops.h"

namespace {

using minivllm::str;
using minivllm::ptx::load_streaming_16;
using minivllm::ptx::mma_16816;

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
  minivllm::pdl::allow_next_grid();
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
  auto in_k = [&](int step, int u) { return step + u < step_end && (step + u) * kChunksPerStep + t < p.k_chunks; };
  // The weights of an iteration are loaded at the end of the one before (off past step_end), so that the first
  // iteration's stream starts before the wait for the kernel that writes x (common/pdl.cuh).
  uint4 w[kUnroll<kHighRows>];
  auto load_weights = [&](int step) {
#pragma unroll
    for (int u = 0; u < kUnroll<kHighRows>; ++u) {
      w[u] = load_streaming_16(weight_row + (step + u) * kChunksPerStep + t, in_k(step, u) && row_valid);
    }
  };
  int step = warp * steps / kWarps;
  load_weights(step);
  minivllm::pdl::wait_for_prior_grid();
  float acc[kAccumulators][4] = {};
  for (; step < step_end; step += kUnroll<kHighRows>) {
    uint4 low[kUnroll<kHighRows>], high[kUnroll<kHighRows>];
#pragma unroll
    for (int u = 0; u < kUnroll<kHighRows>; ++u) {
      const int chunk = (step + u) * kChunksPerStep + t;
      low[u] = load_x_chunk(x_low + chunk, in_k(step, u) && low_valid);
      high[u] = kHighRows ? load_x_chunk(x_high + chunk, in_k(step, u) && high_valid) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll<kHighRows>; ++u) {
      const uint32_t a0[4] = {low[u].x, high[u].x, low[u].y, high[u].y};
      const uint32_t a1[4] = {low[u].z, high[u].z, low[u].w, high[u].w};
      mma_16816<T>(acc[(2 * u) % kAccumulators], a0, w[u].x, w[u].y);
      mma_16816<T>(acc[(2 * u + 1) % kAccumulators], a1, w[u].z, w[u].w);
    }
    load_weights(step + kUnroll<kHighRows>);
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
  const int blocks = (p.n + kRows - 1) / kRows;
  minivllm::pdl::launch(p.m > 8 ? small_m_linear_kernel<T, OutT, true> : small_m_linear_kernel<T, OutT, false>,
                        dim3(blocks), dim3(kThreads), 0, stream, p);
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
  TORCH_CHECK(m >= 1 && m <= kMaxM, "small_m_linear: x has ", str(m), " rows; the kernel supports 1 to ",
              str(kMaxM), " (larger batches belong to a GEMM)");
  TORCH_CHECK(k > 0 && k % kChunkElems == 0, "small_m_linear: K = ", str(k),
              " is not supported; it must be a positive multiple of 8");
  TORCH_CHECK(k <= INT32_MAX && n < INT32_MAX - kRows, "small_m_linear: weight shape ", str(weight.sizes()),
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
