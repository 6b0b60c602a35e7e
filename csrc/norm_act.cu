// The decoder's elementwise ops between the matrix products, for steps the fused small-M products do not take
// (prefill, and decode batches over 16): RMSNorm, residual add + RMSNorm, SiLU-and-mul. They were torch.compile
// kernels. In a torch.profiler trace of an eager 4k-token prefill on an H200 machine, each compiled call took
// 150..180 us of host time (dynamo's guards and wrappers), three a layer, and the step's host time (34 ms under
// the profiler) was about three times its 11.6 ms of GPU work: the time to first token waited on the host. As
// ops of our own they take 22..25 us a call and the profiled step 15 ms (benchmarks/NOTES_prefill.md, seventh
// session). SiLU-and-mul also runs in half the GPU time (20 against 40 us at 4k tokens); RMSNorm in the same.
//
// Numerics follow ops/reference.py: sums of squares in fp32; the normalised x rounded to the weight's dtype
// before the weight multiply, as HF does; the residual stream fp32; SiLU rounded to the model dtype before the
// multiply by up, as F.silu(gate) * up does in half precision.
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include <ATen/cuda/CUDAContext.h>

#include "common/checks.h"
#include "ops.h"

namespace {

using minivllm::aligned;
using minivllm::str;

constexpr int kVec = 8;  // elements a thread moves at once: 16 bytes of half, 32 of fp32

template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&dst)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) dst[i] = static_cast<float>(v[i]);
}

template <>
__device__ __forceinline__ void load8<float>(const float* src, float (&dst)[kVec]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w, dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&src)[kVec]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = static_cast<T>(src[i]);
  *reinterpret_cast<uint4*>(dst) = raw;
}

__device__ __forceinline__ void store8(float* dst, const float (&src)[kVec]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(src[0], src[1], src[2], src[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(src[4], src[5], src[6], src[7]);
}

// The sum over the CTA (at most 1024 threads), returned to every thread.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = lane < warps ? warp_sums[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// One CTA a row of N = chunks * 8 elements. With a residual (fp32, [T, N] contiguous), it first becomes
// residual + x, written back, and is the row normalised; else x is.
template <typename in_t, typename w_t>
__global__ void rms_norm_kernel(const in_t* __restrict__ x, int64_t x_stride, float* __restrict__ residual,
                                const w_t* __restrict__ weight, w_t* __restrict__ out, int chunks, float eps) {
  const int64_t row = blockIdx.x;
  const in_t* x_row = x + row * x_stride;
  float* res_row = residual == nullptr ? nullptr : residual + row * chunks * kVec;
  float sum_sq = 0.f;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[kVec];
    load8(x_row + c * kVec, v);
    if (res_row != nullptr) {
      float r[kVec];
      load8(res_row + c * kVec, r);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] += r[i];
      store8(res_row + c * kVec, v);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum_sq += v[i] * v[i];
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / (chunks * kVec) + eps);
  w_t* out_row = out + row * chunks * kVec;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[kVec], w[kVec];
    // This thread's own writes of the first pass (the same chunks), so no barrier is needed before the re-read.
    if (res_row != nullptr) {
      load8(res_row + c * kVec, v);
    } else {
      load8(x_row + c * kVec, v);
    }
    load8(weight + c * kVec, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = w[i] * static_cast<float>(static_cast<w_t>(v[i] * inv_rms));
    store8(out_row + c * kVec, v);
  }
}

// out [T, I] = silu(gate) * up over gate_up [T, 2I] = [gate | up]; a thread an 8-element chunk of out.
template <typename T>
__global__ void silu_and_mul_kernel(const T* __restrict__ gate_up, int64_t stride, T* __restrict__ out,
                                    int chunks_per_row, int64_t chunks) {
  const int64_t chunk = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk >= chunks) return;
  const int64_t row = chunk / chunks_per_row;
  const int col = static_cast<int>(chunk - row * chunks_per_row) * kVec;
  const T* gate = gate_up + row * stride + col;
  float g[kVec], u[kVec];
  load8(gate, g);
  load8(gate + chunks_per_row * kVec, u);
#pragma unroll
  for (int i = 0; i < kVec; ++i) g[i] = static_cast<float>(static_cast<T>(g[i] / (1.f + __expf(-g[i])))) * u[i];
  store8(out + row * chunks_per_row * kVec + col, g);
}

