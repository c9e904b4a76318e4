"""Fixed-size KV blocks: ref counts, a free queue and the prefix-cache map (hash -> block).

Invariants:
- A block is in the free queue iff its ref count is 0. Free blocks may still hold a hash
  (an evictable cached block); they keep it until allocation takes them from the head.
- The prefix-cache map only points at blocks whose `block_hash` is that key.
- Freed blocks go to the tail, allocation takes from the head: least recently freed cached
  blocks are evicted first (LRU).
- Partitions (sequence parallelism: one per SP rank, each rank's own cache): block ids
  [p * size, (p + 1) * size) are partition p's; each has its own free queue, and a block is only
  ever allocated from the partition the caller names.
"""
from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BlockHash = bytes  # sha256 digest: stable across processes, so blocks can move by hash


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Stable hash of a FULL block: sha256(parent hash || token ids as little-endian int64)."""
    digest = hashlib.sha256()
    digest.update(parent_hash or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, parent_hash: BlockHash | None = None,
                     start_block: int = 0, num_blocks: int | None = None) -> list[BlockHash]:
    """Hash chain of the full blocks of `token_ids`, from block `start_block` (whose parent is
    `parent_hash`) up to `num_blocks` blocks in all (default: every full block)."""
    end = len(token_ids) // block_size if num_blocks is None else num_blocks
    hashes: list[BlockHash] = []
    for index in range(start_block, end):
        parent_hash = hash_block_tokens(parent_hash, token_ids[index * block_size:(index + 1) * block_size])
        hashes.append(parent_hash)
    return hashes


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set once the block is full, computed and cached


class BlockPool:
    """All KV blocks of one instance. Deals in blocks only; KVCacheManager maps requests to them."""

    def __init__(self, num_blocks: int, on_evict: Callable[[int, BlockHash], None] | None = None,
                 num_partitions: int = 1) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if num_partitions < 1 or num_blocks % num_partitions:
            raise ValueError(f"{num_blocks} blocks do not split into {num_partitions} equal partitions")
        self.num_blocks = num_blocks
        self.num_partitions = num_partitions
        self.partition_size = num_blocks // num_partitions
        self.on_evict = on_evict  # (block id, hash) of a cached block about to be reused, while it still holds it
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # per partition: block_id -> block, head first; O(1) removal from the middle when a cached block is hit.
        self._free: list[OrderedDict[int, KVBlock]] = [
            OrderedDict((b.block_id, b) for b in self.blocks[p * self.partition_size:(p + 1) * self.partition_size])
            for p in range(num_partitions)]
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: never used plus evictable cached blocks."""
        return sum(len(free) for free in self._free)

    def num_free_in(self, partition: int) -> int:
        return len(self._free[partition])

    def partition_of(self, block_id: int) -> int:
        return block_id // self.partition_size

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, num_blocks: int, partitions: Sequence[int] | None = None) -> list[KVBlock]:
        """Take `num_blocks` from the head of the free queue (evicting their hashes), ref 1 each; block i from
        partition partitions[i] (needed when there are several)."""
        if partitions is None:
            if self.num_partitions > 1:
                raise ValueError("a partitioned pool allocates from named partitions")
            partitions = [0] * num_blocks
        for partition in set(partitions):
            wanted = partitions.count(partition)
            if wanted > len(self._free[partition]):
                raise ValueError(f"cannot allocate {wanted} blocks in partition {partition}: only "
                                 f"{len(self._free[partition])} free")
        taken: list[KVBlock] = []
        for partition in partitions:
            _, block = self._free[partition].popitem(last=False)
            if block.block_hash is not None and self.on_evict is not None:
                self.on_evict(block.block_id, block.block_hash)
            self._evict_hash(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (prefix hit); a free cached block leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[self.partition_of(block.block_id)][block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock], uncache: bool = False) -> None:
        """Drop one reference from each block, in the given order; unreferenced ones go to the
        tail of the free queue (keeping their hash, so they can still be hit until reused, unless
        `uncache`: then their contents are not trusted and their hash is dropped)."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more times than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if uncache:
                    self._evict_hash(block)
                self._free[self.partition_of(block.block_id)][block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Register a full, computed block under `block_hash`. False (nothing changes) when the
        block already has a hash or another block already holds this hash."""
        if block.block_hash is not None or block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash. Blocks in use keep their contents; they just cannot be hit."""
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        logger.info("prefix cache reset")

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
