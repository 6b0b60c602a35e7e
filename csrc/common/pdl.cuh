// Programmatic dependent launch (PDL, sm_90 and later). A decode step at small batches is a chain of kernels of a
// few microseconds each, where each waits for the one before it to drain, then ramps up its own loads. A kernel
// launched through pdl::launch() may instead start while the kernel before it on the stream still runs:
//  - it must call pdl::wait_for_prior_grid() before it reads anything that an earlier kernel of the stream
//    writes (activations, the KV cache, and to be safe the step's inputs too); before the wait it may read only
//    memory no kernel writes during a step: the weights, whose loads it can start early;
//  - it calls pdl::allow_next_grid() at its start, so that the next kernel's CTAs may take the SM room left over;
//    they still wait for this grid to complete, and its writes to be visible, at their own wait.
// CUDA graphs keep these edges (stream capture records them). In one H200 run, a captured chain of 64 GEMVs of
// 8 MB each took 4.38 us a kernel plainly and 3.36 with PDL and the weight loads issued before the wait; with PDL
// alone, 4.40. On older GPUs, and with MINIVLLM_PDL=0 (for A/B runs), kernels launch as plain launches, and the
// two device calls do nothing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace minivllm::pdl {

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launches on the current device get the PDL attribute: compute capability 9.0 or later, unless
// MINIVLLM_PDL=0 (read once).
inline bool enabled() {
  static const bool allowed = [] {
    const char* text = std::getenv("MINIVLLM_PDL");
    return text == nullptr || std::strcmp(text, "0") != 0;
  }();
  return allowed && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute where enabled().
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = enabled() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace minivllm::pdl
