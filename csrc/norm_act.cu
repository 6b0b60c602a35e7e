// The decode step's row-wise small ops, as kernels that take part in programmatic dependent launch (Triton's
// cannot): each calls pdl::allow_next_grid() first, so that the next kernel (a small-M linear streaming its
// weights) may start early, and reads activations only after pdl::wait_for_prior_grid().
//
// - rms_norm(x, weight): as ops/reference.py's rms_norm; add_rms_norm(x, residual, weight) first adds in fp32,
//   residual + x.float(), returns that as the new residual and normalises it. The norm is fp32 (mean of squares,
//   rsqrt(mean + eps)), the normalised value rounded to the model dtype, then multiplied by the weight and
//   rounded again, as torch does. The sum of squares is in another order than torch's reduction, so a value near
//   a rounding boundary can round the other way: the output is within 1 ulp of the reference with a unit
//   weight, 2 with another (the weight's product with a neighbouring value); the residual is exact.
// - silu_and_mul(gate_up [M, 2I]): silu(gate) * up, bit for bit torch eager's: silu in fp32 with the accurate
//   expf and an IEEE division, rounded to the dtype; the product (exact in fp32) rounded again.
// (The build flushes fp32 denormals to zero, torch does not: a difference only for values near 1e-38.)
//
// Norm layout: a row in 16-byte vectors of 8 elements, at most kMaxVecsPerLane a thread, held in registers
// between the sum of squares and the output. A row takes the fewest warps that hold it (H <= 1024: one, 4096:
// four), reduced by shuffles and, across warps, once through shared memory. One-warp rows are packed several to
// a CTA once there are more rows than SMs; wider rows get a CTA each.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/pdl.cuh"
#include "ops.h"

// libdevice's accurate expf, the one torch's silu uses: --use_fast_math maps expf to the MUFU approximation.
extern "C" __device__ float __nv_expf(float);

namespace {

using minivllm::str;

constexpr int kVec = 8;              // elements of a 16-byte vector of the model dtype
constexpr int kMaxVecsPerLane = 4;   // a lane's share of its row, in registers
constexpr int kMaxRowWarps = 16;     // H <= 16 * 32 * 4 * 8 = 16384
constexpr int kMaxRowsPerCta = 8;    // one-warp rows
constexpr int kMaxNormThreads = kMaxRowWarps * 32;
constexpr int kMaxHidden = kMaxRowWarps * 32 * kMaxVecsPerLane * kVec;
constexpr int kActThreads = 128;

// f rounded to T (at::Half or at::BFloat16, which convert explicitly, round to nearest even), as a float again.
template <typename T>
__device__ __forceinline__ float round_to(float f) { return static_cast<float>(static_cast<T>(f)); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kVec]) {
  T h[kVec];
  memcpy(h, &raw, sizeof(raw));
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = static_cast<float>(h[e]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[kVec]) {
  T h[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) h[e] = static_cast<T>(in[e]);
  uint4 raw;
  memcpy(&raw, h, sizeof(raw));
  return raw;
}

// ---- rms_norm / add_rms_norm ---------------------------------------------------------------------------

template <typename T>
struct NormParams {
  const T* x;             // [rows, hidden], row stride x_stride
  const float* residual;  // [rows, hidden], row stride residual_stride; add_rms_norm only
  const T* weight;        // [hidden]
  T* out;                 // [rows, hidden], contiguous
  float* residual_out;    // [rows, hidden], contiguous; add_rms_norm only
  int64_t x_stride;
  int64_t residual_stride;
  int64_t rows;
  int hidden;  // a multiple of kVec, <= kMaxHidden
  int row_warps;
  int rows_per_cta;  // > 1 only with one-warp rows
  float inv_hidden;  // fp32 1 / hidden: torch's mean multiplies by it
  float eps;
};

template <typename T, bool kAdd>
__global__ void __launch_bounds__(kMaxNormThreads) rms_norm_kernel(const NormParams<T> p) {
  minivllm::pdl::allow_next_grid();
  const int row_threads = p.row_warps * 32;
  const int t = threadIdx.x % row_threads;
  const int64_t row = int64_t(blockIdx.x) * p.rows_per_cta + threadIdx.x / row_threads;
  const int vecs = p.hidden / kVec;

  // The weight is written by no kernel of a step: its loads go out before the wait.
  uint4 w[kMaxVecsPerLane];
#pragma unroll
  for (int j = 0; j < kMaxVecsPerLane; ++j) {
    const int v = t + j * row_threads;
    if (v < vecs) w[j] = __ldg(reinterpret_cast<const uint4*>(p.weight) + v);
  }
  // Only packed one-warp rows are ever out of range, and they reach no barrier.
  if (row >= p.rows) return;
  minivllm::pdl::wait_for_prior_grid();

  float x[kMaxVecsPerLane][kVec];
#pragma unroll
  for (int j = 0; j < kMaxVecsPerLane; ++j) {
    const int v = t + j * row_threads;
    if (v < vecs) unpack<T>(*reinterpret_cast<const uint4*>(p.x + row * p.x_stride + v * kVec), x[j]);
  }
  if constexpr (kAdd) {
#pragma unroll
    for (int j = 0; j < kMaxVecsPerLane; ++j) {
      const int v = t + j * row_threads;
      if (v < vecs) {
        const auto* in = reinterpret_cast<const float4*>(p.residual + row * p.residual_stride + v * kVec);
        auto* out = reinterpret_cast<float4*>(p.residual_out + row * p.hidden + v * kVec);
        const float4 r0 = in[0], r1 = in[1];
        float* s = x[j];
        s[0] = __fadd_rn(r0.x, s[0]), s[1] = __fadd_rn(r0.y, s[1]), s[2] = __fadd_rn(r0.z, s[2]);
        s[3] = __fadd_rn(r0.w, s[3]), s[4] = __fadd_rn(r1.x, s[4]), s[5] = __fadd_rn(r1.y, s[5]);
        s[6] = __fadd_rn(r1.z, s[6]), s[7] = __fadd_rn(r1.w, s[7]);
        out[0] = make_float4(s[0], s[1], s[2], s[3]);
        out[1] = make_float4(s[4], s[5], s[6], s[7]);
      }
    }
  }

  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVecsPerLane; ++j) {
    if (t + j * row_threads < vecs) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum_sq += x[j][e] * x[j][e];
    }
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, mask);
  if (p.row_warps > 1) {  // the CTA is this one row
    __shared__ float warp_sums[kMaxRowWarps];
    if (t % 32 == 0) warp_sums[t / 32] = sum_sq;
    __syncthreads();
    sum_sq = 0.f;
    for (int i = 0; i < p.row_warps; ++i) sum_sq += warp_sums[i];
  }
  const float inv_rms = rsqrtf(__fadd_rn(__fmul_rn(sum_sq, p.inv_hidden), p.eps));

