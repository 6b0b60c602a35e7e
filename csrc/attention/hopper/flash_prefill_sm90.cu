// Host side of the sm_90a flash prefill kernel: TMA tensor maps, launch, and the four instantiations
// (fp16/bf16 x head_dim 64/128). The kernel body exists only in the sm_90a pass (see the kernel header);
// other passes compile an empty stub that is never launched: the host refuses unless MINIVLLM_SM90A says
// the build holds sm_90a code and the device is sm_90.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled: the driver entry point, found at run time

#include "flash_prefill_sm90.h"
#include "flash_prefill_sm90_kernel.cuh"

namespace minivllm::flash {

namespace {

// cuTensorMapEncodeTiled through the runtime's driver entry point lookup, so nothing links against libcuda.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                    &status));
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && fn != nullptr,
                "flash_attn_varlen: the CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A 3-D map over a packed [tokens, heads, head_dim] tensor (head_dim contiguous; strides in elements). One
// box is 64 elements of head_dim (128 bytes, the widest a 128-byte swizzle takes) x 1 head x box_rows tokens,
// written to shared memory 128-byte swizzled; tokens past the end read as zeros.
CUtensorMap make_tensor_map(const void* data, bool bf16, int64_t tokens, int64_t heads, int64_t head_dim,
                            int64_t token_stride, int64_t head_stride, int box_rows) {
  constexpr int64_t kElementBytes = 2;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride * kElementBytes),
                                 static_cast<cuuint64_t>(token_stride * kElementBytes)};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult result = tensor_map_encoder()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<void*>(data),
      dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "flash_attn_varlen: cuTensorMapEncodeTiled failed (CUresult ",
              static_cast<int>(result), ") for [", tokens, ", ", heads, ", ", head_dim, "] with strides (",
              token_stride, ", ", head_stride, ")");
  return map;
}

template <typename T, int D>
void launch(const FlashParams& params, int64_t total_q, int64_t total_k, int num_kv_heads, int batch_size,
            cudaStream_t stream) {
  using Traits = FlashSm90Traits<T, D>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const FlashSm90Params kernel_params{
      make_tensor_map(params.q, kBf16, total_q, params.num_heads, D, params.q_token_stride, params.q_head_stride,
                      Traits::kBlockM),
      make_tensor_map(params.k, kBf16, total_k, num_kv_heads, D, params.kv_token_stride, params.kv_head_stride,
                      Traits::kBlockN),
      make_tensor_map(params.v, kBf16, total_k, num_kv_heads, D, params.kv_token_stride, params.kv_head_stride,
                      Traits::kBlockN),
      params};
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

void run_flash_prefill_sm90(const FlashParams& params, bool bf16, int head_dim, int64_t total_q, int64_t total_k,
                            int num_kv_heads, int batch_size, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(flash_prefill_sm90_available(device),
              "flash_attn_varlen: the sm_90 prefill kernel was not built for sm_90a (TORCH_CUDA_ARCH_LIST must "
              "include 9.0a) or this GPU is not sm_90");
  TORCH_CHECK(params.block_table == nullptr && total_k > 0 && (head_dim == 64 || head_dim == 128),
              "flash_attn_varlen: the sm_90 prefill kernel takes packed k/v with total_k > 0 and head_dim 64 or "
              "128");
  if (bf16) {
    if (head_dim == 64) return launch<__nv_bfloat16, 64>(params, total_q, total_k, num_kv_heads, batch_size, stream);
    return launch<__nv_bfloat16, 128>(params, total_q, total_k, num_kv_heads, batch_size, stream);
  }
  if (head_dim == 64) return launch<__half, 64>(params, total_q, total_k, num_kv_heads, batch_size, stream);
  launch<__half, 128>(params, total_q, total_k, num_kv_heads, batch_size, stream);
}

}  // namespace minivllm::flash
