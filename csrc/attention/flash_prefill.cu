// torch entry of the flash prefill kernels: checks every input, fills FlashParams and picks the kernel: on
// sm_90 GPUs the warp-specialised TMA + wgmma one (hopper/) unless MINIVLLM_PREFILL_SM90=0, else the
// mma.sync one (flash_prefill_kernel.cuh) for (dtype, head_dim).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/checks.h"
#include "../ops.h"
#include "flash_kernel_traits.cuh"
#include "flash_params.cuh"
#include "hopper/flash_prefill_sm90.h"

namespace {

using minivllm::str;

using minivllm::flash::FlashParams;

template <typename scalar_t>
struct CudaElement;
template <>
struct CudaElement<at::Half> {
  using type = __half;
};
template <>
struct CudaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "flash_attn_varlen: ", name,
              " must be a CUDA tensor on q's device ", q.device().str(), ", got ", t.device().str());
}

// The kernel copies 16-byte chunks: the head dimension must be contiguous and every row of D elements must
// start 16-byte aligned.
void check_rows(const torch::Tensor& t, const char* name) {
  const int64_t elems = 16 / t.element_size();
  bool aligned = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) aligned = aligned && t.stride(d) % elems == 0;
  TORCH_CHECK(aligned, "flash_attn_varlen: ", name,
              " must be contiguous in its last dimension with 16-byte aligned rows (data pointer and every other "
              "stride a multiple of ",
              str(elems), " elements), got strides ", str(t.strides()));
}

void check_cu_seqlens(const torch::Tensor& t, const char* name, const torch::Tensor& q) {
  check_cuda(t, name, q);
  TORCH_CHECK(t.scalar_type() == at::kInt, "flash_attn_varlen: ", name, " must be torch.int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) >= 2 && t.is_contiguous(), "flash_attn_varlen: ", name,
              " must be a contiguous 1-D tensor [batch + 1] with batch >= 1, got shape ", str(t.sizes()));
}

