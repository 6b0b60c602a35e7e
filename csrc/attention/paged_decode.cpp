// paged_attention_decode: input checks and dispatch to the (dtype, head_dim) instantiations.
#include "../common/checks.h"
#include "../ops.h"
#include "paged_decode.cuh"

#include <c10/cuda/CUDAGuard.h>

namespace {

void check_aligned_16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start at a 16-byte aligned address (the kernels use 16-byte loads)");
}

}  // namespace

torch::Tensor paged_attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale,
                                     const std::optional<torch::Tensor>& total_context_len,
                                     std::optional<int64_t> split_kv_heads) {
  MINIVLLM_CHECK_CUDA(q);
  MINIVLLM_CHECK_CUDA(k_cache);
  MINIVLLM_CHECK_CUDA(v_cache);
  MINIVLLM_CHECK_CUDA(block_tables);
  MINIVLLM_CHECK_CUDA(context_lens);
  for (const torch::Tensor* t : {&k_cache, &v_cache, &block_tables, &context_lens}) {
    TORCH_CHECK(t->device() == q.device(), "paged_attention_decode: all tensors must be on q's device ",
                q.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(q.dim() == 3, "paged_attention_decode: q must be [batch, num_heads, head_dim], got shape ",
              q.sizes());
  TORCH_CHECK(k_cache.dim() == 4,
              "paged_attention_decode: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "paged_attention_decode: v_cache shape ", v_cache.sizes(),
              " differs from k_cache shape ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "paged_attention_decode: dtype ",
              q.scalar_type(), " is not supported; use torch.float16 or torch.bfloat16");
  MINIVLLM_CHECK_DTYPE(k_cache, q.scalar_type());
  MINIVLLM_CHECK_DTYPE(v_cache, q.scalar_type());
  MINIVLLM_CHECK_DTYPE(block_tables, torch::kInt32);
  MINIVLLM_CHECK_DTYPE(context_lens, torch::kInt32);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_attention_decode: k_cache and v_cache must be contiguous, got strides ", k_cache.strides(),
              " and ", v_cache.strides());

  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "paged_attention_decode: head_dim ", head_dim,
              " is not supported; supported: 64, 128");
  TORCH_CHECK(k_cache.size(3) == head_dim, "paged_attention_decode: q has head_dim ", head_dim,
              " but the caches have ", k_cache.size(3));
  TORCH_CHECK(block_size >= 16 && block_size <= 256 && (block_size & (block_size - 1)) == 0,
              "paged_attention_decode: block_size ", block_size, " is not supported; use a power of two in 16..256");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "paged_attention_decode: num_heads ", num_heads,
              " must be a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch,
              "paged_attention_decode: block_tables must be [batch=", batch, ", max_blocks], got shape ",
              block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == batch,
              "paged_attention_decode: context_lens must be [batch=", batch, "], got shape ", context_lens.sizes());
  MINIVLLM_CHECK_LAST_DIM_CONTIGUOUS(q);
  MINIVLLM_CHECK_LAST_DIM_CONTIGUOUS(block_tables);
  TORCH_CHECK(context_lens.is_contiguous(), "paged_attention_decode: context_lens must be contiguous, got strides ",
              context_lens.strides());
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0,
              "paged_attention_decode: q's batch and head strides must be multiples of 8 elements (16 bytes), got ",
              q.strides());
  check_aligned_16(q, "paged_attention_decode: q");
  check_aligned_16(k_cache, "paged_attention_decode: k_cache");
  check_aligned_16(v_cache, "paged_attention_decode: v_cache");
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(max_blocks * block_size <= INT32_MAX && batch * num_heads <= INT32_MAX,
              "paged_attention_decode: context capacity ", max_blocks * block_size, " or batch x heads ",
              batch * num_heads, " overflows 32-bit indexing");

  if (total_context_len.has_value()) {
    const torch::Tensor& total = *total_context_len;
    TORCH_CHECK(total.is_cuda() && total.device() == q.device() && total.scalar_type() == torch::kInt64 &&
                    total.numel() == 1,
                "paged_attention_decode: total_context_len must be a one-element int64 tensor on q's device ",
                q.device(), " (the sum of context_lens), got ", total.scalar_type(), " of shape ", total.sizes(),
                " on ", total.device());
  }

  const int64_t split_heads = split_kv_heads.value_or(num_kv_heads);
  TORCH_CHECK(split_heads >= num_kv_heads && split_heads <= (1 << 16), "paged_attention_decode: split_kv_heads ",
              split_heads, " must be from num_kv_heads = ", num_kv_heads, " (the default) to 65536");

  auto out = torch::empty({batch, num_heads, head_dim}, q.options());
  if (batch == 0) return out;

  const c10::cuda::CUDAGuard guard(q.device());
  // Without the caller's sum (the engine computes it once a step for all layers), one more small kernel.
  const torch::Tensor total = total_context_len.has_value() ? *total_context_len : context_lens.sum(torch::kInt64);
  minivllm::decode::DecodeArgs args{};
  args.q = q.data_ptr();
  args.q_stride_batch = q.stride(0);
  args.q_stride_head = q.stride(1);
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.block_tables = block_tables.data_ptr<int32_t>();
  args.block_table_stride = block_tables.stride(0);
  args.context_lens = context_lens.data_ptr<int32_t>();
  args.total_context = total.data_ptr<int64_t>();
  args.out = out.data_ptr();
  args.batch = static_cast<int>(batch);
  args.num_heads = static_cast<int>(num_heads);
  args.num_kv_heads = static_cast<int>(num_kv_heads);
  args.split_kv_heads = static_cast<int>(split_heads);
  args.max_blocks = static_cast<int>(max_blocks);
  args.block_size = static_cast<int>(block_size);
  args.scale = static_cast<float>(scale);

  MINIVLLM_DISPATCH_HALF_TYPES(q.scalar_type(), "paged_attention_decode", [&] {
    if (head_dim == 64) {
      minivllm::decode::launch_paged_decode<scalar_t, 64>(args, q.device());
    } else {
      minivllm::decode::launch_paged_decode<scalar_t, 128>(args, q.device());
    }
  });
  return out;
}
