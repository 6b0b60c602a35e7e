#include "../ops.h"

// Placeholder until the kernel lands.
torch::Tensor flash_attn_varlen(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                const torch::Tensor&, const torch::Tensor&, int64_t, int64_t, double, bool,
                                const std::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "flash_attn_varlen: not implemented yet");
}
