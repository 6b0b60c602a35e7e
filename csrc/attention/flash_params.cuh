// What the host hands the flash prefill kernel: pointers, element strides and the sequence layout. Plain
// data, so the torch-facing entry (flash_prefill.cu) and the kernel instantiations share it without either
// including the other.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace minivllm::flash {

struct FlashParams {
  const void* q;    // [Tq, Hq, D]
  const void* k;    // packed [Tk, Hkv, D], or the paged cache [num_blocks, block_size, Hkv, D]
  const void* v;    // same layout as k
  void* out;        // [Tq, Hq, D], contiguous
  const int* cu_seqlens_q;  // [B + 1]
  const int* cu_seqlens_k;  // [B + 1]
  const int* block_table;   // [B, max_blocks], or nullptr for packed k/v

  // Strides in elements; the head dimension is contiguous.
  int64_t q_token_stride, q_head_stride;
  int64_t kv_token_stride, kv_head_stride, kv_block_stride;  // k and v share their strides
  int64_t out_token_stride, out_head_stride;
  int64_t block_table_stride;
  int block_size_log2;  // paged only: tokens per cache block, a power of two

  int num_heads;     // Hq
  int group_size;    // Hq / Hkv query heads share one key/value head
  int num_m_blocks;  // query tiles per sequence, from max_seqlen_q
  float scale_log2;  // softmax scale * log2(e): the kernel exponentiates with exp2
  bool causal;
};

// Runs the kernel for element type T (__half or __nv_bfloat16) and head dim D; one instantiation per file
// (flash_prefill_hdim*_*.cu) so they compile in parallel.
template <typename T, int D>
void run_flash_prefill(const FlashParams& params, int batch_size, cudaStream_t stream);

}  // namespace minivllm::flash