#pragma unroll
  for (int j = 0; j < kMaxVecsPerLane; ++j) {
    const int v = t + j * row_threads;
    if (v < vecs) {
      float weight[kVec], y[kVec];
      unpack<T>(w[j], weight);
#pragma unroll
      for (int e = 0; e < kVec; ++e) y[e] = __fmul_rn(weight[e], round_to<T>(__fmul_rn(x[j][e], inv_rms)));
      *reinterpret_cast<uint4*>(p.out + row * p.hidden + v * kVec) = pack<T>(y);
    }
  }
}

// ---- silu_and_mul --------------------------------------------------------------------------------------

template <typename T>
struct ActParams {
  const T* gate_up;  // [rows, 2 * inner], row stride in_stride
  T* out;            // [rows, inner], contiguous
  int64_t in_stride;
  int64_t vecs;      // rows * inner / kVec
  int row_vecs;      // inner / kVec
};

template <typename T>
__global__ void __launch_bounds__(kActThreads) silu_and_mul_kernel(const ActParams<T> p) {
  minivllm::pdl::allow_next_grid();
  const int64_t i = int64_t(blockIdx.x) * kActThreads + threadIdx.x;
  if (i >= p.vecs) return;
  const int64_t row = i / p.row_vecs;
  const int v = static_cast<int>(i - row * p.row_vecs);
  minivllm::pdl::wait_for_prior_grid();
  const auto* gate = reinterpret_cast<const uint4*>(p.gate_up + row * p.in_stride) + v;
  float g[kVec], u[kVec], y[kVec];
  unpack<T>(gate[0], g);
  unpack<T>(gate[p.row_vecs], u);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float silu = round_to<T>(__fdiv_rn(g[e], __fadd_rn(1.f, __nv_expf(-g[e]))));
    y[e] = __fmul_rn(silu, u[e]);
  }
  reinterpret_cast<uint4*>(p.out)[i] = pack<T>(y);
}

// ---- checks and launch ---------------------------------------------------------------------------------

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t [rows, cols] of dtype on `like`'s device, with rows of whole 16-byte vectors: contiguous in the last
// dimension, a row stride of whole vectors, 16-byte aligned.
void check_rows(const char* op, const char* name, const torch::Tensor& t, at::ScalarType dtype,
                const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be a CUDA tensor on ",
              like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [num_rows, hidden], got shape ", str(t.sizes()));
  const int64_t vec = 16 / t.element_size();
  TORCH_CHECK(t.size(1) % kVec == 0, op, ": ", name, "'s last dimension must be a multiple of ", kVec,
              ", got shape ", str(t.sizes()));
  TORCH_CHECK(t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % vec == 0) && aligned16(t), op, ": ", name,
              " must be contiguous in its last dimension, 16-byte aligned, with a row stride that is a multiple of ",
              vec, " elements, got strides ", str(t.strides()));
}

