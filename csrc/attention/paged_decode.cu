#include "../ops.h"

// Placeholder until the kernel lands.
torch::Tensor paged_attention_decode(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                     const torch::Tensor&, const torch::Tensor&, double) {
  TORCH_CHECK(false, "paged_attention_decode: not implemented yet");
}
