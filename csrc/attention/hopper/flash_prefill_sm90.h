// Host entry of the sm_90a flash prefill kernel (flash_prefill_sm90_kernel.cuh), for flash_prefill.cu's
// dispatch. Plain declarations: no CUDA device code or driver types here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/flash_params.cuh"

namespace minivllm::flash {

// The kernel is compiled for sm_90a (TORCH_CUDA_ARCH_LIST holds 9.0a; setup.py turns 9.0 into 9.0a) and
// `device` is an sm_90 GPU (H100, H200).
bool flash_prefill_sm90_available(int device);

// Runs the kernel on q [total_q, H, D] and k/v packed [k_rows, Hkv, D] or, with params.block_table, paged
// [k_rows blocks, block_size, Hkv, D] (rows 16-byte aligned), as `params` describes; refuses, saying so,
// where flash_prefill_sm90_available is false. k_rows (k.size(0)) must be > 0: a tensor map has no empty dims.
void run_flash_prefill_sm90(const FlashParams& params, bool bf16, int head_dim, int64_t total_q, int64_t k_rows,
                            int num_kv_heads, int batch_size, cudaStream_t stream);

}  // namespace minivllm::flash