// MINIVLLM_PREFILL_SM90=0 keeps sm_90 GPUs on the mma.sync kernel, so one process can A/B and test both;
// read at every call.
bool sm90_prefill_enabled() {
  const char* value = std::getenv("MINIVLLM_PREFILL_SM90");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace

bool flash_prefill_sm90_available() {
  return minivllm::flash::flash_prefill_sm90_available(c10::cuda::current_device());
}

torch::Tensor flash_attn_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
                                const std::optional<torch::Tensor>& block_table,
                                const std::optional<torch::Tensor>& out_arg) {
  const bool paged = block_table.has_value();
  MINIVLLM_CHECK_CUDA(q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "flash_attn_varlen: q must be torch.float16 or torch.bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flash_attn_varlen: q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 3, "flash_attn_varlen: q must be [total_q, num_heads, head_dim], got shape ",
              str(q.sizes()));
  TORCH_CHECK(k.dim() == (paged ? 4 : 3) && v.sizes() == k.sizes(), "flash_attn_varlen: k and v must both be ",
              paged ? "[num_blocks, block_size, num_kv_heads, head_dim] (paged, block_table given)"
                    : "[total_k, num_kv_heads, head_dim] (packed, no block_table)",
              ", got shapes ", str(k.sizes()), " and ", str(v.sizes()));
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "flash_attn_varlen: head_dim ", str(head_dim),
              " is not supported; supported: 64, 128");
  TORCH_CHECK(k.size(-1) == head_dim, "flash_attn_varlen: k and v head_dim ", str(k.size(-1)),
              " differs from q's ", str(head_dim));
  const int64_t num_heads = q.size(1);
  const int64_t num_kv_heads = k.size(-2);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "flash_attn_varlen: num_heads ", str(num_heads),
              " must be a multiple of num_kv_heads ", str(num_kv_heads));
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  // One offset addresses a key's row in both k and v.
  TORCH_CHECK(k.strides() == v.strides(), "flash_attn_varlen: k and v must have the same strides, got ",
              str(k.strides()), " and ", str(v.strides()));
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "flash_attn_varlen: cu_seqlens_q has ",
              str(cu_seqlens_q.size(0)), " entries and cu_seqlens_k ", str(cu_seqlens_k.size(0)),
              "; both must be batch + 1");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0,
              "flash_attn_varlen: max_seqlen_q and max_seqlen_k must be >= 0, got ", str(max_seqlen_q), ", ",
              str(max_seqlen_k));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "flash_attn_varlen: scale must be a positive finite number, got ",
              std::to_string(scale));

  FlashParams params{};
  if (paged) {
    const torch::Tensor& table = *block_table;
    check_cuda(table, "block_table", q);
    TORCH_CHECK(table.scalar_type() == at::kInt, "flash_attn_varlen: block_table must be torch.int32, got ",
                table.scalar_type());
    TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && table.stride(1) == 1,
                "flash_attn_varlen: block_table must be [batch, max_blocks] = [", str(batch),
                ", *] with contiguous rows, got shape ", str(table.sizes()), " and strides ", str(table.strides()));
    const int64_t block_size = k.size(1);
    TORCH_CHECK(block_size >= 16 && block_size <= 256 && (block_size & (block_size - 1)) == 0,
                "flash_attn_varlen: block_size ", str(block_size),
                " is not supported; use a power of two in 16..256");
    params.block_table = table.data_ptr<int>();
    params.block_table_stride = table.stride(0);
    params.block_size_log2 = __builtin_ctzll(block_size);
    params.kv_block_stride = k.stride(0);
  }

  torch::Tensor out;
  if (out_arg.has_value()) {  // a CUDA graph's static buffer (the prefill's piecewise graphs read it)
    out = *out_arg;
    check_cuda(out, "out", q);
    TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.dim() == 3 && out.size(0) == q.size(0) &&
                    out.size(1) == num_heads && out.size(2) == head_dim,
                "flash_attn_varlen: out must be q's dtype and shape ", str(q.sizes()), ", got ", out.scalar_type(),
                " ", str(out.sizes()));
    check_rows(out, "out");
  } else {
    out = torch::empty({q.size(0), num_heads, head_dim}, q.options());
  }
  constexpr int64_t kBlockM = minivllm::flash::kFlashPrefillBlockM;
  const int64_t num_m_blocks = (max_seqlen_q + kBlockM - 1) / kBlockM;
  TORCH_CHECK(num_m_blocks <= 65535, "flash_attn_varlen: max_seqlen_q ", str(max_seqlen_q),
              " exceeds the supported ", str(65535 * kBlockM));
  if (q.size(0) == 0 || num_m_blocks == 0) return out;

  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  params.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  params.q_token_stride = q.stride(0);
  params.q_head_stride = q.stride(1);
  params.kv_token_stride = k.stride(-3);
  params.kv_head_stride = k.stride(-2);
  params.out_token_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.num_heads = static_cast<int>(num_heads);
  params.group_size = static_cast<int>(num_heads / num_kv_heads);
  params.num_m_blocks = static_cast<int>(num_m_blocks);
  params.scale_log2 = static_cast<float>(scale * M_LOG2E);
  params.causal = causal;

  const c10::cuda::OptionalCUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (k.size(0) > 0 && sm90_prefill_enabled() &&
      minivllm::flash::flash_prefill_sm90_available(q.device().index())) {
    minivllm::flash::run_flash_prefill_sm90(params, q.scalar_type() == at::kBFloat16, static_cast<int>(head_dim),
                                            q.size(0), k.size(0), static_cast<int>(num_kv_heads),
                                            static_cast<int>(batch), stream);
    return out;
  }
  MINIVLLM_DISPATCH_HALF_TYPES(q.scalar_type(), "flash_attn_varlen", [&] {
    using T = typename CudaElement<scalar_t>::type;
    if (head_dim == 64) {
      minivllm::flash::run_flash_prefill<T, 64>(params, static_cast<int>(batch), stream);
    } else {
      minivllm::flash::run_flash_prefill<T, 128>(params, static_cast<int>(batch), stream);
    }
  });
  return out;
}
