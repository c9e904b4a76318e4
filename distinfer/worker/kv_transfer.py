"""KV blocks out of and into this rank's device cache, for moving a request between engine instances
(live migration, prefill/decode hand-off). The same block layout as the host tier: one block is a slab of
[block_size, 2, Hkv, D] per layer, so an export is one index_select per layer and an import one index_copy_.

An export is a list with one CPU tensor [num_blocks, block_size, 2, Hkv, D] per layer of this rank (its
heads under TP, its layers under PP). Tagged with the rank's `KVLayout` it is a `KVShard`; `reshard` turns
the shards of one instance into the per-rank tensors of another with different tensor/pipeline parallel sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
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


# ---------------------------------------------------------------- layouts and re-sharding between instances


@dataclass(frozen=True)
class KVLayout:
    """Which part of the model's KV cache one rank holds: global layers [first_layer, first_layer + num_layers)
    (its pipeline stage) and global KV heads [first_head, first_head + num_heads) (its tensor parallel shard;
    when tp > the model's KV heads several ranks hold the same head). The rest describes the whole model's
    cache, which two instances must share to exchange KV."""

    first_layer: int
    num_layers: int
    first_head: int
    num_heads: int
    total_layers: int
    total_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def model_kv(self) -> tuple:
        """What must match between a source and a destination (layers, heads, head size, block size, dtype)."""
        return self.total_layers, self.total_heads, self.head_dim, self.block_size, self.dtype

    def holds(self, layer: int, head: int) -> bool:
        return (self.first_layer <= layer < self.first_layer + self.num_layers
                and self.first_head <= head < self.first_head + self.num_heads)


@dataclass
class KVShard:
    """One rank's part of an export: its layout and one CPU tensor [num_blocks, block_size, 2, num_heads,
    head_dim] per layer it holds, in layer order."""

    layout: KVLayout
    tensors: list[torch.Tensor]


def _describe(key: tuple) -> str:
    layers, heads, head_dim, block_size, dtype = key
    return f"{layers} layers x {heads} KV heads of {head_dim}, blocks of {block_size} tokens, {dtype}"


def check_export(kv: Sequence[KVShard], dst: Sequence[KVLayout]) -> int:
    """The number of blocks in an export, after checking it is well formed and of the same model cache as the
    destination's layouts (ValueError otherwise)."""
    if not dst:
        raise ValueError("the destination has no ranks")
    if any(not isinstance(shard, KVShard) for shard in kv):
        raise ValueError("a KV export must be a list of KVShard, one per source rank")
    want = dst[0].model_kv
    num_blocks: int | None = None
    for rank, shard in enumerate(kv):
        layout = shard.layout
        if layout.model_kv != want:
            raise ValueError(f"KV of {_describe(layout.model_kv)} (source rank {rank}) for an instance of "
                             f"{_describe(want)}")
        if len(shard.tensors) != layout.num_layers:
            raise ValueError(f"source rank {rank}: {len(shard.tensors)} layers of KV for a layout of "
                             f"{layout.num_layers}")
        for tensor in shard.tensors:
            num_blocks = tensor.shape[0] if num_blocks is None else num_blocks
            expected = (num_blocks, layout.block_size, 2, layout.num_heads, layout.head_dim)
            if tuple(tensor.shape) != expected or tensor.dtype != layout.dtype:
                raise ValueError(f"source rank {rank}: got KV {tuple(tensor.shape)} {tensor.dtype}, expected "
                                 f"{expected} {layout.dtype}")
    _check_covered(kv, *want[:2])
    return num_blocks or 0


def _check_covered(kv: Sequence[KVShard], total_layers: int, total_heads: int) -> None:
    """Every head of every layer is in some source rank (an export of one instance always is)."""
    if not kv:
        return
    missing = next(((layer, head) for layer in range(total_layers) for head in range(total_heads)
                    if not any(shard.layout.holds(layer, head) for shard in kv)), None)
    if missing is not None:
        raise ValueError(f"no source rank holds KV head {missing[1]} of layer {missing[0]}")


def _heads(kv: Sequence[KVShard], layer: int, first: int, count: int) -> torch.Tensor:
    """Heads [first, first + count) of a global layer, from the first source rank holding each (replicas are
    equal); a source tensor itself when one rank holds exactly these heads (no copy)."""
    pieces, head = [], first
    while head < first + count:
        shard = next((s for s in kv if s.layout.holds(layer, head)), None)
        if shard is None:
            raise ValueError(f"no source rank holds KV head {head} of layer {layer}")
        layout = shard.layout
        tensor = shard.tensors[layer - layout.first_layer]
        end = min(first + count, layout.first_head + layout.num_heads)
        if head == layout.first_head and end == layout.first_head + layout.num_heads:
            pieces.append(tensor)
        else:
            pieces.append(tensor[:, :, :, head - layout.first_head:end - layout.first_head])
        head = end
    if len(pieces) == 1:  # a whole source tensor as is; a slice copied, so that it ships without the rest
        return pieces[0].contiguous()
    return torch.cat(pieces, dim=3)


def reshard(kv: Sequence[KVShard], dst: Sequence[KVLayout]) -> list[list[torch.Tensor]]:
    """An export's blocks re-split for the destination's ranks: per destination rank, one tensor per layer
    it holds. Works across tensor and pipeline parallel sizes: for each global layer, the destination rank's
    heads are taken from the source ranks that hold them. Identical layouts pass the tensors through."""
    check_export(kv, dst)
    if [shard.layout for shard in kv] == list(dst):
        return [shard.tensors for shard in kv]
    made: dict[tuple[int, int, int], torch.Tensor] = {}  # replicated destination heads share one tensor
    out = []
    for layout in dst:
        layers = []
        for layer in range(layout.first_layer, layout.first_layer + layout.num_layers):
            key = (layer, layout.first_head, layout.num_heads)
            if key not in made:
                made[key] = _heads(kv, layer, layout.first_head, layout.num_heads)
            layers.append(made[key])
        out.append(layers)
    return out
