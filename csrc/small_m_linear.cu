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
//
// Fusions (issue 17: a batch-1 decode step was ~9 kernels a layer of 1-6 us each plus launch gaps; these take the
// two RMSNorms, the two residual adds and SiLU-and-mul into the four products). Each is a template flag, so the
// plain product's instantiation is the kernel it was (the same SASS but for its parameters' offsets).
// - RMSNorm prologue (norm_weight): out = rms_norm(x, norm_weight, eps) @ W^T with x fp32 (the residual stream)
//   or in the weights' dtype. No pre-pass over x: every lane already loads its share of rows g and g + 8, so it
//   adds their squares in fp32 as it goes and feeds the mma with x * gamma rounded to the weights' dtype (the one
//   extra rounding, as the unfused path rounds the normalised x); 1 / rms is a per-row factor, so it is applied
//   to the fp32 sums in the epilogue, once the squares are summed over the lanes t (shuffles) and the warps
//   (shared memory). Every CTA recomputes the rows' sums from the x it reads anyway; bias comes after scaling.
// - Residual epilogue (residual): out(fp32) = x @ W^T (+ bias) + residual, the new residual stream; the
//   product is never rounded to the model's dtype (the unfused path rounds it before the add).
// - SiLU gate (silu_gate): weight = [gate rows; up rows], [2I, K], as ColumnParallelLinear packs gate_up_proj;
//   out[M, I] = silu(x Wg^T) * (x Wu^T) in fp32, rounded once. A CTA's 8 B columns are gate rows j..j+3 and
//   the matching up rows I+j..I+j+3, so both halves of an output meet in the CTA's shared memory.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/cuda/CUDAContext.h>

#include <cmath>
#include <type_traits>

#include "common/checks.h"
#include "common/convert.cuh"
#include "common/pdl.cuh"
#include "common/ptx.cuh"
#include "ops.h"

