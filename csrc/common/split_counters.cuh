// Arrival counters for kernels that split a row of work over several CTAs and let the last CTA to finish
// merge the others' partials (the classic threadfence reduction): no merge kernel of its own, whose launch
// would cost more than its work at small batches. Used by paged decode and the sampler kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace minivllm {

// One zeroed int32 buffer a device for one family of kernels (each family its own, so that families on
// different streams never share a counter). Allocated outside any graph capture (a graph's pool must not own
// it) and kept zero by the kernels: the merging CTA resets its counter for the next launch. Launches of a
// family on one device must run one after another (a step's kernels, on the engine's stream).
class SplitCounters {
 public:
  explicit SplitCounters(const char* op) : op_(op) {}

  int* get(const c10::Device& device, int64_t count, cudaStream_t stream) {
    const std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(device.index() >= 0 && device.index() < kMaxDevices, op_, ": device index ", device.index(),
                " is beyond ", kMaxDevices);
    at::Tensor& buffer = buffers_[device.index()];
    if (!buffer.defined() || buffer.numel() < count) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
      TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op_, ": the first launch on a device that splits its "
                  "rows over CTAs must run outside CUDA graph capture (it allocates the split counters); run the "
                  "same call once before capturing it");
      // the old buffer stays allocated: a graph captured before may still hold its address
      if (buffer.defined()) retired_.push_back(buffer);
      buffer = at::zeros({std::max<int64_t>(count, 4096)}, at::TensorOptions().dtype(at::kInt).device(device));
    }
    return buffer.data_ptr<int>();
  }

 private:
  static constexpr int kMaxDevices = 64;
  const char* op_;
  std::mutex mutex_;
  at::Tensor buffers_[kMaxDevices];
  std::vector<at::Tensor> retired_;
};

#ifdef __CUDACC__
// True in the one CTA of `arrivals` that arrives last at *counter, which it must reset to 0 when done. Every
// thread's partials are visible GPU-wide before the count that says they are written; the fence after the
// count orders the merging CTA's reads of the others' partials (read them with __ldcg: L2, never a stale L1).
__device__ __forceinline__ bool last_to_arrive(int* counter, int arrivals) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == arrivals - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}
#endif

}  // namespace minivllm
