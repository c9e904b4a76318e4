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
