"""Scheduling policies: waiting-queue order, preemption victim, priority preemption.

Small ABCs with a name -> class registry, selected by SchedulerConfig.policy.
"""
from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from distinfer.config import PreemptionMode, SchedulingPolicy
from distinfer.engine.request import Request


class SchedulingPolicyBase(ABC):
    """Orders requests: a smaller `key` is served first and preempted last."""

    name: ClassVar[str]

    @abstractmethod
    def key(self, request: Request) -> tuple:
        """Sort key: smaller runs first."""

    @abstractmethod
    def add_waiting(self, waiting: list[Request], request: Request, front: bool = False) -> None:
        """Insert `request` into `waiting` (kept in service order); `front` for preempted ones."""

    def pick_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt first: the largest key; ties go to the latest scheduled."""
        if not running:
            raise ValueError("no running request to preempt")
        victim = running[-1]
        for request in reversed(running):
            if self.key(request) > self.key(victim):
                victim = request
        return victim

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        """Whether a waiting request may evict a running one to get in. Default: never."""
        return False


class FCFSPolicy(SchedulingPolicyBase):
    """First come, first served; preempts the latest arrival."""

    name = SchedulingPolicy.FCFS.value

    def key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def add_waiting(self, waiting: list[Request], request: Request, front: bool = False) -> None:
        if front:
            waiting.insert(0, request)
        else:
            waiting.append(request)


class PriorityPolicy(SchedulingPolicyBase):
    """Lower `priority` value first, then arrival; a waiting request may preempt a running
    request of strictly lower priority (larger value)."""

    name = SchedulingPolicy.PRIORITY.value

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)

    def add_waiting(self, waiting: list[Request], request: Request, front: bool = False) -> None:
        insort = bisect.insort_left if front else bisect.insort_right
        insort(waiting, request, key=self.key)

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return running.priority > waiting.priority


_REGISTRY: dict[str, type[SchedulingPolicyBase]] = {}


def register_policy(cls: type[SchedulingPolicyBase]) -> type[SchedulingPolicyBase]:
    _REGISTRY[cls.name] = cls
    return cls


def make_policy(name: SchedulingPolicy | str) -> SchedulingPolicyBase:
    key = name.value if isinstance(name, SchedulingPolicy) else str(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown scheduling policy {key!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[key]()


register_policy(FCFSPolicy)
register_policy(PriorityPolicy)


class PreemptionPolicy(ABC):
    """How a preempted request gives back its device blocks: swapped out to the host tier (progress
    kept; the KV manager falls back to recompute when the tier has no room) or freed (its tokens
    computed again when it resumes)."""

    name: ClassVar[str]

    @abstractmethod
    def swaps(self) -> bool:
        """Whether to try swapping the victim out first."""


class RecomputePreemption(PreemptionPolicy):
    name = PreemptionMode.RECOMPUTE.value

    def swaps(self) -> bool:
        return False


class SwapPreemption(PreemptionPolicy):
    name = PreemptionMode.SWAP.value

    def swaps(self) -> bool:
        return True


def make_preemption_policy(mode: PreemptionMode | str, has_host_tier: bool) -> PreemptionPolicy:
    mode = PreemptionMode(mode)
    if mode == PreemptionMode.AUTO:
        mode = PreemptionMode.SWAP if has_host_tier else PreemptionMode.RECOMPUTE
    if mode == PreemptionMode.SWAP and not has_host_tier:
        raise ValueError("preemption_mode='swap' needs a host KV tier: set kv_offloading_size > 0")
    return SwapPreemption() if mode == PreemptionMode.SWAP else RecomputePreemption()
