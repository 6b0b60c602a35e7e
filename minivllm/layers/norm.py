import torch
from torch import nn

from minivllm.layers.fusion import fused_on_gpu
from minivllm.ops import reference


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 as HF does; with a residual it adds first and returns the new residual, which
    stays in fp32 (HF rounds it to the model's dtype at every layer: in bf16 that rounding adds up to near-tie
    flips of the next token)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum in fp32."""
    x = residual + x.float()
    return reference.rms_norm(x, weight, eps), x


rms_norm = fused_on_gpu(reference.rms_norm)
add_rms_norm = fused_on_gpu(_add_rms_norm)
