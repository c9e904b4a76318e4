"""Shared benchmark helpers: the transformers baseline and this machine's memory bandwidth."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from distinfer.config import ModelConfig
from distinfer.model.loader import resolve_model_path


@dataclass
class Workload:
    """Prompts (token ids) and how many tokens each must generate."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def describe(self) -> dict:
        lens = [len(p) for p in self.prompts]
        return {"requests": len(self.prompts), "prompt_tokens": self.num_prompt_tokens,
                "output_tokens": self.num_output_tokens, "prompt_len_min_max": [min(lens), max(lens)],
                "output_len_min_max": [min(self.output_lens), max(self.output_lens)]}


def hf_reference_model(dtype: str = "float32", model: str | None = None):
    """The transformers model read from the same HF directory distinfer loads (the converted default)."""
    config = ModelConfig(model=model, dtype=dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model), dtype=config.torch_dtype)
    return hf_model.eval(), config.torch_dtype


def measure_memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: best of several full reductions over a buffer far larger than cache."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best
