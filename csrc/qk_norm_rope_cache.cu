// qk_norm_rope_cache: everything between the qkv projection and attention, in one launch. In place on the
// fused qkv output, q and k heads get the optional per-head RMSNorm (Qwen3) and neox rotary embedding; then
// k and v are written to the paged KV caches. One kernel instead of six or seven small ones per layer.
//
// One warp per (token, head) over the q, k and v heads of a row. Lane l holds elements l + 32 * j of the
// head, so rotate_half's partners d and d + D/2 are in the same lane and the norm needs one warp reduction.
// Numerics follow the torch reference: the norm in fp32, rounded to the model dtype before the weight
// multiply (as HF does); the rotary embedding in fp32, rounded once.
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <initializer_list>
#include <utility>

#include <ATen/cuda/CUDAContext.h>

#include "common/checks.h"
#include "common/pdl.cuh"
#include "ops.h"

namespace {

using minivllm::str;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <typename scalar_t>
struct Params {
  scalar_t* qkv;  // [num_tokens, row_stride], row: num_heads q heads, num_kv_heads k heads, then v heads
  const int64_t* positions;
  const float* cos;  // [max_position, D]
  const float* sin;
  const scalar_t* q_weight;  // [D], nullptr: no norm
  const scalar_t* k_weight;
  scalar_t* k_cache;  // [num_slots, num_kv_heads, D]; nullptr: no cache writes
  scalar_t* v_cache;
  const int64_t* slot_mapping;
  int64_t row_stride;
  int64_t num_warps;  // num_tokens * heads_per_token
  int64_t max_position;
  int64_t num_slots;
  float eps;
  int num_heads;
  int num_kv_heads;
  int heads_per_token;
};

template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_cache_kernel(const Params<scalar_t> p) {
  constexpr int kPerLane = kHeadDim / 32;
  constexpr int kHalf = kPerLane / 2;  // element j < kHalf of a lane pairs with element j + kHalf
  minivllm::pdl::allow_next_grid();
  const int lane = threadIdx.x % 32;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (warp >= p.num_warps) return;
  const int64_t token = warp / p.heads_per_token;
  const int head = static_cast<int>(warp - token * p.heads_per_token);
  scalar_t* row = p.qkv + token * p.row_stride + int64_t(head) * kHeadDim;
  const bool is_q = head < p.num_heads;
  // Everything below reads what earlier kernels write: qkv, the step's inputs, the caches (common/pdl.cuh).
  minivllm::pdl::wait_for_prior_grid();
  const int64_t slot = is_q || p.k_cache == nullptr ? -1 : p.slot_mapping[token];  // < 0: no cache write
  CUDA_KERNEL_ASSERT(slot < p.num_slots);
  const int first_v = p.num_heads + p.num_kv_heads;
  // This k or v head's row in the cache.
  const int64_t cache_row = (slot * p.num_kv_heads + head - (head < first_v ? p.num_heads : first_v)) * kHeadDim;

  if (head >= first_v) {  // v: a copy into the cache
    if (slot < 0) return;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p.v_cache[cache_row + lane + 32 * j] = row[lane + 32 * j];
    return;
  }

  // Every load up front, so their latencies overlap.
  const int64_t position = p.positions[token];
  CUDA_KERNEL_ASSERT(position >= 0 && position < p.max_position);
  const scalar_t* weight = is_q ? p.q_weight : p.k_weight;
  float x[kPerLane], cos[kPerLane], sin[kPerLane], w[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int d = lane + 32 * j;
    x[j] = static_cast<float>(row[d]);
    cos[j] = p.cos[position * kHeadDim + d];
    sin[j] = p.sin[position * kHeadDim + d];
    w[j] = weight != nullptr ? static_cast<float>(weight[d]) : 1.f;
  }

  if (weight != nullptr) {
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) sum_sq += x[j] * x[j];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    const float inv_rms = rsqrtf(sum_sq / kHeadDim + p.eps);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const float normed = static_cast<float>(static_cast<scalar_t>(x[j] * inv_rms));
      x[j] = static_cast<float>(static_cast<scalar_t>(w[j] * normed));
    }
  }

  scalar_t out[kPerLane];
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    out[j] = static_cast<scalar_t>(x[j] * cos[j] - x[j + kHalf] * sin[j]);
    out[j + kHalf] = static_cast<scalar_t>(x[j + kHalf] * cos[j + kHalf] + x[j] * sin[j + kHalf]);
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) row[lane + 32 * j] = out[j];
  if (slot >= 0) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p.k_cache[cache_row + lane + 32 * j] = out[j];
  }
}

