"""Llama-family decoder (Llama, Mistral, Qwen2) on tensor-parallel layers and paged attention.

Reads like a single-device model: TP lives in the layers, PP in the [start_layer, end_layer)
range of `LlamaModel.layers` (layers of other stages are placeholders).
"""
from __future__ import annotations

import logging
from typing import Iterable, Union

import torch
from torch import nn
from transformers import PretrainedConfig

from distinfer.distributed.parallel_state import (get_pp_layer_partition, get_pp_rank, get_pp_world_size,
                                                  get_sp_world_size)
from distinfer.model.attention.paged import (AttentionMetadata, get_attention_backend, make_kv_cache,
                                            resolve_attention_backend)
from distinfer.model.attention.ring import RingAttentionBackend
from distinfer.model.layers.activation import GatedActivation
from distinfer.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distinfer.model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distinfer.model.layers.norm import RMSNorm
from distinfer.model.layers.rotary import RotaryEmbedding
from distinfer.model.layers.weight_utils import Loaded, default_weight_loader

logger = logging.getLogger(__name__)

# checkpoint name part -> (our fused parameter name part, shard id)
_STACKED_PARAMS = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
IntermediateTensors = dict[str, torch.Tensor]  # hidden_states + residual between pipeline stages


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int,
                   partition: tuple[int, ...] | None = None) -> tuple[int, int]:
    """Contiguous split of the layers over pipeline stages: `partition` layers per stage when
    given, else even with earlier stages taking the remainder."""
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers:
            raise ValueError(f"pipeline_layer_partition {partition} must give {pp_size} stages summing to {num_layers} layers")
        return sum(partition[:pp_rank]), sum(partition[:pp_rank + 1])
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def _attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(qkv bias, o_proj bias): Qwen2 has q/k/v bias only; Llama's attention_bias covers all four."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, backend: str = "auto") -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        qkv_bias, o_bias = _attention_biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias, dtype=dtype)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=o_bias, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.qk_size = self.qkv_proj.q_size, self.qkv_proj.q_size + self.qkv_proj.kv_size
        self.scale = self.head_dim ** -0.5
        # "auto" resolves for the device the model is built on (the loader builds under torch.device(...))
        self.backend = get_attention_backend(resolve_attention_backend(backend, torch.get_default_device()))
        if get_sp_world_size() > 1:  # sequence parallel: the ring module around this rank's backend
            self.backend = RingAttentionBackend(self.backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        t, d = qkv.shape[0], self.head_dim
        # rotate q and k in place, in one go: they are adjacent heads of the fused projection
        RotaryEmbedding.forward(qkv[:, : self.qk_size].view(t, self.num_heads + self.num_kv_heads, d), cos, sin)
        q = qkv[:, : self.q_size].view(t, self.num_heads, d)
        kv = qkv[:, self.q_size:].view(t, 2, self.num_kv_heads, d)  # K and V adjacent per token
        out = self.backend.forward(q, kv, kv_cache, md, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * d))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias, dtype=dtype)
        self.act = GatedActivation(config.hidden_act)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, attention_backend: str = "auto") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, dtype, attention_backend)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, residual stream); their sum is the layer's hidden state."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, attention_backend: str = "auto") -> None:
        super().__init__()
        self.pp_rank, self.pp_size = get_pp_rank(), get_pp_world_size()
        self.is_first, self.is_last = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        self.start_layer, self.end_layer = pp_layer_range(config.num_hidden_layers, self.pp_rank, self.pp_size,
                                                          get_pp_layer_partition())
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, attention_backend) if self.start_layer <= i < self.end_layer else nn.Identity()
            for i in range(config.num_hidden_layers))
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                md: AttentionMetadata, intermediate: IntermediateTensors | None = None
                ) -> Union[torch.Tensor, IntermediateTensors]:
        if self.is_first:
            x, residual = self.embed_tokens(input_ids), None
        else:
            assert intermediate is not None, "a later pipeline stage needs the previous stage's tensors"
            x, residual = intermediate["hidden_states"], intermediate["residual"]
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)  # shared by every layer
        for i in range(self.start_layer, self.end_layer):
            x, residual = self.layers[i](x, residual, cos, sin, kv_caches[i - self.start_layer], md)
        if not self.is_last:
            return {"hidden_states": x, "residual": residual}
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The model the runner drives; see `forward`, `compute_logits`, `load_weights`, KV cache helpers."""

    def __init__(self, hf_config: PretrainedConfig, dtype: torch.dtype, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config, self.dtype = hf_config, dtype
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and window < hf_config.max_position_embeddings:
            logger.warning("sliding_window=%d is not implemented: exact only for contexts <= %d", window, window)
        self.model = LlamaModel(hf_config, dtype, attention_backend)
        if self.model.is_last:
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, dtype)
            if self.tie_word_embeddings and self.model.is_first:
                self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: IntermediateTensors | None = None
                ) -> Union[torch.Tensor, IntermediateTensors]:
        """Flattened step tokens [T] -> final hidden states [T, hidden] (a dict on non-last PP stages)."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab]."""
        return self.lm_head.compute_logits(hidden_states)

    # ------------------------------------------------------------------ KV cache
    @property
    def num_local_layers(self) -> int:
        return self.model.end_layer - self.model.start_layer

    @property
    def num_local_kv_heads(self) -> int:
        layer = self.model.layers[self.model.start_layer]
        return layer.self_attn.num_kv_heads if self.num_local_layers else 0

    def make_kv_caches(self, num_blocks: int, block_size: int, device: torch.device | str) -> list[torch.Tensor]:
        """One [num_blocks, block_size, 2, local_kv_heads, head_dim] tensor per layer of this stage."""
        hd = head_dim_of(self.config)
        return [make_kv_cache(num_blocks, block_size, self.num_local_kv_heads, hd, self.dtype, device)
                for _ in range(self.num_local_layers)]

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * block_size * self.num_local_kv_heads * head_dim_of(self.config) * elem * self.num_local_layers

    # ------------------------------------------------------------------ weights
    def _target(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, object]:
        """Checkpoint name -> (our parameter name, shard id)."""
        for ckpt_part, fused_part, shard in _STACKED_PARAMS:
            if f".{ckpt_part}." in name:
                return name.replace(f".{ckpt_part}.", f".{fused_part}."), shard
        if name == "model.embed_tokens.weight" and name not in params and self.tie_word_embeddings:
            return "lm_head.weight", None  # last PP stage without the embedding: tied head
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, Union[torch.Tensor, Loaded]]]) -> None:
        """Load HF-named weights (tensors or lazy safetensors slices); each rank keeps its shard only."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, weight in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard = self._target(name, params)
            if target not in params:
                if self.model.pp_size > 1:
                    continue  # belongs to another pipeline stage
                raise ValueError(f"checkpoint weight {name!r} has no matching parameter in {type(self).__name__}")
            param = params[target]
            getattr(param, "weight_loader", default_weight_loader)(param, weight, shard)
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                             + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
