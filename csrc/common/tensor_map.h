// TMA tensor maps (CUtensorMap) built on the host: cuTensorMapEncodeTiled through the runtime's driver entry point
// lookup, so nothing links against libcuda. Used by the sm_90 kernels that load tiles with cp.async.bulk.tensor.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <string>

namespace minivllm {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(const char* op) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [op] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                    &status));
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && fn != nullptr, op,
                ": the CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A map over a 16-bit (fp16 or bf16) tensor of `rank` dims, innermost first: dims[i] elements, byte_strides[i]
// between steps of dims[i + 1], boxes of box[i] elements, written to shared memory as `swizzle` says.
inline CUtensorMap encode_tensor_map(const char* op, const void* data, bool bf16, int rank, const cuuint64_t* dims,
                                     const cuuint64_t* byte_strides, const cuuint32_t* box,
                                     CUtensorMapSwizzle swizzle) {
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  CUtensorMap map;
  const CUresult result = tensor_map_encoder(op)(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank,
      const_cast<void*>(data), dims, byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, op, ": cuTensorMapEncodeTiled failed (CUresult ",
              std::to_string(static_cast<int>(result)), ") for a rank-", std::to_string(rank), " map of dims ",
              std::to_string(dims[rank - 1]), " x ... x ", std::to_string(dims[0]));
  return map;
}

}  // namespace minivllm
