"""KV cache sizing on CUDA, as vLLM does it: the card's memory times gpu_memory_utilization, less the weights,
the peak activations of a profiling forward at the step's token budget, and what CUDA itself holds; the rest
is KV blocks."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_GIB = float(1 << 30)


@dataclass
class ProfileBatch:
    """Prefill rows filling the step's token budget: query_lens[i] tokens in blocks block_tables[i]."""

    query_lens: list[int]
    block_tables: list[list[int]]
    num_blocks: int


def profile_batch(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int) -> ProfileBatch:
    """The largest step the scheduler can form: max_num_batched_tokens tokens over as many rows as it
    allows (each row at most max_model_len tokens), every row a fresh prefill."""
    tokens = max_num_batched_tokens
    rows = max(min(max_num_seqs, tokens), -(-tokens // max_model_len))
    base, extra = divmod(tokens, rows)
    query_lens = [base + (1 if i < extra else 0) for i in range(rows)]
    tables, next_block = [], 0
    for n in query_lens:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    return ProfileBatch(query_lens, tables, next_block)


def kv_cache_budget(device: torch.device, utilization: float, profile: Callable[[], None]) -> int:
    """Bytes this rank may give to KV blocks, after running `profile` (a forward at peak size)."""
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)  # weights + the profile's activations (+ anything else of ours)
    outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))  # CUDA context, NCCL, other processes
    budget = int(total * utilization) - peak - outside_torch
    logger.info("GPU memory: %.2f GiB total x %.2f utilization; peak in use %.2f GiB (weights + activations), "
                "%.2f GiB outside torch; %.2f GiB for KV blocks", total / _GIB, utilization, peak / _GIB,
                outside_torch / _GIB, max(budget, 0) / _GIB)
    if budget <= 0:
        raise RuntimeError(f"no GPU memory is left for KV blocks at gpu_memory_utilization={utilization}: the model "
                           f"and its activations take {peak / _GIB:.2f} GiB of {total / _GIB:.2f} GiB "
                           f"({outside_torch / _GIB:.2f} GiB more are in use outside torch). Raise "
                           "gpu_memory_utilization, lower max_num_batched_tokens, or use more GPUs (tensor parallel).")
    return budget