void check_on_device(const torch::Tensor& t, const char* name, const torch::Tensor& qkv) {
  TORCH_CHECK(t.is_cuda() && t.device() == qkv.device(), "qk_norm_rope_cache: ", name,
              " must be a CUDA tensor on qkv's device ", qkv.device().str(), ", got ", t.device().str());
}

// positions and slot_mapping: one int64 per token.
void check_per_token(const torch::Tensor& t, const char* name, const torch::Tensor& qkv) {
  check_on_device(t, name, qkv);
  TORCH_CHECK(t.scalar_type() == at::kLong, "qk_norm_rope_cache: ", name, " must be torch.int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == qkv.size(0) && t.is_contiguous(), "qk_norm_rope_cache: ", name,
              " must be a contiguous [num_tokens] = [", str(qkv.size(0)), "] tensor, got shape ", str(t.sizes()),
              " and strides ", str(t.strides()));
}

void check_weight(const std::optional<torch::Tensor>& weight, const char* name, const torch::Tensor& qkv,
                  int64_t head_dim) {
  if (!weight.has_value()) return;
  check_on_device(*weight, name, qkv);
  TORCH_CHECK(weight->scalar_type() == qkv.scalar_type(), "qk_norm_rope_cache: ", name,
              " must have qkv's dtype ", qkv.scalar_type(), ", got ", weight->scalar_type());
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == head_dim && weight->is_contiguous(), "qk_norm_rope_cache: ",
              name, " must be a contiguous [head_dim] = [", str(head_dim), "] tensor, got shape ",
              str(weight->sizes()));
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? static_cast<const scalar_t*>(t->data_ptr()) : nullptr;
}

}  // namespace

