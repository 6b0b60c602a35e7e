// Host side of the sm_90a flash prefill kernel: TMA tensor maps, launch, and the four instantiations
// (fp16/bf16 x head_dim 64/128). The kernel body exists only in the sm_90a pass (see the kernel header);
// other passes compile an empty stub that is never launched: the host refuses unless MINIVLLM_SM90A says
// the build holds sm_90a code and the device is sm_90.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <string>

#include "common/tensor_map.h"
#include "flash_prefill_sm90.h"
#include "flash_prefill_sm90_kernel.cuh"

namespace minivllm::flash {

namespace {

// A map over a tensor of `rank` dims given innermost first: dims[0] = head_dim (contiguous), dims[1] = heads,
// then tokens (packed) or block_size and blocks (paged); strides[i] in elements for dims[i + 1]. One box is 64
// elements of head_dim (128 bytes, the widest a 128-byte swizzle takes) x 1 head x box_rows tokens (x 1
// block), written to shared memory 128-byte swizzled; boxes past the tensor's end read as zeros.
CUtensorMap make_tensor_map(const void* data, bool bf16, int rank, const int64_t* dims, const int64_t* strides,
                            int box_rows) {
  constexpr int64_t kElementBytes = 2;
  cuuint64_t global_dims[4], global_strides[3];
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  for (int i = 0; i < rank; ++i) global_dims[i] = static_cast<cuuint64_t>(dims[i]);
  for (int i = 0; i + 1 < rank; ++i) global_strides[i] = static_cast<cuuint64_t>(strides[i] * kElementBytes);
  return encode_tensor_map("flash_attn_varlen", data, bf16, rank, global_dims, global_strides, box,
                           CU_TENSOR_MAP_SWIZZLE_128B);
}

template <typename T, int D>
void launch(const FlashParams& params, int64_t total_q, int64_t k_rows, int num_kv_heads, int batch_size,
            cudaStream_t stream) {
  using Traits = FlashSm90Traits<T, D>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const bool paged = params.block_table != nullptr;
  const int64_t q_dims[3] = {D, params.num_heads, total_q};
  const int64_t q_strides[2] = {params.q_head_stride, params.q_token_stride};
  const int64_t block_size = int64_t{1} << params.block_size_log2;
  const int64_t packed_dims[3] = {D, num_kv_heads, k_rows};
  const int64_t paged_dims[4] = {D, num_kv_heads, block_size, k_rows};
  const int64_t kv_strides[3] = {params.kv_head_stride, params.kv_token_stride, params.kv_block_stride};
  const int kv_rank = paged ? 4 : 3;
  const int64_t* kv_dims = paged ? paged_dims : packed_dims;
  const int q_box_rows = static_cast<int>(std::min<int64_t>(total_q, Traits::kBlockM));
  const int kv_box_rows = static_cast<int>(std::min<int64_t>(paged ? block_size : k_rows, Traits::kBlockN));
  const FlashSm90Params kernel_params{
      make_tensor_map(params.q, kBf16, 3, q_dims, q_strides, q_box_rows),
      make_tensor_map(params.k, kBf16, kv_rank, kv_dims, kv_strides, kv_box_rows),
      make_tensor_map(params.v, kBf16, kv_rank, kv_dims, kv_strides, kv_box_rows),
      params,
      q_box_rows,
      kv_box_rows,
  };
  auto kernel = flash_prefill_sm90_kernel<Traits>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
  const dim3 grid(batch_size * params.num_heads, params.num_m_blocks);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(kernel_params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool flash_prefill_sm90_available(int device) {
#ifdef MINIVLLM_SM90A
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  return props->major == 9 && props->minor == 0;
#else
  (void)device;
  return false;
#endif
}

void run_flash_prefill_sm90(const FlashParams& params, bool bf16, int head_dim, int64_t total_q, int64_t k_rows,
                            int num_kv_heads, int batch_size, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(flash_prefill_sm90_available(device),
              "flash_attn_varlen: the sm_90 prefill kernel was not built for sm_90a (TORCH_CUDA_ARCH_LIST must "
              "include 9.0a) or this GPU is not sm_90");
  TORCH_CHECK(k_rows > 0 && k_rows <= INT32_MAX && (head_dim == 64 || head_dim == 128),
              "flash_attn_varlen: the sm_90 prefill kernel takes 1 .. 2^31 - 1 key tokens (packed) or cache "
              "blocks (paged) and head_dim 64 or 128");
  if (bf16) {
    if (head_dim == 64) return launch<__nv_bfloat16, 64>(params, total_q, k_rows, num_kv_heads, batch_size, stream);
    return launch<__nv_bfloat16, 128>(params, total_q, k_rows, num_kv_heads, batch_size, stream);
  }
  if (head_dim == 64) return launch<__half, 64>(params, total_q, k_rows, num_kv_heads, batch_size, stream);
  launch<__half, 128>(params, total_q, k_rows, num_kv_heads, batch_size, stream);
}

}  // namespace minivllm::flash
