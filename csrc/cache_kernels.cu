// reshape_and_cache: scatter this step's keys and values into the paged KV caches.
//
// A pure copy, so dtype does not matter to the kernel: each thread moves one 16-byte chunk of one head's
// key row and the same chunk of its value row, both loads issued before either store. One instantiation
// serves every dtype and head_dim.
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>

#include <ATen/cuda/CUDAContext.h>

#include "common/checks.h"
#include "ops.h"

namespace {

constexpr int kThreads = 256;

// key/value strides in 16-byte chunks; the cache row of one token is num_kv_heads * chunks_per_head chunks.
__global__ void __launch_bounds__(kThreads)
    reshape_and_cache_kernel(const uint4* __restrict__ key, const uint4* __restrict__ value,
                             uint4* __restrict__ k_cache, uint4* __restrict__ v_cache,
                             const int64_t* __restrict__ slot_mapping, int64_t key_stride_token,
                             int64_t key_stride_head, int64_t value_stride_token, int64_t value_stride_head,
                             int chunks_per_head, int chunks_per_token, int64_t num_slots, int64_t total_chunks) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total_chunks) return;
  const int64_t token = i / chunks_per_token;
  const int in_token = static_cast<int>(i - token * chunks_per_token);
  const int head = in_token / chunks_per_head;
  const int chunk = in_token - head * chunks_per_head;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding of a captured batch
  CUDA_KERNEL_ASSERT(slot < num_slots);
  const uint4 k = key[token * key_stride_token + head * key_stride_head + chunk];
  const uint4 v = value[token * value_stride_token + head * value_stride_head + chunk];
  const int64_t dst = slot * chunks_per_token + in_token;
  k_cache[dst] = k;
  v_cache[dst] = v;
}

}  // namespace

void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& k_cache,
                       torch::Tensor& v_cache, const torch::Tensor& slot_mapping) {
  MINIVLLM_CHECK_CUDA(key);
  const std::initializer_list<const torch::Tensor*> others = {&value, &k_cache, &v_cache, &slot_mapping};
  for (const torch::Tensor* t : others) {
    TORCH_CHECK(t->device() == key.device(), "reshape_and_cache: all tensors must be on key's device ",
                key.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(key.scalar_type() == at::kHalf || key.scalar_type() == at::kBFloat16, "reshape_and_cache: dtype ",
              key.scalar_type(), " is not supported; use torch.float16 or torch.bfloat16");
  MINIVLLM_CHECK_DTYPE(value, key.scalar_type());
  MINIVLLM_CHECK_DTYPE(k_cache, key.scalar_type());
  MINIVLLM_CHECK_DTYPE(v_cache, key.scalar_type());
  MINIVLLM_CHECK_DTYPE(slot_mapping, torch::kInt64);
  TORCH_CHECK(k_cache.dim() == 4,
              "reshape_and_cache: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "reshape_and_cache: v_cache shape ", v_cache.sizes(),
              " differs from k_cache shape ", k_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "reshape_and_cache: k_cache and v_cache must be contiguous, got strides ", k_cache.strides(), " and ",
              v_cache.strides());
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "reshape_and_cache: head_dim ", head_dim,
              " is not supported; supported: 64, 128");
  TORCH_CHECK(block_size >= 16 && block_size <= 256 && (block_size & (block_size - 1)) == 0,
              "reshape_and_cache: block_size ", block_size, " is not supported; use a power of two in 16..256");
  TORCH_CHECK(key.dim() == 3 && key.size(1) == num_kv_heads && key.size(2) == head_dim,
              "reshape_and_cache: key must be [num_tokens, num_kv_heads=", num_kv_heads, ", head_dim=", head_dim,
              "] to match the cache, got shape ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "reshape_and_cache: value shape ", value.sizes(),
              " differs from key shape ", key.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0),
              "reshape_and_cache: slot_mapping must be [num_tokens=", key.size(0), "], got shape ",
              slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.is_contiguous(), "reshape_and_cache: slot_mapping must be contiguous, got strides ",
              slot_mapping.strides());
  MINIVLLM_CHECK_LAST_DIM_CONTIGUOUS(key);
  MINIVLLM_CHECK_LAST_DIM_CONTIGUOUS(value);
  // 16-byte chunks: every address the kernel forms must stay 16-byte aligned.
  constexpr int64_t kElemsPerChunk = 8;
  const std::initializer_list<const torch::Tensor*> vectorised = {&key, &value, &k_cache, &v_cache};
  for (const torch::Tensor* t : vectorised) {
    TORCH_CHECK(minivllm::aligned(*t, 16),
                "reshape_and_cache: key, value and the caches must start at 16-byte aligned addresses");
  }
  TORCH_CHECK(key.stride(0) % kElemsPerChunk == 0 && key.stride(1) % kElemsPerChunk == 0 &&
                  value.stride(0) % kElemsPerChunk == 0 && value.stride(1) % kElemsPerChunk == 0,
              "reshape_and_cache: key and value token and head strides must be multiples of 8 elements (16 bytes), "
              "got ",
              key.strides(), " and ", value.strides());

  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;
  const int chunks_per_head = static_cast<int>(head_dim / kElemsPerChunk);
  const int chunks_per_token = static_cast<int>(num_kv_heads) * chunks_per_head;
  const int64_t total_chunks = num_tokens * chunks_per_token;
  const int64_t blocks = (total_chunks + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "reshape_and_cache: ", num_tokens, " tokens is too many for one launch");

  const c10::cuda::CUDAGuard guard(key.device());
  reshape_and_cache_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint4*>(key.data_ptr()), static_cast<const uint4*>(value.data_ptr()),
      static_cast<uint4*>(k_cache.data_ptr()), static_cast<uint4*>(v_cache.data_ptr()),
      slot_mapping.data_ptr<int64_t>(), key.stride(0) / kElemsPerChunk, key.stride(1) / kElemsPerChunk,
      value.stride(0) / kElemsPerChunk, value.stride(1) / kElemsPerChunk, chunks_per_head, chunks_per_token,
      k_cache.size(0) * block_size, total_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
