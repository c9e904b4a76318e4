"""KVCacheManager: maps request ids to block tables over a BlockPool, with prefix caching.

Deals in request ids and token ids only (never engine Request objects). Invariants:
- A request's block table holds ceil(tokens it may hold / block_size) blocks, in order.
- Only full blocks whose every token is computed are hashed into the prefix cache.
- A prefix hit never covers the whole sequence: at least one token is left to compute,
  so the model produces logits for the next token.
- Sequence parallelism (`num_partitions` = sp > 1): the pool is cut into one partition per SP rank
  (that rank's own cache) and a request's block i always comes from partition i % sp, so its KV is
  spread block-cyclically over the ranks: the owner of every token follows from its position alone,
  which keeps prefix-cache hits valid (a hash names a block index, hence a partition).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from distinfer.kv.block_pool import BlockHash, BlockPool, KVBlock, hash_full_blocks
from distinfer.kv.offload import HostKVTier
from distinfer.messages import KVBlockCopy, KVCopyDirection

logger = logging.getLogger(__name__)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found (in either tier)
    host_hits: int = 0  # of those, tokens found in the host tier and copied back

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class ComputedPrefix:
    """The leading blocks of a waiting request that need no computing (KVCacheManager.find_computed): some
    cached on the device, then `num_host_blocks` in the host tier (spilled prefix blocks, or, when `swapped`,
    the request's own swapped-out blocks)."""

    hashes: list[BlockHash]  # of the full blocks among them, in order
    device_blocks: list[KVBlock]
    num_host_blocks: int
    num_tokens: int  # tokens they cover
    swapped: bool
    num_queried_tokens: int = 0  # for the prefix-cache stats (not counted for swapped requests)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int,
                 num_host_blocks: int = 0, num_partitions: int = 1) -> None:
        """`num_blocks` in all: `num_partitions` (sp) ranks of num_blocks / sp each."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_partitions > 1 and num_host_blocks:
            raise ValueError("the KV host tier (kv_offloading_size) is not supported with sequence parallelism")
        per_rank, needed = num_blocks // num_partitions, _cdiv(_cdiv(max_model_len, block_size), num_partitions)
        if per_rank < needed:
            ranks = f" on each of {num_partitions} sequence-parallel ranks" if num_partitions > 1 else ""
            raise ValueError(
                f"KV cache budget of {per_rank} blocks{ranks} ({per_rank * block_size} tokens at "
                f"block_size={block_size}) cannot hold one sequence of max_model_len={max_model_len} "
                f"tokens, which needs {needed} blocks{' per rank' if ranks else ''}: raise num_kv_blocks (or "
                f"kv_cache_bytes) to at least {needed} blocks, or lower max_model_len to at most "
                f"{per_rank * num_partitions * block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.host = HostKVTier(num_host_blocks) if num_host_blocks > 0 else None
        # Block copies planned since the last take_ops(), in the order the workers must run them.
        self._ops: list[KVBlockCopy] = []
        spill = self._spill if self.host is not None and enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, on_evict=spill, num_partitions=num_partitions)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}  # hash chain of the request's full blocks
        self._req_num_cached: dict[str, int] = {}  # leading blocks already registered/hit
        self._stats = PrefixCacheStats()

    # ------------------------------------------------------------------ queries

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._stats.queries, self._stats.hits, self._stats.host_hits)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._req_blocks.get(request_id, [])]

    def _partitions(self, first_block: int, num_blocks: int) -> list[int] | None:
        """Partitions of a request's blocks first_block.. (None: the pool is not partitioned)."""
        num_partitions = self.pool.num_partitions
        if num_partitions == 1:
            return None
        return [(first_block + i) % num_partitions for i in range(num_blocks)]

    def _can_allocate(self, first_block: int, num_new: int, taking: Sequence[KVBlock] = ()) -> bool:
        """Room for a request's blocks first_block..first_block+num_new-1, once the free blocks in `taking`
        (prefix hits about to be touched) have left the free queues."""
        partitions = self._partitions(first_block, num_new)
        if partitions is None:
            return num_new <= self.pool.num_free_blocks - sum(1 for block in taking if block.ref_cnt == 0)
        for partition in set(partitions):
            taken = sum(1 for b in taking if b.ref_cnt == 0 and self.pool.partition_of(b.block_id) == partition)
            if partitions.count(partition) > self.pool.num_free_in(partition) - taken:
                return False
        return True

    # ------------------------------------------------------------------ updates

    def find_computed(self, request_id: str, token_ids: Sequence[int], num_swapped_tokens: int = 0) -> ComputedPrefix:
        """What a request that holds no blocks finds already computed; changes nothing. A request swapped out to
        the host tier finds its own `num_swapped_tokens` there, less the leading full blocks still cached on the
        device; any other finds the longest cached prefix (full blocks, leaving >= 1 token to compute), on the
        device first, then spilled to the host tier."""
        if self._req_blocks.get(request_id):
            raise ValueError(f"request {request_id!r} already holds blocks; free it before a prefix lookup")
        swapped = self.is_swapped(request_id)
        num_full = (num_swapped_tokens if swapped else max(len(token_ids) - 1, 0)) // self.block_size
        hashes = hash_full_blocks(token_ids, self.block_size, num_blocks=num_full) if self.enable_prefix_caching else []
        device: list[KVBlock] = []
        for block_hash in hashes:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            device.append(block)
        if swapped:
            num_host = _cdiv(num_swapped_tokens, self.block_size) - len(device)
            return ComputedPrefix(hashes, device, num_host, num_swapped_tokens, swapped=True)
        num_host = self.host.count_hits(hashes[len(device):]) if self.host is not None else 0
        hashes = hashes[:len(device) + num_host]
        return ComputedPrefix(hashes, device, num_host, len(hashes) * self.block_size, swapped=False,
                              num_queried_tokens=len(token_ids) if self.enable_prefix_caching else 0)

    def admit(self, request_id: str, prefix: ComputedPrefix, num_tokens: int) -> list[int] | None:
        """Give a request found `prefix` (from find_computed, with nothing changed since) a table for `num_tokens`
        tokens: the device hits shared, new blocks for the rest, the host blocks' copy-in planned. Returns the
        new block ids, or None (nothing changed, nothing planned) when too few blocks are free."""
        num_new = _cdiv(num_tokens, self.block_size) - len(prefix.device_blocks)
        if num_tokens < prefix.num_tokens or not self._can_allocate(len(prefix.device_blocks), num_new,
                                                                      prefix.device_blocks):
            return None
        self.pool.touch(prefix.device_blocks)  # before the allocation, which must not evict them
        if prefix.swapped:
            new_blocks = self._admit_swapped(request_id, prefix, num_new)
        else:
            new_blocks = self._admit_with_host_hits(prefix, num_new)
            self._stats.queries += prefix.num_queried_tokens
            self._stats.hits += prefix.num_tokens
            self._stats.host_hits += prefix.num_host_blocks * self.block_size
        self._req_blocks[request_id] = prefix.device_blocks + new_blocks
        self._req_hashes[request_id] = list(prefix.hashes)
        self._req_num_cached[request_id] = len(prefix.hashes)
        return [block.block_id for block in new_blocks]

    def _admit_with_host_hits(self, prefix: ComputedPrefix, num_new: int) -> list[KVBlock]:
        """New blocks; the first `num_host_blocks` get the spilled prefix blocks, registered in the device cache."""
        host_hashes = prefix.hashes[len(prefix.device_blocks):]
        host_ids = self.host.reserve_hits(host_hashes) if host_hashes else []  # nothing below may reuse them
        if len(host_ids) != len(host_hashes):
            raise RuntimeError("the host tier changed between find_computed and admit")
        first = len(prefix.device_blocks)  # may spill evicted blocks: planned before the copy-in
        new_blocks = self.pool.allocate(num_new, self._partitions(first, num_new))
        for block, block_hash in zip(new_blocks, host_hashes):
            self.pool.cache_block(block, block_hash)
        if host_ids:
            self._plan(KVBlockCopy(KVCopyDirection.SWAP_IN, [b.block_id for b in new_blocks[:len(host_ids)]],
                                   host_ids))
            self.host.release_hits(host_hashes, host_ids, len(host_ids))
        return new_blocks

    def _admit_swapped(self, request_id: str, prefix: ComputedPrefix, num_new: int) -> list[KVBlock]:
        """New blocks; the first `num_host_blocks` get the request's swapped blocks not found on the device."""
        # spills planned first: they cannot take the swapped host blocks
        new_blocks = self.pool.allocate(num_new, self._partitions(len(prefix.device_blocks), num_new))
        skip = len(prefix.device_blocks)
        self._plan(self.host.swap_in(request_id, [b.block_id for b in new_blocks[:prefix.num_host_blocks]], skip))
        for block, block_hash in zip(new_blocks, prefix.hashes[skip:]):  # swapped-in full blocks
            self.pool.cache_block(block, block_hash)
        return new_blocks

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold `num_tokens` tokens in all. Returns the new block ids,
        or None (nothing changed) when too few blocks are free (evictable cached ones count)."""
        blocks = self._req_blocks.setdefault(request_id, [])
        num_new = _cdiv(num_tokens, self.block_size) - len(blocks)
        if num_new <= 0:
            return []
        if not self._can_allocate(len(blocks), num_new):
            return None
        new_blocks = self.pool.allocate(num_new, self._partitions(len(blocks), num_new))
        blocks.extend(new_blocks)
        return [block.block_id for block in new_blocks]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Hash the request's newly full, computed blocks into the prefix cache."""
        if not self.enable_prefix_caching or request_id not in self._req_blocks:
            return
        blocks = self._req_blocks[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self._req_num_cached.get(request_id, 0)
        if num_full <= start:
            return
        hashes = self._req_hashes.setdefault(request_id, [])
        if len(hashes) < num_full:
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_full_blocks(token_ids, self.block_size, parent, len(hashes), num_full))
        for index in range(start, num_full):
            self.pool.cache_block(blocks[index], hashes[index])
        self._req_num_cached[request_id] = num_full

    def free(self, request_id: str, uncache: bool = False) -> None:
        """Release all of the request's blocks at once, tail first (tail blocks are evicted first).
        `uncache` (a request that failed, e.g. on non-finite values): blocks no other request holds
        leave the prefix cache, so a later request with the same prefix recomputes them."""
        blocks = self._req_blocks.pop(request_id, [])
        self._req_hashes.pop(request_id, None)
        self._req_num_cached.pop(request_id, None)
        self.pool.free(reversed(blocks), uncache)

    # ------------------------------------------------------------------ host tier

    def take_ops(self) -> list[KVBlockCopy]:
        """The block copies planned since the last call, in order (they go into one SchedulerOutput)."""
        ops, self._ops = self._ops, []
        return ops

    def swap_out(self, request_id: str, num_computed_tokens: int) -> bool:
        """Plan the copy of the request's computed blocks to the host tier; False (nothing planned) when
        there is no tier, nothing computed, or no room. The caller frees the device blocks."""
        block_ids = self.get_block_ids(request_id)[:_cdiv(num_computed_tokens, self.block_size)]
        if self.host is None or not self.host.can_hold(len(block_ids)):
            return False
        self._plan(self.host.swap_out(request_id, block_ids))
        return True

    def is_swapped(self, request_id: str) -> bool:
        return self.host is not None and self.host.holds(request_id)

    def free_host(self, request_id: str) -> None:
        if self.host is not None:
            self.host.free(request_id)

    def _spill(self, block_id: int, block_hash: BlockHash) -> None:
        op = self.host.spill(block_hash, block_id)
        if op is not None:
            self._plan(op)

    def _plan(self, op: KVBlockCopy) -> None:
        """Append a copy, merged into the previous one when both go the same way (one indexed copy per layer
        instead of one per block). Safe: a copy's sources are never the destinations of one going the same
        way, and the later of two pairs with the same destination wins, as it would have run last."""
        last = self._ops[-1] if self._ops else None
        if not op.device_block_ids:
            return
        if last is None or last.direction != op.direction:
            self._ops.append(op)
            return
        out = op.direction == KVCopyDirection.SWAP_OUT
        by_destination: dict[int, int] = {}
        for previous in (last, op):
            sources, destinations = ((previous.device_block_ids, previous.host_block_ids) if out
                                     else (previous.host_block_ids, previous.device_block_ids))
            by_destination.update(zip(destinations, sources))
        destinations, sources = list(by_destination), list(by_destination.values())
        last.device_block_ids, last.host_block_ids = (sources, destinations) if out else (destinations, sources)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        if self.host is not None:
            self.host.reset_cache()
        # Requests' hash chains stay valid; their blocks simply are no longer registered.