namespace {

using minivllm::from_float;
using minivllm::str;
using minivllm::to_float;
using minivllm::ptx::load_streaming_16;
using minivllm::ptx::mma_16816;
using minivllm::ptx::pack2;

constexpr int kMaxM = 16;  // the 16 rows of the mma's A operand
constexpr int kRows = 8;   // weight rows per CTA: the mma's 8 B columns
constexpr int kWarps = 8;  // split K
constexpr int kThreads = kWarps * 32;
constexpr int kChunkElems = 8;      // 16 bytes
constexpr int kChunksPerStep = 4;   // a row's chunks per load instruction: lanes t = 0..3
constexpr int kAccumulators = 4;    // independent mma chains, so the products do not serialise

enum class Epilogue { kStore, kAddResidual, kSiluGate };

// Chunks in flight per lane. With M > 8 each also holds a second x chunk; 8 of them would spill at the 128
// registers that two CTAs per SM allow. The norm holds gamma's chunk as well, and an fp32 x chunk is twice a
// half one, so it takes fewer: ptxas (CUDA 13, sm_90a) fits 6 and 4 (half x), 6 and 3 (fp32 x) in 119-128
// registers without spilling; one more of either reaches 128 (fp32 x) or spills. Not yet tuned on a GPU.
template <bool kHighRows, typename XT, bool kNorm>
constexpr int kUnroll = !kNorm ? (kHighRows ? 6 : 8) : std::is_same_v<XT, float> ? (kHighRows ? 3 : 6)
                                                                                   : (kHighRows ? 4 : 6);

// Outputs per CTA: its 8 weight rows, or with the SiLU gate 4 (gate row, up row) pairs.
template <Epilogue kEpilogue>
constexpr int kCols = kEpilogue == Epilogue::kSiluGate ? kRows / 2 : kRows;

template <typename T, typename XT, typename OutT>
struct Params {
  const XT* x;      // [m, x_stride]: T, or fp32 with the norm
  const T* weight;  // [n, weight_stride]
  const T* bias;    // [n] or nullptr
  OutT* out;        // [m, out_cols], contiguous
  int64_t x_stride;
  int64_t weight_stride;
  int m;
  int n;
  int k_chunks;           // K / 8
  const T* norm_weight;   // [K], with the norm
  float eps;              // with the norm
  const float* residual;  // [m, n] contiguous, with the residual epilogue
};

// 8 fp32 elements of an x row: one chunk of K, as 8 T elements are in a uint4.
struct FloatChunk {
  float4 lo, hi;
};
template <typename XT>
using XChunk = std::conditional_t<std::is_same_v<XT, float>, FloatChunk, uint4>;

// 16 bytes of an x row through L1 (every CTA reads all of x), zeros when !valid.
__device__ __forceinline__ uint4 load_x_chunk(const uint4* ptr, bool valid) {
  return valid ? __ldg(ptr) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ FloatChunk load_x_chunk(const FloatChunk* ptr, bool valid) {
  const float4* f = reinterpret_cast<const float4*>(ptr);
  return valid ? FloatChunk{__ldg(f), __ldg(f + 1)} : FloatChunk{};
}

// One register of T pairs as two floats, the lower half first (pack2's inverse).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& chunk, float (&out)[8]) {
  const uint32_t words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = unpack2<T>(words[i]);
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

template <typename T>
__device__ __forceinline__ void unpack8(const FloatChunk& chunk, float (&out)[8]) {
  const float values[8] = {chunk.lo.x, chunk.lo.y, chunk.lo.z, chunk.lo.w,
                           chunk.hi.x, chunk.hi.y, chunk.hi.z, chunk.hi.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = values[i];
}

// The norm's A operand for a chunk: x * gamma rounded to T pairs, in the layout the chunk had (element i in
// the lower half of word i / 2); x's squares go into sum_sq in fp32.
template <typename T, typename Chunk>
__device__ __forceinline__ uint4 scaled_by_gamma(const Chunk& x, const uint4& gamma, float& sum_sq) {
  float v[8], gm[8];
  unpack8<T>(x, v);
  unpack8<T>(gamma, gm);
#pragma unroll
  for (int i = 0; i < 8; ++i) sum_sq = fmaf(v[i], v[i], sum_sq);
  return make_uint4(pack2<T>(v[0] * gm[0], v[1] * gm[1]), pack2<T>(v[2] * gm[2], v[3] * gm[3]),
                    pack2<T>(v[4] * gm[4], v[5] * gm[5]), pack2<T>(v[6] * gm[6], v[7] * gm[7]));
}

// kHighRows: M > 8, so x's rows 8..15 (A rows g + 8) are loaded too; otherwise they are zeros.
template <typename T, typename XT, typename OutT, bool kHighRows, bool kNorm, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, 2) small_m_linear_kernel(const Params<T, XT, OutT> p) {
  constexpr int kU = kUnroll<kHighRows, XT, kNorm>;
  constexpr bool kSilu = kEpilogue == Epilogue::kSiluGate;
  __shared__ float partial[kWarps][kMaxM][kRows];
  __shared__ float sum_sq_part[kNorm ? kWarps : 1][kMaxM];  // the norm's sums of squares of x's rows
  minivllm::pdl::allow_next_grid();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // B column g is output column first_col + g, or with the SiLU gate output column first_col + g % 4, its gate
  // row (g < 4) or its up row (g >= 4, I rows further down).
  const int out_cols = kSilu ? p.n / 2 : p.n;
  const int first_col = blockIdx.x * kCols<kEpilogue>;
  const int col_g = first_col + (kSilu ? g % 4 : g);
  const int weight_row_g = kSilu && g >= 4 ? out_cols + col_g : col_g;
  const bool row_valid = col_g < out_cols;
  const bool low_valid = g < p.m, high_valid = kHighRows && g + 8 < p.m;
  // Clamped so that no pointer leaves its tensor; the loads of invalid rows are predicated off.
  const uint4* weight_row =
      reinterpret_cast<const uint4*>(p.weight + int64_t(min(weight_row_g, p.n - 1)) * p.weight_stride);
  const XChunk<XT>* x_low = reinterpret_cast<const XChunk<XT>*>(p.x + int64_t(min(g, p.m - 1)) * p.x_stride);
  const XChunk<XT>* x_high =
      reinterpret_cast<const XChunk<XT>*>(p.x + int64_t(min(g + 8, p.m - 1)) * p.x_stride);
  const uint4* gamma = reinterpret_cast<const uint4*>(p.norm_weight);

  // Warp w takes a contiguous range of steps; a step is 4 chunks of each of the 8 rows (32 elements of K).
  const int steps = (p.k_chunks + kChunksPerStep - 1) / kChunksPerStep;
  const int step_end = (warp + 1) * steps / kWarps;
  auto in_k = [&](int step, int u) { return step + u < step_end && (step + u) * kChunksPerStep + t < p.k_chunks; };
  // The weights of an iteration are loaded at the end of the one before (off past step_end), so that the first
  // iteration's stream starts before the wait for the kernel that writes x (common/pdl.cuh).
  uint4 w[kU];
  auto load_weights = [&](int step) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      w[u] = load_streaming_16(weight_row + (step + u) * kChunksPerStep + t, in_k(step, u) && row_valid);
    }
  };
  int step = warp * steps / kWarps;
  load_weights(step);
  minivllm::pdl::wait_for_prior_grid();
  // Thread i < kMaxM * kCols finishes output (i / kCols, first_col + i % kCols), if it exists; with the residual
  // epilogue it loads that element of the residual (an activation: after the wait) now, so that the load's
  // latency hides behind the weight stream instead of adding to the tail.
  float residual = 0.f;
  if constexpr (kEpilogue == Epilogue::kAddResidual) {
    const int m = threadIdx.x / kCols<kEpilogue>, col = first_col + threadIdx.x % kCols<kEpilogue>;
    if (threadIdx.x < kMaxM * kCols<kEpilogue> && m < p.m && col < out_cols) {
      residual = __ldg(p.residual + int64_t(m) * p.n + col);
    }
  }
  float acc[kAccumulators][4] = {};
  float sum_sq_low = 0.f, sum_sq_high = 0.f;  // the norm: this lane's share of rows g and g + 8
  for (; step < step_end; step += kU) {
    XChunk<XT> low[kU], high[kU];
    uint4 gm[kNorm ? kU : 1];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int chunk = (step + u) * kChunksPerStep + t;
      low[u] = load_x_chunk(x_low + chunk, in_k(step, u) && low_valid);
      if constexpr (kHighRows) {
        high[u] = load_x_chunk(x_high + chunk, in_k(step, u) && high_valid);
      } else {
        high[u] = XChunk<XT>{};
      }
      if constexpr (kNorm) gm[u] = load_x_chunk(gamma + chunk, in_k(step, u));
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      uint4 a_low, a_high = make_uint4(0, 0, 0, 0);
      if constexpr (kNorm) {
        a_low = scaled_by_gamma<T>(low[u], gm[u], sum_sq_low);
        if constexpr (kHighRows) a_high = scaled_by_gamma<T>(high[u], gm[u], sum_sq_high);
      } else {
        a_low = low[u];
        a_high = high[u];
      }
      const uint32_t a0[4] = {a_low.x, a_high.x, a_low.y, a_high.y};
      const uint32_t a1[4] = {a_low.z, a_high.z, a_low.w, a_high.w};
      mma_16816<T>(acc[(2 * u) % kAccumulators], a0, w[u].x, w[u].y);
      mma_16816<T>(acc[(2 * u + 1) % kAccumulators], a1, w[u].z, w[u].w);
    }
    load_weights(step + kU);
  }

  // acc: (x row g, B columns 2t and 2t+1) in [0], [1]; x row g + 8 in [2], [3].
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 1; j < kAccumulators; ++j) acc[0][i] += acc[j][i];
  }
  partial[warp][g][2 * t] = acc[0][0];
  partial[warp][g][2 * t + 1] = acc[0][1];
  partial[warp][g + 8][2 * t] = acc[0][2];
  partial[warp][g + 8][2 * t + 1] = acc[0][3];
  if constexpr (kNorm) {
    // Lanes t = 0..3 of group g streamed interleaved chunks of the same two rows.
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      sum_sq_low += __shfl_xor_sync(0xffffffffu, sum_sq_low, offset);
      sum_sq_high += __shfl_xor_sync(0xffffffffu, sum_sq_high, offset);
    }
    if (t == 0) {
      sum_sq_part[warp][g] = sum_sq_low;
      sum_sq_part[warp][g + 8] = sum_sq_high;
    }
  }
  __syncthreads();
  if (threadIdx.x >= kMaxM * kCols<kEpilogue>) return;
  const int out_m = threadIdx.x / kCols<kEpilogue>, out_col = first_col + threadIdx.x % kCols<kEpilogue>;
  if (out_m >= p.m || out_col >= out_cols) return;
  float inv_rms = 1.f;
  if constexpr (kNorm) {
    float sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) sum_sq += sum_sq_part[i][out_m];
    inv_rms = rsqrtf(sum_sq / float(p.k_chunks * kChunkElems) + p.eps);
  }
  // B column c's sum over the warps: weight row `row`'s output, normalised, plus its bias.
  auto column = [&](int c, int row) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) sum += partial[i][out_m][c];
    if constexpr (kNorm) sum *= inv_rms;
    if (p.bias != nullptr) sum += to_float(p.bias[row]);
    return sum;
  };
  const int c = threadIdx.x % kCols<kEpilogue>;
  float out;
  if constexpr (kSilu) {
    const float gate = column(c, out_col), up = column(c + kCols<kEpilogue>, out_cols + out_col);
    out = gate / (1.f + __expf(-gate)) * up;
  } else {
    out = column(c, out_col);
    if constexpr (kEpilogue == Epilogue::kAddResidual) out += residual;
  }
  p.out[int64_t(out_m) * out_cols + out_col] = from_float<OutT>(out);
}

