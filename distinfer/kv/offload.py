"""The host tier of the KV cache (CPU DRAM): which host block holds what. Deals in request ids, block
hashes and block ids only; the workers hold the bytes and run the copies (messages.KVBlockCopy) before
the step's forward, in the order they were planned.

A host block is free, holds a swapped-out request's block (until it swaps back in or ends), or holds a
prefix-cache block spilled from the device (hash-addressed, LRU: the least recently spilled or hit is
reused first when no block is free). Swapped blocks are never evicted.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from distinfer.kv.block_pool import BlockHash
from distinfer.messages import KVBlockCopy, KVCopyDirection


@dataclass
class HostTierStats:
    swapped_out_blocks: int = 0  # device -> host for preempted requests
    swapped_in_blocks: int = 0  # host -> device for resumed requests
    spilled_blocks: int = 0  # device prefix-cache blocks copied out on eviction
    hit_blocks: int = 0  # prefix blocks found in the host tier and copied back


class HostKVTier:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low, contiguous ids
        self._swapped: dict[str, list[int]] = {}
        self._cached: OrderedDict[BlockHash, int] = OrderedDict()  # oldest first
        self.stats = HostTierStats()

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks a swap-out can take now: free ones plus evictable spilled ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def holds(self, request_id: str) -> bool:
        return request_id in self._swapped

    def can_hold(self, num_blocks: int) -> bool:
        return 0 < num_blocks <= self.num_free_blocks

    # ------------------------------------------------------------------ swap (preemption)

    def swap_out(self, request_id: str, device_block_ids: list[int]) -> KVBlockCopy:
        """Host blocks for the request's computed device blocks (in order); the copy to run."""
        if request_id in self._swapped:
            raise ValueError(f"request {request_id!r} is already swapped out")
        if not self.can_hold(len(device_block_ids)):
            raise ValueError(f"cannot hold {len(device_block_ids)} blocks ({self.num_free_blocks} available)")
        host_ids = [self._take() for _ in device_block_ids]
        self._swapped[request_id] = host_ids
        self.stats.swapped_out_blocks += len(host_ids)
        return KVBlockCopy(KVCopyDirection.SWAP_OUT, list(device_block_ids), host_ids)

    def swap_in(self, request_id: str, device_block_ids: list[int], skip: int = 0) -> KVBlockCopy:
        """Copy the request's host blocks, less the first `skip` (still cached on the device, so not needed),
        into `device_block_ids` (one each). All its host blocks are free again at once: a later op that reuses
        them is planned, and so runs, after this copy."""
        host_ids = self._swapped.pop(request_id)
        if len(device_block_ids) != len(host_ids) - skip:
            self._swapped[request_id] = host_ids
            raise ValueError(f"request {request_id!r}: {len(host_ids) - skip} host blocks to copy need as many "
                             f"device blocks, got {len(device_block_ids)}")
        self._free.extend(reversed(host_ids))
        self.stats.swapped_in_blocks += len(device_block_ids)
        return KVBlockCopy(KVCopyDirection.SWAP_IN, list(device_block_ids), host_ids[skip:])

    def free(self, request_id: str) -> None:
        """Drop a request's swapped blocks (it finished or was aborted while swapped out)."""
        self._free.extend(reversed(self._swapped.pop(request_id, [])))

    # ------------------------------------------------------------------ prefix spill

    def spill(self, block_hash: BlockHash, device_block_id: int) -> KVBlockCopy | None:
        """A hashed device block is being evicted: keep a copy (None: already here, or no room)."""
        if block_hash in self._cached:
            self._cached.move_to_end(block_hash)
            return None
        if not self.num_free_blocks:
            return None
        host_id = self._take()
        self._cached[block_hash] = host_id
        self.stats.spilled_blocks += 1
        return KVBlockCopy(KVCopyDirection.SWAP_OUT, [device_block_id], [host_id])

    def count_hits(self, hashes: list[BlockHash]) -> int:
        """How many of the leading `hashes` are spilled here (changes nothing)."""
        count = 0
        while count < len(hashes) and hashes[count] in self._cached:
            count += 1
        return count

    def reserve_hits(self, hashes: list[BlockHash]) -> list[int]:
        """Host ids of the leading `hashes` spilled here, taken out of the LRU so that nothing planned
        before their copy-in can reuse them; hand them back with `release_hits`."""
        hits: list[int] = []
        for block_hash in hashes:
            host_id = self._cached.pop(block_hash, None)
            if host_id is None:
                break
            hits.append(host_id)
        return hits

    def release_hits(self, hashes: list[BlockHash], host_ids: list[int], num_used: int) -> None:
        """Back into the LRU as the most recent; the first `num_used` were copied in (hits)."""
        for block_hash, host_id in zip(hashes, host_ids):
            self._cached[block_hash] = host_id
        self.stats.hit_blocks += num_used

    def reset_cache(self) -> None:
        """Forget every spilled block (swapped requests keep theirs)."""
        self._free.extend(self._cached.values())
        self._cached.clear()

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        _, host_id = self._cached.popitem(last=False)  # the least recently used spilled block
        return host_id
