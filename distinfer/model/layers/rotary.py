"""Rotary position embedding (RoPE), with the scaling variants transformers computes for us."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from distinfer.model.kernels import cpu
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

# Rope types whose frequencies do not depend on the running sequence length.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_type(config: PretrainedConfig) -> str:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # pre-5.0 style config
        params = getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def compute_inv_freq(config: PretrainedConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32, attention_scaling) for the config's RoPE, via transformers."""
    if getattr(config, "rope_parameters", None) is None and hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()  # folds legacy rope_theta / rope_scaling into rope_parameters
    rope_type = _rope_type(config)
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"Unsupported rope_type {rope_type!r}; supported: {', '.join(_STATIC_ROPE_TYPES)}")
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half), as in transformers' Llama.

    `cos_sin(positions)` is computed once per forward and shared by every layer; `forward`
    rotates q and k together, in place, when they are adjacent heads of one tensor."""

    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError(f"partial rotary embeddings are not supported (rotary dim {inv_freq.numel() * 2}, "
                             f"head_dim {head_dim})")
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [T, 1, D] and sign-folded sin [T, 1, D] (= [-sin, sin] halves) in `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    @staticmethod
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place: x [T, H, D] (may be a strided view) <- x*cos + rotate_half(x)*sin; returns x."""
        if cpu.enabled_for(x, cos, sin) and cpu.row_major(x):
            return cpu.rope_(x, cos, sin)
        t, h, d = x.shape
        swapped = x.reshape(t, h, 2, d // 2).flip(2).view(t, h, d)  # [x2, x1], a copy
        return x.mul_(cos).addcmul_(swapped, sin)
