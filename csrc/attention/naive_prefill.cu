// naive_attention_varlen: the first step of the prefill story, kept small and clear. For every (query
// token, query head) one thread block writes the whole row of fp32 scores q.k * scale to a global scratch,
// reduces it to a max and a sum (softmax), then forms the weighted sum of V. No tiling, no tensor cores, no
// online softmax: flash_prefill_kernel.cuh computes the same attention without writing any score to memory.
//
// Packed variable-length batch, causal aligned bottom-right (query i of a sequence with len_q queries and
// len_k keys sees keys 0 .. i + len_k - len_q, so queries after a cached prefix see the whole prefix), and
// grouped query heads (GQA/MQA). Numbers in check messages go through std::to_string, as in
// flash_prefill.cu (streaming integers into TORCH_CHECK crashed the GPU build).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <string>

#include "../common/checks.h"
#include "../ops.h"

namespace {

using minivllm::str;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadDim = 256;
constexpr int kDimsPerLane = kMaxHeadDim / 32;  // a lane owns dims lane, lane + 32, lane + 64, ...

template <typename T>
struct NaiveArgs {
  const T* q;     // [total_q, num_heads, head_dim]
  const T* k;     // [total_k, num_kv_heads, head_dim]
  const T* v;     // [total_k, num_kv_heads, head_dim]
  T* out;         // [total_q, num_heads, head_dim], contiguous
  float* scores;  // [total_q, num_heads, max_seqlen_k] scratch: one row of scores per (query, head)
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int64_t q_token_stride, q_head_stride;
  int64_t k_token_stride, k_head_stride;
  int64_t v_token_stride, v_head_stride;
  int num_heads, head_dim, group_size;  // group_size query heads share one key/value head
  int max_seqlen_q, max_seqlen_k;
  float scale;
};

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Every lane of the warp gets op over the 32 lanes' values.
template <typename Op>
__device__ float warp_reduce(float value, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffff, value, offset));
  return value;
}

// Every thread of the block gets op over the block's values. Its barriers also make the block's earlier
// global-memory writes (the score row) visible to every thread of the block.
template <typename Op>
__device__ float block_reduce(float value, Op op, float (&slots)[kWarps]) {
  value = warp_reduce(value, op);
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = value;
  __syncthreads();
  float result = slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) result = op(result, slots[w]);
  __syncthreads();  // every thread has read slots before the next reduction overwrites them
  return result;
}

// Grid: (query index within its sequence, sequence, query head). Blocks past their sequence's end return.
template <typename T>
__global__ void __launch_bounds__(kThreads) naive_prefill_kernel(const NaiveArgs<T> a) {
  const int i = blockIdx.x, seq = blockIdx.y, head = blockIdx.z;
  const int q_start = a.cu_seqlens_q[seq], len_q = a.cu_seqlens_q[seq + 1] - q_start;
  const int k_start = a.cu_seqlens_k[seq], len_k = a.cu_seqlens_k[seq + 1] - k_start;
  // The grid and the scratch rows are sized by the max_seqlen arguments: a longer sequence is a caller bug.
  CUDA_KERNEL_ASSERT(len_q <= a.max_seqlen_q && len_k <= a.max_seqlen_k);
  if (i >= len_q) return;
  const int num_keys = max(0, min(len_k, i + len_k - len_q + 1));  // causal, bottom-right
  const int64_t token = q_start + i;
  const int kv_head = head / a.group_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = a.q + token * a.q_token_stride + head * a.q_head_stride;
  const T* k = a.k + k_start * a.k_token_stride + kv_head * a.k_head_stride;
  const T* v = a.v + k_start * a.v_token_stride + kv_head * a.v_head_stride;
  float* scores = a.scores + (token * a.num_heads + head) * a.max_seqlen_k;

  __shared__ float slots[kWarps];
  __shared__ float partial_out[kWarps][kMaxHeadDim];

  float q_lane[kDimsPerLane];  // this lane's dims of q, in fp32
#pragma unroll
  for (int c = 0; c < kDimsPerLane; ++c) {
    const int d = lane + 32 * c;
    q_lane[c] = d < a.head_dim ? static_cast<float>(q[d]) : 0.f;
  }

  // 1. Scores, one warp per key: the lanes split the dot product over head_dim (coalesced loads of the key
  //    row), a shuffle reduction sums it, lane 0 stores it in the row.
  float row_max = -INFINITY;
  for (int j = warp; j < num_keys; j += kWarps) {
    const T* key = k + j * a.k_token_stride;
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < a.head_dim) dot += q_lane[c] * static_cast<float>(key[d]);
    }
    const float s = warp_reduce(dot, Sum()) * a.scale;
    if (lane == 0) scores[j] = s;
    row_max = fmaxf(row_max, s);
  }
  row_max = block_reduce(row_max, Max(), slots);

  // 2. Softmax numerators exp(s - max), one thread per key, written back over the scores; and their sum.
  float row_sum = 0.f;
  for (int j = threadIdx.x; j < num_keys; j += kThreads) {
    const float p = expf(scores[j] - row_max);
    scores[j] = p;
    row_sum += p;
  }
  row_sum = block_reduce(row_sum, Sum(), slots);

  // 3. out = sum_j p_j v_j / sum, one warp per key again with the lanes across head_dim; the warps'
  //    partial sums meet in shared memory.
  float acc[kDimsPerLane] = {};
  for (int j = warp; j < num_keys; j += kWarps) {
    const float p = scores[j];
    const T* value = v + j * a.v_token_stride;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < a.head_dim) acc[c] += p * static_cast<float>(value[d]);
    }
  }