// The op's tensors, checked, in one place for the dispatch below.
struct Operands {
  const torch::Tensor& x;
  const torch::Tensor& weight;
  const std::optional<torch::Tensor>& bias;
  const std::optional<torch::Tensor>& norm_weight;
  double eps;
  const std::optional<torch::Tensor>& residual;
  torch::Tensor& out;
};

template <typename T, typename XT, typename OutT, bool kNorm, Epilogue kEpilogue>
void launch(const Operands& a, cudaStream_t stream) {
  Params<T, XT, OutT> p{};
  p.x = static_cast<const XT*>(a.x.data_ptr());
  p.weight = static_cast<const T*>(a.weight.data_ptr());
  p.bias = a.bias.has_value() ? static_cast<const T*>(a.bias->data_ptr()) : nullptr;
  p.out = static_cast<OutT*>(a.out.data_ptr());
  p.x_stride = a.x.stride(0);
  p.weight_stride = a.weight.stride(0);
  p.m = static_cast<int>(a.x.size(0));
  p.n = static_cast<int>(a.weight.size(0));
  p.k_chunks = static_cast<int>(a.x.size(1) / kChunkElems);
  if constexpr (kNorm) {
    p.norm_weight = static_cast<const T*>(a.norm_weight->data_ptr());
    p.eps = static_cast<float>(a.eps);
  }
  if constexpr (kEpilogue == Epilogue::kAddResidual) p.residual = a.residual->data_ptr<float>();
  const int blocks = (static_cast<int>(a.out.size(1)) + kCols<kEpilogue> - 1) / kCols<kEpilogue>;
  minivllm::pdl::launch(p.m > 8 ? small_m_linear_kernel<T, XT, OutT, true, kNorm, kEpilogue>
                                : small_m_linear_kernel<T, XT, OutT, false, kNorm, kEpilogue>,
                        dim3(blocks), dim3(kThreads), 0, stream, p);
}

