import torch
from torch import nn

from minivllm import ops


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 as HF does; with a residual it adds first and returns the new residual, which
    stays in fp32 (HF rounds it to the model's dtype at every layer: in bf16 that rounding adds up to near-tie
    flips of the next token). On the GPU the add happens in place, into the residual passed in."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