#pragma unroll
  for (int c = 0; c < kDimsPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < a.head_dim) partial_out[warp][d] = acc[c];
  }
  __syncthreads();
  const float inv_sum = row_sum > 0.f ? 1.f / row_sum : 0.f;  // a query that sees no key gets zeros
  T* out = a.out + (token * a.num_heads + head) * a.head_dim;
  for (int d = threadIdx.x; d < a.head_dim; d += kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += partial_out[w][d];
    out[d] = static_cast<T>(o * inv_sum);
  }
}

void check_on_q_device(const torch::Tensor& t, const char* name, const torch::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "naive_attention_varlen: ", name,
              " must be a CUDA tensor on q's device ", q.device().str(), ", got ", t.device().str());
}

void check_last_dim_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, "naive_attention_varlen: ", name,
              " must be contiguous in its last dimension, got strides ", str(t.strides()));
}

void check_cu_seqlens(const torch::Tensor& t, const char* name, const torch::Tensor& q) {
  check_on_q_device(t, name, q);
  TORCH_CHECK(t.scalar_type() == at::kInt, "naive_attention_varlen: ", name, " must be torch.int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) >= 2 && t.is_contiguous(), "naive_attention_varlen: ", name,
              " must be a contiguous 1-D tensor [batch + 1] with batch >= 1, got shape ", str(t.sizes()));
}

}  // namespace

torch::Tensor naive_attention_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  TORCH_CHECK(q.is_cuda(), "naive_attention_varlen: q must be a CUDA tensor, got ", q.device().str());
  check_on_q_device(k, "k", q);
  check_on_q_device(v, "v", q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "naive_attention_varlen: q must be torch.float16 or torch.bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "naive_attention_varlen: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 3, "naive_attention_varlen: q must be [total_q, num_heads, head_dim], got shape ",
              str(q.sizes()));
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(),
              "naive_attention_varlen: k and v must both be [total_k, num_kv_heads, head_dim], got shapes ",
              str(k.sizes()), " and ", str(v.sizes()));
  const int64_t total_q = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "naive_attention_varlen: head_dim ", str(head_dim),
              " is not supported; supported: 1 to ", str(kMaxHeadDim));
  TORCH_CHECK(k.size(2) == head_dim, "naive_attention_varlen: k and v head_dim ", str(k.size(2)),
              " differs from q's ", str(head_dim));
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "naive_attention_varlen: num_heads ",
              str(num_heads), " must be a multiple of num_kv_heads ", str(num_kv_heads));
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "naive_attention_varlen: cu_seqlens_q has ",
              str(cu_seqlens_q.size(0)), " entries and cu_seqlens_k ", str(cu_seqlens_k.size(0)),
              "; both must be batch + 1");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= INT32_MAX && max_seqlen_k >= 0 && max_seqlen_k <= INT32_MAX,
              "naive_attention_varlen: max_seqlen_q and max_seqlen_k must be in 0 .. 2^31 - 1, got ",
              str(max_seqlen_q), ", ", str(max_seqlen_k));
  TORCH_CHECK(batch <= 65535 && num_heads <= 65535, "naive_attention_varlen: batch ", str(batch),
              " and num_heads ", str(num_heads), " must each be at most 65535 (grid y and z)");
  TORCH_CHECK(std::isfinite(scale) && scale > 0,
              "naive_attention_varlen: scale must be a positive finite number, got ", std::to_string(scale));

  // The output first, then the scratch: tests poison the allocator's next block of the output's size.
  torch::Tensor out = torch::empty({total_q, num_heads, head_dim}, q.options());
  if (total_q == 0 || max_seqlen_q == 0) return out;
  torch::Tensor scores = torch::empty({total_q, num_heads, max_seqlen_k}, q.options().dtype(torch::kFloat32));

  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(max_seqlen_q), static_cast<unsigned>(batch),
                  static_cast<unsigned>(num_heads));
  MINIVLLM_DISPATCH_HALF_TYPES(q.scalar_type(), "naive_attention_varlen", [&] {
    NaiveArgs<scalar_t> args{};
    args.q = q.data_ptr<scalar_t>();
    args.k = k.data_ptr<scalar_t>();
    args.v = v.data_ptr<scalar_t>();
    args.out = out.data_ptr<scalar_t>();
    args.scores = scores.data_ptr<float>();
    args.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
    args.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
    args.q_token_stride = q.stride(0);
    args.q_head_stride = q.stride(1);
    args.k_token_stride = k.stride(0);
    args.k_head_stride = k.stride(1);
    args.v_token_stride = v.stride(0);
    args.v_head_stride = v.stride(1);
    args.num_heads = static_cast<int>(num_heads);
    args.head_dim = static_cast<int>(head_dim);
    args.group_size = static_cast<int>(num_heads / num_kv_heads);
    args.max_seqlen_q = static_cast<int>(max_seqlen_q);
    args.max_seqlen_k = static_cast<int>(max_seqlen_k);
    args.scale = static_cast<float>(scale);
    naive_prefill_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