template <typename T, typename OutT, Epilogue kEpilogue>
void launch_for_prologue(const Operands& a, cudaStream_t stream) {
  if (!a.norm_weight.has_value()) return launch<T, T, OutT, false, kEpilogue>(a, stream);
  if (a.x.scalar_type() == at::kFloat) return launch<T, float, OutT, true, kEpilogue>(a, stream);
  launch<T, T, OutT, true, kEpilogue>(a, stream);
}

template <typename T>
void launch_for_epilogue(const Operands& a, bool fp32_out, bool silu_gate, cudaStream_t stream) {
  if (silu_gate) return launch_for_prologue<T, T, Epilogue::kSiluGate>(a, stream);
  if (a.residual.has_value()) return launch_for_prologue<T, float, Epilogue::kAddResidual>(a, stream);
  if (fp32_out) return launch_for_prologue<T, float, Epilogue::kStore>(a, stream);
  launch_for_prologue<T, T, Epilogue::kStore>(a, stream);
}

// `owner` names whose dtype t must have: x's, or the weight's when x is the fp32 residual stream.
void check_on_device(const torch::Tensor& t, const char* name, const torch::Tensor& x, at::ScalarType dtype,
                     const char* owner) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "small_m_linear: ", name,
              " must be a CUDA tensor on x's device ", x.device().str(), ", got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == dtype, "small_m_linear: ", name, " must have ", owner, " dtype ", dtype, ", got ",
              t.scalar_type());
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

