"""KV blocks out of and into this rank's device cache, for moving a request between engine instances
(live migration, prefill/decode hand-off). The same block layout as the host tier: one block is a slab of
[block_size, 2, Hkv, D] per layer, so an export is one index_select per layer and an import one index_copy_.

An export is a list with one CPU tensor [num_blocks, block_size, 2, Hkv, D] per layer of this rank (its
heads under TP, its layers under PP); the destination rank with the same position imports it unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _index(block_ids: Sequence[int], num_blocks: int, device: torch.device) -> torch.Tensor:
    bad = [b for b in block_ids if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block id {bad[0]!r} is not in [0, {num_blocks})")
    return torch.tensor(list(block_ids), dtype=torch.long, device=device)


def export_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> list[torch.Tensor]:
    """A copy of the blocks, per layer, in host memory (synchronous: the copy is complete on return)."""
    if not kv_caches:
        return []
    index = _index(block_ids, kv_caches[0].shape[0], kv_caches[0].device)
    return [cache.index_select(0, index).to("cpu") for cache in kv_caches]


def import_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], layers: Sequence[torch.Tensor]) -> None:
    """Write an export of another rank with the same position into these blocks (validated first)."""
    if len(layers) != len(kv_caches):
        raise ValueError(f"{len(layers)} layers of KV for {len(kv_caches)} cache layers")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("a destination block id appears twice")
    if not kv_caches:
        return
    index = _index(block_ids, kv_caches[0].shape[0], kv_caches[0].device)
    for layer, (cache, data) in enumerate(zip(kv_caches, layers)):
        expected = (len(block_ids), *cache.shape[1:])
        if tuple(data.shape) != expected or data.dtype != cache.dtype:
            raise ValueError(f"layer {layer}: got KV {tuple(data.shape)} {data.dtype}, expected {expected} {cache.dtype}")
    for cache, data in zip(kv_caches, layers):
        cache.index_copy_(0, index, data.to(cache.device))
