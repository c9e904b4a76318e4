"""Shared by the paged-attention kernel tests: a KV cache whose every slot is NaN until written, with rows in
shuffled blocks. Kept free of triton imports: the kernel test modules set TRITON_INTERPRET before theirs."""
from __future__ import annotations

import random

import torch

NAN = float("nan")


def poisoned_paged_cache(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(cache [blocks, block_size, 2, Hkv, D] all NaN, block tables): room for lens[i] tokens in row i, plus one
    spare block per row, block ids shuffled (block 0 is only padding), tables padded with 0 to one width."""
    need = [-(-n // block_size) + 1 for n in lens]
    pool = list(range(1, sum(need) + 1))
    random.Random(seed).shuffle(pool)
    width = max(need)
    tables = [[pool.pop() for _ in range(n)] + [0] * (width - n) for n in need]
    cache = torch.full((sum(need) + 1, block_size, 2, num_kv_heads, head_dim), NAN, dtype=dtype)
    return cache, tables