void check_norm(const torch::Tensor& norm_weight, double eps, const torch::Tensor& x, at::ScalarType dtype) {
  check_on_device(norm_weight, "norm_weight", x, dtype, "the weight's");
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(1) && norm_weight.stride(0) == 1 &&
                  reinterpret_cast<uintptr_t>(norm_weight.data_ptr()) % 16 == 0,
              "small_m_linear: norm_weight must be a contiguous, 16-byte aligned [K] = [", str(x.size(1)),
              "] tensor, got shape ", str(norm_weight.sizes()), " and strides ", str(norm_weight.strides()));
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "small_m_linear: eps must be finite and >= 0, got ", eps);
}

void check_residual(const torch::Tensor& residual, const torch::Tensor& x, int64_t n, bool fp32_out) {
  TORCH_CHECK(fp32_out, "small_m_linear: a residual needs fp32_out=True: the sum is the fp32 residual stream");
  check_on_device(residual, "residual", x, at::kFloat, "the fp32 output's");
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == x.size(0) && residual.size(1) == n &&
                  residual.is_contiguous(),
              "small_m_linear: residual must be a contiguous [M, N] = [", str(x.size(0)), ", ", str(n),
              "] tensor, got shape ", str(residual.sizes()), " and strides ", str(residual.strides()));
}

void check_silu_gate(int64_t n, bool fp32_out, bool has_residual) {
  TORCH_CHECK(!has_residual, "small_m_linear: silu_gate and a residual cannot be combined; add the residual after "
              "the down projection");
  TORCH_CHECK(!fp32_out, "small_m_linear: silu_gate writes the weight's dtype; pass fp32_out=False");
  TORCH_CHECK(n % 2 == 0, "small_m_linear: silu_gate needs weight = [gate rows; up rows], an even number of rows, "
              "got ", str(n));
}

}  // namespace

torch::Tensor small_m_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const std::optional<torch::Tensor>& bias, bool fp32_out,
                             const std::optional<torch::Tensor>& norm_weight, double eps,
                             const std::optional<torch::Tensor>& residual, bool silu_gate) {
  TORCH_CHECK(x.is_cuda(), "small_m_linear: x must be a CUDA tensor, got ", x.device().str());
  // An fp32 x is the residual stream, which only the norm reads (its product runs in the weight's dtype).
  const bool fp32_x = x.scalar_type() == at::kFloat && norm_weight.has_value();
  const at::ScalarType dtype = fp32_x ? weight.scalar_type() : x.scalar_type();
  const char* owner = fp32_x ? "the weight's" : "x's";
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "small_m_linear: dtype ", dtype,
              " is not supported; use torch.float16 or torch.bfloat16 (x may also be fp32 with norm_weight)");
  check_on_device(weight, "weight", x, dtype, owner);
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
    check_on_device(*bias, "bias", x, dtype, owner);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->stride(0) == 1, "small_m_linear: bias must be a "
                "contiguous [N] = [", str(n), "] tensor, got shape ", str(bias->sizes()), " and strides ",
                str(bias->strides()));
  }
  if (norm_weight.has_value()) check_norm(*norm_weight, eps, x, dtype);
  if (silu_gate) check_silu_gate(n, fp32_out, residual.has_value());
  if (residual.has_value()) check_residual(*residual, x, n, fp32_out);

  const int64_t out_cols = silu_gate ? n / 2 : n;
  torch::Tensor out = torch::empty({m, out_cols}, x.options().dtype(fp32_out ? at::kFloat : dtype));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Operands operands{x, weight, bias, norm_weight, eps, residual, out};
  if (dtype == at::kHalf) {
    launch_for_epilogue<__half>(operands, fp32_out, silu_gate, stream);
  } else {
    launch_for_epilogue<__nv_bfloat16>(operands, fp32_out, silu_gate, stream);
  }
  return out;
}
