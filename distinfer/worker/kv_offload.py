"""The host (CPU DRAM) tier of the KV cache on one rank, and the block copies between it and the device cache.

The host cache mirrors this rank's device cache layer by layer, in the same layout
([num_host_blocks, block_size, 2, Hkv, D], model dtype), so a block moves as one contiguous slab per layer.
The scheduler names the copies (`SchedulerOutput.kv_ops`); every rank runs them on its own layers/heads.

On CUDA the copies run on a side stream, from/to pinned host memory, without blocking this thread:
- the side stream first waits for the compute stream: a swap-out reads blocks earlier forwards wrote, and a
  swap-in overwrites blocks earlier forwards may still read;
- the compute stream then waits for the side stream: the next forward reads swapped-in blocks, and may
  write into blocks just swapped out;
- host memory is only ever touched by copies on that one side stream, so a swap-out's host data is
  complete before any later swap-in reads it.
Because the CPU cannot scatter into host memory asynchronously, the CUDA path gathers/scatters the device
blocks with one index_select/index_copy_ per layer and moves runs of consecutive host ids as single DMAs
(pairs are sorted by host id first, so a contiguous set of host blocks is one copy per layer).
On CPU the copies are plain synchronous index_select + index_copy_.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import torch

from distinfer.messages import KVBlockCopy, KVCopyDirection

logger = logging.getLogger(__name__)


def check_host_memory(nbytes: int) -> None:
    """Refuse a host tier this node cannot hold (instead of being killed for memory while filling it)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not reported on this platform: trust the setting
        return
    if nbytes > available:
        raise ValueError(f"kv_offloading_size asks {nbytes / (1 << 30):.2f} GiB of host memory on this rank but "
                         f"only {available / (1 << 30):.2f} GiB are available on its node; lower it")


class HostKVCache:
    """Per-layer host tensors shaped like the device cache's layers, except for the number of blocks."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        self.caches = caches
        self.num_blocks = caches[0].shape[0] if caches else 0
        self._stream: torch.cuda.Stream | None = None  # the side stream, made on the first CUDA run

    @classmethod
    def like(cls, kv_caches: Sequence[torch.Tensor], num_host_blocks: int, pin: bool) -> "HostKVCache":
        """Zero-filled host tensors with `num_host_blocks` blocks per layer (page-locked when `pin`)."""
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        caches = [torch.zeros((num_host_blocks, *c.shape[1:]), dtype=c.dtype, device="cpu", pin_memory=pin)
                  for c in kv_caches]
        host = cls(caches)
        logger.info("host KV cache: %d blocks (%.2f GiB%s)", num_host_blocks,
                    num_host_blocks * host.bytes_per_block / (1 << 30), ", pinned" if pin else "")
        return host

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all of this rank's layers."""
        return sum(math.prod(c.shape[1:]) * c.element_size() for c in self.caches)

    def run(self, ops: Sequence[KVBlockCopy], device_caches: Sequence[torch.Tensor]) -> None:
        """Run the copies in order. All ops are validated before any copy starts."""
        if not ops:
            return
        self._check_layout(device_caches)
        num_device_blocks = device_caches[0].shape[0] if device_caches else 0
        for i, op in enumerate(ops):
            validate_op(op, num_device_blocks, self.num_blocks, f"kv_ops[{i}]")
        if not device_caches:
            return
        device = device_caches[0].device
        if device.type != "cuda":
            for op in ops:
                copy_blocks_indexed(op, self.caches, device_caches)
            return
        compute = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(compute)  # blocks written / still read by earlier forwards
        try:
            with torch.cuda.stream(self._stream):
                for op in ops:
                    copy_blocks_staged(op, self.caches, device_caches)
        finally:
            compute.wait_stream(self._stream)  # an event after the copies: the next forward follows them

    def _check_layout(self, device_caches: Sequence[torch.Tensor]) -> None:
        if len(device_caches) != len(self.caches):
            raise ValueError(f"{len(device_caches)} device cache layers but the host cache has {len(self.caches)}")
        for layer, (host, dev) in enumerate(zip(self.caches, device_caches)):
            if host.shape[1:] != dev.shape[1:] or host.dtype != dev.dtype:
                raise ValueError(f"layer {layer}: device blocks {tuple(dev.shape[1:])} {dev.dtype} do not match "
                                 f"host blocks {tuple(host.shape[1:])} {host.dtype}")


