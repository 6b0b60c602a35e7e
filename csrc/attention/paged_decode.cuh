// Paged-attention decode: what the op wrapper (paged_decode.cpp) and the per-(dtype, head_dim) instantiations share.
// The algorithm lives in paged_decode_kernel.cuh, its launch in paged_decode_launch.cuh.
#pragma once

#include <cstdint>

#include <c10/core/Device.h>

namespace minivllm::decode {

// Everything a launch needs, checked and flattened by the op wrapper. Caches are contiguous
// [num_blocks, block_size, num_kv_heads, head_dim]; out is contiguous [batch, num_heads, head_dim].
struct DecodeArgs {
  const void* q;
  int64_t q_stride_batch, q_stride_head;  // elements; q's last dim is contiguous
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;  // elements between two sequences' rows
  const int32_t* context_lens;
  const int64_t* total_context;  // [1]: the sum of context_lens, which sizes the splits
  void* out;
  int batch, num_heads, num_kv_heads, max_blocks, block_size;
  // The KV heads the context splits are sized for: num_kv_heads, or under tensor parallelism with invariant
  // numerics the whole model's, so that a rank cuts every context where one GPU does.
  int split_kv_heads;
  float scale;
};

// Launches the decode kernel on the current stream (its last split of a context merges the split-KV partials).
// scalar_t is at::Half or at::BFloat16. One explicit instantiation a file: paged_decode_hdim{64,128}_{bf16,fp16}.cu.
template <typename scalar_t, int kHeadDim>
void launch_paged_decode(const DecodeArgs& args, const c10::Device& device);

}  // namespace minivllm::decode
