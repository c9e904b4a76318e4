"""Shared fixtures: the real default model, its transformers oracle, and oracle outputs."""
from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("distinfer").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The HF directory (config.json + safetensors) distinfer reads for the default model."""
    from distinfer.config import ModelConfig
    from distinfer.model.loader import resolve_model_path

    return resolve_model_path(ModelConfig().model)


@pytest.fixture(scope="session")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers generate(do_sample=False), one prompt at a time (no padding)."""
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def save_tiny_llama(path: str, tokenizer_dir: str, **shape) -> str:
    """A random Llama of `shape` (LlamaConfig fields) saved as safetensors at `path`, with the tokenizer
    of `tokenizer_dir` (seed 0: the same weights every time)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
