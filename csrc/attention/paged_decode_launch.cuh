// Launch of the paged decode kernel for one (dtype, head_dim): the grid's split bound from shapes, the
// workspace and the split counters, the launch. Included only by the instantiation files paged_decode_hdim*_*.cu.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "common/pdl.cuh"
#include "common/split_counters.cuh"
#include "paged_decode_kernel.cuh"

namespace minivllm::decode {

template <typename scalar_t>
using CudaElement = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;

// CTAs of the decode kernel one SM holds at once, read once per device.
template <typename T, int kHeadDim, int kStages>
int resident_ctas_per_sm(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0: not read yet; racing threads write the same value
  TORCH_CHECK(device < kMaxDevices, "paged_attention_decode: device index ", device, " is beyond ", kMaxDevices);
  if (cache[device] == 0) {
    auto kernel = paged_decode_kernel<T, kHeadDim, kStages>;
    constexpr int smem = Layout<kHeadDim, kStages>::kSmemBytes;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, kThreads, smem));
    cache[device] = std::max(ctas, 1);
  }
  return cache[device];
}

// The split sizing's constants, each overridden by an environment variable set to a positive number, so that
// benchmarks can sweep them without a rebuild (scripts/gpu_decode.sh). Read once.
struct SplitTuning {
  float cta_cost_tiles, grid_waves, unsplit_waves, whole_waves;
};

inline float tuning_value(const char* name, float fallback) {
  const char* text = std::getenv(name);
  const float value = text != nullptr ? std::strtof(text, nullptr) : 0.f;
  return value > 0.f ? value : fallback;
}

inline const SplitTuning& split_tuning() {
  static const SplitTuning tuning{tuning_value("MINIVLLM_DECODE_CTA_COST", kCtaCostTiles),
                                  tuning_value("MINIVLLM_DECODE_GRID_WAVES", kGridWaves),
                                  tuning_value("MINIVLLM_DECODE_UNSPLIT_WAVES", kUnsplitWaves),
                                  tuning_value("MINIVLLM_DECODE_WHOLE_WAVES", kWholeWaves)};
  return tuning;
}

// The grid's splits per sequence, from shapes only (a captured graph stays valid for any lengths): enough
// CTAs for grid_waves waves, so that split_tiles can cut any mix of lengths into pieces of about equal size.
// CTAs past their sequence's last split return at once, but not for free: where whole sequences already
// fill unsplit_waves waves, the tail is short and the grid does not split (a second, empty split and the merge
// cost more than the shorter tail wins: benchmarks/NOTES_decode.md).
inline int grid_splits(int work_items, int max_tokens, int resident_slots, const SplitTuning& tuning) {
  if (work_items >= tuning.unsplit_waves * resident_slots) return 1;
  const int max_tiles = (max_tokens + kTile - 1) / kTile;
  const float wanted = std::ceil(tuning.grid_waves * resident_slots / work_items);
  return std::clamp(static_cast<int>(std::min(wanted, float(kMaxSplits))), 1, std::clamp(max_tiles, 1, kMaxSplits));
}

// The split counters of a device (KernelParams::split_counters): enough for every grid that splits, which
// grid_splits allows only below unsplit_waves x slots CTAs along blockIdx.x (common/split_counters.cuh).
inline int* split_counters(const c10::Device& device, int work_items, cudaStream_t stream) {
  static SplitCounters counters("paged_attention_decode");
  return counters.get(device, work_items, stream);
}

template <typename T, int kHeadDim, int kStages>
void launch_with_stages(const DecodeArgs& args, const c10::Device& device) {
  KernelParams p{};
  p.args = args;
  const int group = args.num_heads / args.num_kv_heads;
  p.head_chunks = (group + kMaxHeads - 1) / kMaxHeads;
  const int work_items = args.batch * args.num_kv_heads * p.head_chunks;
  const int max_tokens = args.max_blocks * args.block_size;
  p.slots = resident_ctas_per_sm<T, kHeadDim, kStages>(device.index()) *
            at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
  const SplitTuning& tuning = split_tuning();
  p.cta_cost_tiles = tuning.cta_cost_tiles;
  p.whole_waves = tuning.whole_waves;
  const int64_t split_items = int64_t(args.batch) * args.split_kv_heads * p.head_chunks;  // as split_tiles counts
  p.num_splits =
      grid_splits(static_cast<int>(std::min<int64_t>(split_items, INT32_MAX)), max_tokens, p.slots, tuning);

  // Workspace sized by shapes alone; the caching allocator makes this safe inside graph capture.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
    const int64_t rows = int64_t(args.batch) * args.num_heads * p.num_splits;
    partial_out = at::empty({rows, kHeadDim}, opts);
    partial_lse = at::empty({rows}, opts);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
    p.split_counters = split_counters(device, work_items, stream);
  }

  pdl::launch(paged_decode_kernel<T, kHeadDim, kStages>, dim3(work_items, p.num_splits), dim3(kThreads),
              Layout<kHeadDim, kStages>::kSmemBytes, stream, p);
}

template <typename scalar_t, int kHeadDim>
void launch_paged_decode(const DecodeArgs& args, const c10::Device& device) {
  using T = CudaElement<scalar_t>;
  if constexpr (kHeadDim == 128) {  // head_dim 64 (54 KB) fits every supported GPU
    const size_t smem_per_block = at::cuda::getDeviceProperties(device.index())->sharedMemPerBlockOptin;
    if (Layout<kHeadDim, kPipelineStages>::kSmemBytes > smem_per_block) {
      return launch_with_stages<T, kHeadDim, kFallbackStages>(args, device);
    }
  }
  launch_with_stages<T, kHeadDim, kPipelineStages>(args, device);
}

}  // namespace minivllm::decode