// x [T, N]: contiguous rows of N % 8 == 0 elements, 16-byte aligned, rows a multiple of 8 elements apart.
void check_rows(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be a CUDA tensor on ",
              like.device().str(), ", got ", t.device().str());
  TORCH_CHECK(t.dim() == 2 && t.size(1) % kVec == 0 && t.stride(1) == 1 && t.stride(0) % kVec == 0 && aligned(t, 16),
              op, ": ", name, " must be [num_tokens, hidden] with hidden a multiple of 8, contiguous in its last "
              "dimension, 16-byte aligned and rows a multiple of 8 elements apart; got shape ", str(t.sizes()),
              " and strides ", str(t.strides()));
}

void check_weight(const char* op, const torch::Tensor& weight, const torch::Tensor& x) {
  TORCH_CHECK(weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16, op, ": weight dtype ",
              weight.scalar_type(), " is not supported; use torch.float16 or torch.bfloat16");
  TORCH_CHECK(weight.is_cuda() && weight.device() == x.device() && weight.dim() == 1 &&
                  weight.size(0) == x.size(1) && weight.is_contiguous() && aligned(weight, 16),
              op, ": weight must be a contiguous, 16-byte aligned [hidden] = [", str(x.size(1)),
              "] tensor on x's device, got shape ", str(weight.sizes()), " on ", weight.device().str());
}

template <typename in_t>
void launch_rms_norm(const torch::Tensor& x, float* residual, const torch::Tensor& weight, torch::Tensor& out,
                     double eps) {
  const int chunks = static_cast<int>(x.size(1) / kVec);
  const int threads = std::min(1024, (chunks + 31) / 32 * 32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MINIVLLM_DISPATCH_HALF_TYPES(weight.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<in_t, scalar_t><<<x.size(0), threads, 0, stream>>>(
        static_cast<const in_t*>(x.data_ptr()), x.stride(0), residual,
        static_cast<const scalar_t*>(weight.data_ptr()), static_cast<scalar_t*>(out.data_ptr()), chunks,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The checks and the launch of rms_norm and add_rms_norm: out [T, N] in the weight's dtype.
torch::Tensor rms_norm_rows(const char* op, const torch::Tensor& x, float* residual, const torch::Tensor& weight,
                            double eps) {
  check_rows(op, "x", x, x);
  check_weight(op, weight, x);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", std::to_string(eps));
  TORCH_CHECK(x.size(0) <= INT32_MAX, op, ": ", str(x.size(0)), " rows are more than one launch takes");
  torch::Tensor out = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  if (x.size(0) == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_rms_norm<float>(x, residual, weight, out, eps);
      break;
    case at::kHalf:
      launch_rms_norm<at::Half>(x, residual, weight, out, eps);
      break;
    case at::kBFloat16:
      launch_rms_norm<at::BFloat16>(x, residual, weight, out, eps);
      break;
    default:
      TORCH_CHECK(false, op, ": x dtype ", x.scalar_type(),
                  " is not supported; use torch.float32, torch.float16 or torch.bfloat16");
  }
  return out;
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return rms_norm_rows("rms_norm", x, nullptr, weight, eps);
}

torch::Tensor add_rms_norm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps) {
  check_rows("add_rms_norm", "residual", residual, x);
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.sizes() == x.sizes(),
              "add_rms_norm: residual must be a contiguous torch.float32 tensor of x's shape ", str(x.sizes()),
              ", got ", residual.scalar_type(), " of shape ", str(residual.sizes()));
  TORCH_CHECK(x.scalar_type() != at::kFloat, "add_rms_norm: x must be torch.float16 or torch.bfloat16 (the "
              "residual is the fp32 stream), got torch.float32");
  return rms_norm_rows("add_rms_norm", x, residual.data_ptr<float>(), weight, eps);
}

torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  check_rows("silu_and_mul", "gate_up", gate_up, gate_up);
  TORCH_CHECK(gate_up.size(1) % (2 * kVec) == 0, "silu_and_mul: gate_up's last dimension (2 x intermediate size) "
              "must be a multiple of 16, got ", str(gate_up.size(1)));
  const int64_t half = gate_up.size(1) / 2;
  torch::Tensor out = at::empty({gate_up.size(0), half}, gate_up.options());
  const int64_t chunks = gate_up.size(0) * (half / kVec);
  if (chunks == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = (chunks + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "silu_and_mul: ", str(gate_up.size(0)), " rows are more than one launch takes");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MINIVLLM_DISPATCH_HALF_TYPES(gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(gate_up.data_ptr()), gate_up.stride(0), static_cast<scalar_t*>(out.data_ptr()),
        static_cast<int>(half / kVec), chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
