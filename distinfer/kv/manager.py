"""KVCacheManager: maps request ids to block tables over a BlockPool, with prefix caching.

Deals in request ids and token ids only (never engine Request objects). Invariants:
- A request's block table holds ceil(tokens it may hold / block_size) blocks, in order.
- Only full blocks whose every token is computed are hashed into the prefix cache.
- A prefix hit never covers the whole sequence: at least one token is left to compute,
  so the model produces logits for the next token.
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, max_model_len: int,
                 num_host_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        needed = _cdiv(max_model_len, block_size)
        if num_blocks < needed:
            raise ValueError(
                f"KV cache budget of {num_blocks} blocks ({num_blocks * block_size} tokens at "
                f"block_size={block_size}) cannot hold one sequence of max_model_len={max_model_len} "
                f"tokens, which needs {needed} blocks: raise num_kv_blocks (or kv_cache_bytes) to at "
                f"least {needed} blocks, or lower max_model_len to at most {num_blocks * block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.host = HostKVTier(num_host_blocks) if num_host_blocks > 0 else None
        # Block copies planned since the last take_ops(), in the order the workers must run them.
        self._ops: list[KVBlockCopy] = []
        spill = self._spill if self.host is not None and enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, on_evict=spill)
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

    # ------------------------------------------------------------------ updates

    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Assign the longest cached prefix (full blocks, leaving >= 1 token) to a request that
        holds no blocks; returns the number of tokens it covers."""
        if self._req_blocks.get(request_id):
            raise ValueError(f"request {request_id!r} already holds blocks; free it before a prefix lookup")
        if not self.enable_prefix_caching:
            return 0
        max_blocks = max(len(token_ids) - 1, 0) // self.block_size
        hashes = hash_full_blocks(token_ids, self.block_size, num_blocks=max_blocks)
        hits: list[KVBlock] = []
        for block_hash in hashes:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.touch(hits)  # before any allocation below, which must not evict them
        num_device_hits = len(hits)
        if self.host is not None:
            hits += self._copy_in_host_hits(hashes[len(hits):])
        self._req_blocks[request_id] = hits
        self._req_hashes[request_id] = hashes[:len(hits)]
        self._req_num_cached[request_id] = len(hits)
        num_hit_tokens = len(hits) * self.block_size
        self._stats.queries += len(token_ids)
        self._stats.hits += num_hit_tokens
        self._stats.host_hits += (len(hits) - num_device_hits) * self.block_size
        return num_hit_tokens

    def _copy_in_host_hits(self, hashes: list[BlockHash]) -> list[KVBlock]:
        """Device blocks for the leading `hashes` found in the host tier, registered in the device prefix
        cache; their contents arrive by a copy that runs before the step's forward."""
        host_ids = self.host.reserve_hits(hashes)
        count = min(len(host_ids), self.pool.num_free_blocks)
        blocks = self.pool.allocate(count) if count else []  # may spill evicted blocks (planned first)
        for block, block_hash in zip(blocks, hashes):
            self.pool.cache_block(block, block_hash)
        if blocks:
            self._ops.append(KVBlockCopy(KVCopyDirection.SWAP_IN, [b.block_id for b in blocks], host_ids[:count]))
        self.host.release_hits(hashes[:len(host_ids)], host_ids, count)
        return blocks

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold `num_tokens` tokens in all. Returns the new block ids,
        or None (nothing changed) when too few blocks are free (evictable cached ones count)."""
        blocks = self._req_blocks.setdefault(request_id, [])
        num_new = _cdiv(num_tokens, self.block_size) - len(blocks)
        if num_new <= 0:
            return []
        if num_new > self.pool.num_free_blocks:
            return None
        new_blocks = self.pool.allocate(num_new)
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
        self._ops.append(self.host.swap_out(request_id, block_ids))
        return True

    def is_swapped(self, request_id: str) -> bool:
        return self.host is not None and self.host.holds(request_id)

    def swap_in(self, request_id: str, device_block_ids: list[int]) -> None:
        """Plan the copy of a swapped request's blocks back into its first device blocks."""
        self._ops.append(self.host.swap_in(request_id, device_block_ids))

    def free_host(self, request_id: str) -> None:
        if self.host is not None:
            self.host.free(request_id)

    def _spill(self, block_id: int, block_hash: BlockHash) -> None:
        op = self.host.spill(block_hash, block_id)
        if op is not None:
            self._ops.append(op)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        if self.host is not None:
            self.host.reset_cache()
        # Requests' hash chains stay valid; their blocks simply are no longer registered.
