"""The host tier of the KV cache (CPU DRAM): block ids of every rank's host pool, and which request's
swapped-out blocks sit where. Deals in request ids and block ids only; the workers hold the bytes and
run the copies (messages.KVBlockCopy) before the step's forward, in order.

Invariants:
- A host block belongs to at most one swapped request; `free` returns all of a request's host blocks.
- A swapped request's host blocks hold its first cdiv(num_computed_tokens, block_size) blocks, in order.
"""
from __future__ import annotations

from distinfer.messages import KVBlockCopy, KVCopyDirection


class HostSwapSpace:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id first
        self._swapped: dict[str, list[int]] = {}
        self.num_swapped_out = 0  # blocks copied device -> host, all time
        self.num_swapped_in = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def holds(self, request_id: str) -> bool:
        return request_id in self._swapped

    def num_held(self, request_id: str) -> int:
        return len(self._swapped.get(request_id, ()))

    def can_hold(self, num_blocks: int) -> bool:
        return 0 < num_blocks <= len(self._free)

    def swap_out(self, request_id: str, device_block_ids: list[int]) -> KVBlockCopy:
        """Reserve host blocks for the request's device blocks (in order); the copy to run."""
        if request_id in self._swapped:
            raise ValueError(f"request {request_id!r} is already swapped out")
        if not self.can_hold(len(device_block_ids)):
            raise ValueError(f"cannot hold {len(device_block_ids)} blocks ({len(self._free)} free)")
        host_ids = [self._free.pop() for _ in device_block_ids]
        self._swapped[request_id] = host_ids
        self.num_swapped_out += len(host_ids)
        return KVBlockCopy(KVCopyDirection.SWAP_OUT, list(device_block_ids), host_ids)

    def swap_in(self, request_id: str, device_block_ids: list[int]) -> KVBlockCopy:
        """The copy of the request's host blocks into `device_block_ids` (its first blocks); the host
        blocks are free again once this step's copies ran (they run before any later step's)."""
        host_ids = self._swapped.pop(request_id)
        if len(device_block_ids) < len(host_ids):
            raise ValueError(f"request {request_id!r}: {len(host_ids)} host blocks need as many device blocks, "
                             f"got {len(device_block_ids)}")
        self._free.extend(reversed(host_ids))
        self.num_swapped_in += len(host_ids)
        return KVBlockCopy(KVCopyDirection.SWAP_IN, list(device_block_ids[:len(host_ids)]), host_ids)

    def free(self, request_id: str) -> None:
        """Drop a request's host blocks (finished or aborted while swapped out)."""
        self._free.extend(reversed(self._swapped.pop(request_id, [])))
