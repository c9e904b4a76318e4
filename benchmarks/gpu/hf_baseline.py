"""The transformers baseline of the GPU benchmark: the same config built directly on the device, eager
(no torch.compile), batched generate() with left padding, prompts bucketed by length."""
from __future__ import annotations

import logging
import time

import torch

from gpu_measure import Workload, sync

logger = logging.getLogger("benchmarks.gpu.hf")


def build_hf_model(model_dir: str, dtype: torch.dtype, device: torch.device):
    """AutoModelForCausalLM.from_config on the device (random init there: no host copy of 16 GB)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # No EOS: every row runs to max_new_tokens without a min_new_tokens logits processor (ignore_eos's twin).
    model.generation_config.eos_token_id = None
    return model.eval()


def weight_bytes(model: torch.nn.Module, tied: bool) -> tuple[int, int]:
    """(all parameter bytes, bytes a decode step reads): the input embedding table is read one row per token,
    so it is left out of the second figure unless it is tied to (read in full as) the lm_head."""
    params = dict(model.named_parameters())  # shared parameters once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed = sum(p.numel() * p.element_size() for n, p in params.items() if "embed_tokens" in n)
    return total, total if tied else total - embed


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, cache: str | None) -> int:
    """One left-padded batch generating exactly `new_tokens` each; returns the tokens generated."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    device = model.device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, cache_implementation=cache)
    generated = (out.shape[1] - width) * len(prompts)
    assert generated == new_tokens * len(prompts), (generated, new_tokens, len(prompts))
    return generated


def hf_throughput(model, work: Workload, batch_size: int, pad_id: int, cache: str | None) -> float:
    """Output tok/s over the workload: requests sorted by prompt length (buckets of similar length, little
    padding), each batch generating its longest requested output; only requested tokens count."""
    order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
    sync(model.device)
    start = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        hf_generate(model, [work.prompts[i] for i in batch], max(work.output_lens[i] for i in batch), pad_id, cache)
    sync(model.device)
    return work.num_output_tokens / (time.perf_counter() - start)


def try_cache(fn, cache: str | None) -> float | None:
    """fn(cache) or None when that cache implementation fails here (reported, not fatal)."""
    try:
        return fn(cache)
    except Exception as e:  # noqa: BLE001 - a baseline option that does not work is skipped, with the reason
        logger.warning("transformers with cache_implementation=%s failed: %s: %s", cache, type(e).__name__, e)
        return None
