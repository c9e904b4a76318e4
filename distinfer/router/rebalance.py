"""Migration triggers: which requests the router moves on its own, between two load reports. Small classes
in a name -> class registry (`make_migration_policy("balance")`), like the dispatch policies. A policy sees
every open instance of one pool (instances that take the same kind of work) through the dispatch policy's
`virtual_usage` and returns moves; the router picks which request of the source moves (the one with the
least KV to copy) and runs at most one migration per instance at a time.

- "none": only drain, the prefill/decode hand-off and explicit migrate() calls move requests.
- "balance": from the instance with the highest virtual usage to the one with the lowest, one request per
  check, while the gap is at least `gap` (Llumnix's load balancing).
- "defrag": an instance whose queued requests do not fit its free blocks moves one running request to an
  instance with room, so the queued ones can start (Llumnix's de-fragmentation).
Drain is not a trigger here: drain_instance moves every request of the instance at once.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from distinfer.router.policies import InstanceView, LeastLoadPolicy

DEFAULT_MIGRATION_POLICY = "none"
MIGRATION_TRANSPORTS = ("object_store", "p2p")  # how KV travels between instances (router/migration.py)


def check_migration_transport(name: str) -> None:
    if name not in MIGRATION_TRANSPORTS:
        raise ValueError(f"unknown migration transport {name!r}; known: {', '.join(MIGRATION_TRANSPORTS)}")


@dataclass(frozen=True)
class Move:
    source: str
    destination: str


class MigrationPolicy(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.usage = LeastLoadPolicy(headroom=0.0).virtual_usage

    @abstractmethod
    def plan(self, views: Sequence[InstanceView]) -> list[Move]:
        """Moves to start now among these instances (each instance in at most one move)."""


class NoMigration(MigrationPolicy):
    name = "none"

    def plan(self, views: Sequence[InstanceView]) -> list[Move]:
        return []


class BalancePolicy(MigrationPolicy):
    name = "balance"

    def __init__(self, gap: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < gap <= 2.0:
            raise ValueError(f"gap must be in (0, 2], got {gap}")
        self.gap = gap

    def plan(self, views: Sequence[InstanceView]) -> list[Move]:
        if len(views) < 2:
            return []
        ranked = sorted(views, key=self.usage)
        low, high = ranked[0], ranked[-1]
        if self.usage(high) - self.usage(low) < self.gap or high.load.num_running + high.load.num_waiting < 2:
            return []
        return [Move(high.instance_id, low.instance_id)]


class DefragPolicy(MigrationPolicy):
    name = "defrag"

    def plan(self, views: Sequence[InstanceView]) -> list[Move]:
        moves: list[Move] = []
        busy: set[str] = set()
        for view in sorted(views, key=self.usage, reverse=True):
            load = view.load
            needed = math.ceil(load.num_queued_tokens / max(1, load.block_size))
            if view.instance_id in busy or not load.num_waiting or needed <= load.num_free_blocks or not load.num_running:
                continue
            roomy = [v for v in views if v.instance_id not in busy and v.instance_id != view.instance_id
                     and v.load.num_free_blocks >= needed and not v.load.num_waiting]
            if roomy:
                target = max(roomy, key=lambda v: v.load.num_free_blocks)
                moves.append(Move(view.instance_id, target.instance_id))
                busy.update((view.instance_id, target.instance_id))
        return moves


_REGISTRY: dict[str, type[MigrationPolicy]] = {cls.name: cls for cls in (NoMigration, BalancePolicy, DefragPolicy)}


def migration_policy_names() -> list[str]:
    return sorted(_REGISTRY)


def check_migration_policy(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown migration policy {name!r}; known: {', '.join(migration_policy_names())}")


def make_migration_policy(name: str) -> MigrationPolicy:
    check_migration_policy(name)
    return _REGISTRY[name]()
