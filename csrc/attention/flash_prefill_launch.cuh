// Launch of the flash prefill kernel for one (element type, head dim); included only by the instantiation
// files flash_prefill_hdim*_*.cu.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "flash_prefill_kernel.cuh"

namespace minivllm::flash {

template <typename Traits>
void launch_flash_prefill(const FlashParams& params, int batch_size, cudaStream_t stream) {
  auto kernel = flash_prefill_kernel<Traits>;
  if (Traits::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
  }
  const dim3 grid(batch_size * params.num_heads, params.num_m_blocks);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void run_flash_prefill(const FlashParams& params, int batch_size, cudaStream_t stream) {
  using Padded = FlashPrefillTraits<T, D, TileLayout::kPaddedRows>;
  if constexpr (D == 128) {  // D=64 padded tiles (55 KB) fit every supported GPU
    int device = 0, smem_per_block = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (Padded::kSmemBytes > smem_per_block) {
      return launch_flash_prefill<FlashPrefillTraits<T, D, TileLayout::kSwizzledRows>>(params, batch_size, stream);
    }
  }
  launch_flash_prefill<Padded>(params, batch_size, stream);
}

}  // namespace minivllm::flash