// x [rows, hidden] in T, normalised with weight [hidden] into out; with residual (fp32, x's shape), x is added
// to it first and the sum returned in residual_out.
template <typename T, bool kAdd>
void launch_norm(const char* op, const torch::Tensor& x, const torch::Tensor* residual, const torch::Tensor& weight,
                 double eps, torch::Tensor& out, torch::Tensor* residual_out) {
  check_rows(op, "x", x, weight.scalar_type(), weight);
  if constexpr (kAdd) {
    check_rows(op, "residual", *residual, at::kFloat, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual must have x's shape ", str(x.sizes()), ", got ",
                str(residual->sizes()));
  }
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous() && aligned16(weight), op,
              ": weight must be a contiguous, 16-byte aligned [hidden] = [", str(hidden), "] tensor, got shape ",
              str(weight.sizes()), " and strides ", str(weight.strides()));
  TORCH_CHECK(hidden >= kVec && hidden <= kMaxHidden, op, ": hidden size ", str(hidden), " is not supported; ",
              "supported: multiples of ", kVec, " up to ", kMaxHidden);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", std::to_string(eps));
  out = at::empty({rows, hidden}, x.options());
  if constexpr (kAdd) *residual_out = at::empty({rows, hidden}, residual->options());
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const int vecs = static_cast<int>(hidden / kVec);
  const int row_warps = (vecs + 32 * kMaxVecsPerLane - 1) / (32 * kMaxVecsPerLane);
  // One-warp rows: one a CTA while there are SMs to spread them over, then up to kMaxRowsPerCta.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int rows_per_cta =
      row_warps > 1 ? 1 : static_cast<int>(std::clamp<int64_t>((rows + sms - 1) / sms, 1, kMaxRowsPerCta));
  const int64_t blocks = (rows + rows_per_cta - 1) / rows_per_cta;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": ", str(rows), " rows is too many for one launch");

  NormParams<T> p{};
  p.x = static_cast<const T*>(x.data_ptr());
  p.weight = static_cast<const T*>(weight.data_ptr());
  p.out = static_cast<T*>(out.data_ptr());
  p.x_stride = x.stride(0);
  if constexpr (kAdd) {
    p.residual = residual->data_ptr<float>();
    p.residual_out = residual_out->data_ptr<float>();
    p.residual_stride = residual->stride(0);
  }
  p.rows = rows;
  p.hidden = static_cast<int>(hidden);
  p.row_warps = row_warps;
  p.rows_per_cta = rows_per_cta;
  p.inv_hidden = static_cast<float>(1.0 / static_cast<double>(hidden));
  p.eps = static_cast<float>(eps);
  minivllm::pdl::launch(rms_norm_kernel<T, kAdd>, dim3(static_cast<unsigned>(blocks)),
                        dim3(row_warps * 32 * rows_per_cta), 0, at::cuda::getCurrentCUDAStream(), p);
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  torch::Tensor out;
  MINIVLLM_DISPATCH_HALF_TYPES(weight.scalar_type(), "rms_norm", [&] {
    launch_norm<scalar_t, false>("rms_norm", x, nullptr, weight, eps, out, nullptr);
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                                      const torch::Tensor& weight, double eps) {
  torch::Tensor out, residual_out;
  MINIVLLM_DISPATCH_HALF_TYPES(weight.scalar_type(), "add_rms_norm", [&] {
    launch_norm<scalar_t, true>("add_rms_norm", x, &residual, weight, eps, out, &residual_out);
  });
  return {out, residual_out};
}

torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  constexpr const char* op = "silu_and_mul";
  torch::Tensor out;
  MINIVLLM_DISPATCH_HALF_TYPES(gate_up.scalar_type(), "silu_and_mul", [&] {
    check_rows(op, "gate_up", gate_up, gate_up.scalar_type(), gate_up);
    TORCH_CHECK(gate_up.size(1) % (2 * kVec) == 0, op, ": gate_up must be [num_rows, 2 * intermediate] with the ",
                "intermediate size a multiple of ", kVec, ", got shape ", str(gate_up.sizes()));
    const int64_t rows = gate_up.size(0), inner = gate_up.size(1) / 2;
    out = at::empty({rows, inner}, gate_up.options());
    const int64_t vecs = rows * inner / kVec;
    if (vecs == 0) return;
    const int64_t blocks = (vecs + kActThreads - 1) / kActThreads;
    TORCH_CHECK(blocks <= INT32_MAX, op, ": shape ", str(gate_up.sizes()), " is too large for one launch");
    const c10::cuda::CUDAGuard guard(gate_up.device());
    const ActParams<scalar_t> p{static_cast<const scalar_t*>(gate_up.data_ptr()),
                                static_cast<scalar_t*>(out.data_ptr()), gate_up.stride(0), vecs,
                                static_cast<int>(inner / kVec)};
    minivllm::pdl::launch(silu_and_mul_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(kActThreads), 0,
                          at::cuda::getCurrentCUDAStream(), p);
  });
  return out;
}
