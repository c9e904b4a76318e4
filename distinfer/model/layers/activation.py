"""Gated activations for the MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distinfer.model.kernels import cpu

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedActivation(nn.Module):
    """act(x[..., :d]) * x[..., d:] for the fused gate_up projection output."""

    def __init__(self, hidden_act: str = "silu") -> None:
        super().__init__()
        if hidden_act not in _ACTS:
            raise ValueError(f"Unsupported hidden_act {hidden_act!r}; supported: {', '.join(_ACTS)}")
        self.act = _ACTS[hidden_act]
        self.fused_silu = self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_silu and cpu.enabled_for(x):
            return cpu.silu_and_mul(x)
        d = x.shape[-1] // 2
        return self.act(x[..., :d]) * x[..., d:]
