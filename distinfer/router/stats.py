"""Load reports of engine instances, and the sum of their counters for the whole service.

An `InstanceLoad` is one instance's state at one moment, made from its `EngineStats`; the router keeps
the latest one per instance (see router.py for how often it asks). Everything here is plain data: no
Ray, no torch, so policies are tested with hand-built loads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

from distinfer.messages import EngineStats


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load at `reported_at` (time.time() on the instance)."""

    instance_id: str
    num_free_blocks: int  # device blocks allocatable now (never used + evictable prefix-cache blocks)
    num_total_blocks: int
    num_free_host_blocks: int  # host KV tier (0 and 0 without one)
    num_total_host_blocks: int
    num_running: int
    num_waiting: int
    num_queued_tokens: int  # tokens the waiting requests still have to compute
    num_preemptions: int  # since start
    block_size: int
    reported_at: float
    draining: bool = False  # the instance refuses new requests
    head_waiting_id: str | None = None  # the first request of its waiting queue (None: nothing waits)
    head_waiting_blocks: int = 0  # device blocks that request's tokens need
    stats: EngineStats | None = field(default=None, compare=False, repr=False)  # the whole report (for sums)

    @classmethod
    def from_stats(cls, instance_id: str, stats: EngineStats, block_size: int, draining: bool = False,
                   reported_at: float | None = None, head_of_queue: tuple[str, int] | None = None) -> "InstanceLoad":
        head_id, head_blocks = head_of_queue or (None, 0)
        return cls(instance_id, stats.num_free_blocks, stats.num_total_blocks, stats.num_free_host_blocks,
                   stats.num_host_blocks, stats.num_running, stats.num_waiting, stats.num_queued_tokens,
                   stats.num_preemptions, block_size, time.time() if reported_at is None else reported_at,
                   draining, head_id, head_blocks, stats)

    @property
    def head_is_blocked(self) -> bool:
        """The first waiting request cannot get its blocks here now (FCFS: every request behind it waits too)."""
        return self.head_waiting_blocks > self.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks


# Fields of EngineStats that are not counts to add up; they are recomputed from the sums.
_RATIOS = {"kv_cache_usage", "host_kv_cache_usage"}


def sum_stats(all_stats: list[EngineStats]) -> EngineStats:
    """The service's stats: every count summed over the instances; usage fractions recomputed from the
    summed blocks (used / total over all instances). No instance: every count 0."""
    totals = {f.name: sum(getattr(s, f.name) for s in all_stats) for f in fields(EngineStats) if f.name not in _RATIOS}
    device, host = totals["num_total_blocks"], totals["num_host_blocks"]
    totals["kv_cache_usage"] = 1.0 - totals["num_free_blocks"] / device if device else 0.0
    totals["host_kv_cache_usage"] = 1.0 - totals["num_free_host_blocks"] / host if host else 0.0
    return EngineStats(**totals)