void qk_norm_rope_cache(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                        const torch::Tensor& sin, const std::optional<torch::Tensor>& q_weight,
                        const std::optional<torch::Tensor>& k_weight, double eps, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_heads,
                        int64_t num_kv_heads) {
  TORCH_CHECK(qkv.is_cuda(), "qk_norm_rope_cache: qkv must be a CUDA tensor, got ", qkv.device().str());
  TORCH_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16, "qk_norm_rope_cache: dtype ",
              qkv.scalar_type(), " is not supported; use torch.float16 or torch.bfloat16");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0, "qk_norm_rope_cache: num_heads ", str(num_heads),
              " and num_kv_heads ", str(num_kv_heads), " must be positive");
  const int64_t heads_per_token = num_heads + 2 * num_kv_heads;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) % heads_per_token == 0,
              "qk_norm_rope_cache: qkv must be [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] with "
              "num_heads ",
              str(num_heads), " and num_kv_heads ", str(num_kv_heads), ", got shape ", str(qkv.sizes()));
  const int64_t head_dim = qkv.size(1) / heads_per_token;
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "qk_norm_rope_cache: head_dim ", str(head_dim),
              " is not supported; supported: 64, 128");
  // q, k and v are read afterwards as views of qkv by the attention kernels, which load 16-byte chunks.
  TORCH_CHECK(qkv.stride(1) == 1 && qkv.stride(0) % 8 == 0 && minivllm::aligned(qkv, 16),
              "qk_norm_rope_cache: qkv must be contiguous in its last dimension, 16-byte aligned, with a row stride "
              "that is a multiple of 8 elements, got strides ",
              str(qkv.strides()));
  check_per_token(positions, "positions", qkv);
  check_per_token(slot_mapping, "slot_mapping", qkv);
  for (const auto& [table, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_on_device(*table, name, qkv);
    TORCH_CHECK(table->scalar_type() == at::kFloat, "qk_norm_rope_cache: ", name, " must be torch.float32, got ",
                table->scalar_type());
    TORCH_CHECK(table->dim() == 2 && table->size(1) == head_dim && table->is_contiguous(), "qk_norm_rope_cache: ",
                name, " must be a contiguous [max_position, head_dim=", str(head_dim), "] tensor, got shape ",
                str(table->sizes()), " and strides ", str(table->strides()));
  }
  TORCH_CHECK(sin.sizes() == cos.sizes(), "qk_norm_rope_cache: sin shape ", str(sin.sizes()),
              " differs from cos shape ", str(cos.sizes()));
  check_weight(q_weight, "q_weight", qkv, head_dim);
  check_weight(k_weight, "k_weight", qkv, head_dim);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "qk_norm_rope_cache: eps must be a finite number >= 0, got ",
              std::to_string(eps));

  // Empty caches: the engine's profiling forward, run before the KV cache exists.
  const bool write_cache = k_cache.numel() > 0 || v_cache.numel() > 0;
  if (write_cache) {
    check_on_device(k_cache, "k_cache", qkv);
    check_on_device(v_cache, "v_cache", qkv);
    TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
                "qk_norm_rope_cache: k_cache and v_cache must have qkv's dtype ", qkv.scalar_type(), ", got ",
                k_cache.scalar_type(), " and ", v_cache.scalar_type());
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == num_kv_heads && k_cache.size(3) == head_dim &&
                    v_cache.sizes() == k_cache.sizes(),
                "qk_norm_rope_cache: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads=",
                str(num_kv_heads), ", head_dim=", str(head_dim), "], got shapes ", str(k_cache.sizes()), " and ",
                str(v_cache.sizes()));
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
                "qk_norm_rope_cache: k_cache and v_cache must be contiguous, got strides ", str(k_cache.strides()),
                " and ", str(v_cache.strides()));
  }

  const int64_t num_warps = qkv.size(0) * heads_per_token;
  if (num_warps == 0) return;
  const int64_t blocks = (num_warps + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks <= INT32_MAX, "qk_norm_rope_cache: ", str(qkv.size(0)), " tokens is too many for one launch");

  const c10::cuda::CUDAGuard guard(qkv.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MINIVLLM_DISPATCH_HALF_TYPES(qkv.scalar_type(), "qk_norm_rope_cache", [&] {
    Params<scalar_t> p{};
    p.qkv = static_cast<scalar_t*>(qkv.data_ptr());
    p.positions = positions.data_ptr<int64_t>();
    p.cos = cos.data_ptr<float>();
    p.sin = sin.data_ptr<float>();
    p.q_weight = data_or_null<scalar_t>(q_weight);
    p.k_weight = data_or_null<scalar_t>(k_weight);
    p.k_cache = write_cache ? static_cast<scalar_t*>(k_cache.data_ptr()) : nullptr;
    p.v_cache = write_cache ? static_cast<scalar_t*>(v_cache.data_ptr()) : nullptr;
    p.slot_mapping = slot_mapping.data_ptr<int64_t>();
    p.row_stride = qkv.stride(0);
    p.num_warps = num_warps;
    p.max_position = cos.size(0);
    p.num_slots = write_cache ? k_cache.size(0) * k_cache.size(1) : 0;
    p.eps = static_cast<float>(eps);
    p.num_heads = static_cast<int>(num_heads);
    p.num_kv_heads = static_cast<int>(num_kv_heads);
    p.heads_per_token = static_cast<int>(heads_per_token);
    auto kernel = head_dim == 64 ? qk_norm_rope_cache_kernel<scalar_t, 64> : qk_norm_rope_cache_kernel<scalar_t, 128>;
    minivllm::pdl::launch(kernel, dim3(blocks), dim3(kThreads), 0, stream, p);
  });
}