def validate_op(op: KVBlockCopy, num_device_blocks: int, num_host_blocks: int, name: str = "kv op") -> None:
    """Raise ValueError unless `op` pairs equally many in-range block ids with distinct destinations."""
    try:
        direction = KVCopyDirection(op.direction)
    except ValueError:
        raise ValueError(f"{name}: unknown direction {op.direction!r}") from None
    if len(op.device_block_ids) != len(op.host_block_ids):
        raise ValueError(f"{name}: {len(op.device_block_ids)} device block ids but "
                         f"{len(op.host_block_ids)} host block ids")
    for kind, ids, limit in (("device", op.device_block_ids, num_device_blocks),
                             ("host", op.host_block_ids, num_host_blocks)):
        bad = [b for b in ids if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < limit]
        if bad:
            raise ValueError(f"{name}: {kind} block id {bad[0]!r} is not in [0, {limit})")
    destinations = op.host_block_ids if direction is KVCopyDirection.SWAP_OUT else op.device_block_ids
    if len(set(destinations)) != len(destinations):
        kind = "host" if direction is KVCopyDirection.SWAP_OUT else "device"
        raise ValueError(f"{name} ({direction.value}): a destination {kind} block id appears twice")


def copy_blocks_indexed(op: KVBlockCopy, host_caches: Sequence[torch.Tensor],
                        device_caches: Sequence[torch.Tensor]) -> None:
    """One index_select + index_copy_ per layer: the CPU path (synchronous)."""
    if not op.device_block_ids:
        return
    device_idx = torch.tensor(op.device_block_ids, dtype=torch.long, device=device_caches[0].device)
    host_idx = torch.tensor(op.host_block_ids, dtype=torch.long)
    for host, dev in zip(host_caches, device_caches):
        if KVCopyDirection(op.direction) is KVCopyDirection.SWAP_OUT:
            host.index_copy_(0, host_idx, dev.index_select(0, device_idx).to(host.device))
        else:
            dev.index_copy_(0, device_idx, host.index_select(0, host_idx).to(dev.device))


def copy_blocks_staged(op: KVBlockCopy, host_caches: Sequence[torch.Tensor],
                       device_caches: Sequence[torch.Tensor]) -> None:
    """Per layer: the device blocks gathered into (or scattered from) one contiguous staging tensor, and each
    run of consecutive host ids moved as one non-blocking copy. Runs on the current stream; works on any device."""
    if not op.device_block_ids:
        return
    order = sorted(range(len(op.host_block_ids)), key=op.host_block_ids.__getitem__)
    host_ids = [op.host_block_ids[i] for i in order]
    device = device_caches[0].device
    device_idx = torch.tensor([op.device_block_ids[i] for i in order], dtype=torch.long, device=device)
    runs = host_runs(host_ids)
    swap_out = KVCopyDirection(op.direction) is KVCopyDirection.SWAP_OUT
    for host, dev in zip(host_caches, device_caches):
        if swap_out:
            staged = dev.index_select(0, device_idx)
            for pos, first, count in runs:
                host[first:first + count].copy_(staged[pos:pos + count], non_blocking=True)
        else:
            staged = torch.empty((len(host_ids), *dev.shape[1:]), dtype=dev.dtype, device=device)
            for pos, first, count in runs:
                staged[pos:pos + count].copy_(host[first:first + count], non_blocking=True)
            dev.index_copy_(0, device_idx, staged)


def host_runs(sorted_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in the list, first id, length) of each run of consecutive ids in an ascending list."""
    runs: list[tuple[int, int, int]] = []
    for pos, block in enumerate(sorted_ids):
        if runs and block == runs[-1][1] + runs[-1][2]:
            start, first, count = runs[-1]
            runs[-1] = (start, first, count + 1)
        else:
            runs.append((pos, block, 1))
    return runs
