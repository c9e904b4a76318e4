"""Which model class serves which Hugging Face architecture."""
from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from distinfer.model.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
_MODEL_TYPES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    """Pick by `architectures` (first match), else by `model_type`."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = getattr(hf_config, "model_type", None)
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    name = archs[0] if archs else model_type
    raise ValueError(f"Unsupported architecture {name!r}; supported: {', '.join(supported_architectures())}")
