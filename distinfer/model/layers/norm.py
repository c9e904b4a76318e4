"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distinfer.model.kernels import cpu
from distinfer.model.layers.weight_utils import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """Matches transformers' LlamaRMSNorm: normalize in float32, cast back, scale by weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = set_weight_loader(nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False),
                                        default_weight_loader)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual); the fused CPU
        kernel writes the sum into `residual` in place (the layer stack owns that buffer)."""
        if residual is None:
            if cpu.enabled_for(x, self.weight):
                return cpu.rms_norm(x, self.weight, self.eps)
            return self._norm(x)
        if residual.is_contiguous() and cpu.enabled_for(x, residual, self.weight):
            return cpu.rms_norm(x, self.weight, self.eps, residual), residual
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
