"""Migration triggers: which requests the router moves on its own, between two load reports. Small classes
in a name -> class registry (`make_migration_policy("balance")`), like the dispatch policies. A policy sees
every open instance of one pool (instances that take the same kind of work) through `InstanceView`s (the
latest load report, the dispatch policy's `virtual_usage`, and the requests in flight there) and returns
moves, each naming the request to move; the router runs at most one policy move per instance at a time.

- "none": only drain, the prefill/decode hand-off and explicit migrate() calls move requests.
- "balance": from the instance with the highest virtual usage to the one with the lowest, while the gap is
  at least `gap`: the largest request whose move leaves the source at least as loaded as the destination,
  so no request bounces back and forth (Llumnix's load balancing).
- "defrag": an instance whose first waiting request cannot get its blocks (FCFS: everything behind it waits
  too) either hands that request to an instance where it starts now (no KV to copy), or moves out the
  smallest running request whose blocks make room for it (Llumnix's de-fragmentation).
Drain is not a trigger here: drain_instance moves every request of the instance at once.
"""
from __future__ import annotations

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
    request_id: str


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
        gap = self.usage(high) - self.usage(low)
        if gap < self.gap:
            return []
        # moving b blocks changes the gap by b/total_high + b/total_low: at most the whole gap (no bounce)
        limit = gap / (1 / max(1, high.load.num_total_blocks) + 1 / max(1, low.load.num_total_blocks))
        fitting = [r for r in high.movable if high.blocks(r.num_tokens) <= min(limit, low.room)]
        if not fitting:
            return []
        request = max(fitting, key=lambda r: r.num_tokens)
        return [Move(high.instance_id, low.instance_id, request.request_id)]


class DefragPolicy(MigrationPolicy):
    name = "defrag"

    def plan(self, views: Sequence[InstanceView]) -> list[Move]:
        moves: list[Move] = []
        busy: set[str] = set()
        for view in sorted(views, key=self.usage, reverse=True):
            if view.instance_id in busy or not view.load.head_is_blocked:
                continue
            others = [v for v in views if v.instance_id not in busy and v.instance_id != view.instance_id
                      and not v.load.num_waiting]
            move = self._unblock(view, others)
            if move is not None:
                moves.append(move)
                busy.update((move.source, move.destination))
        return moves

    @staticmethod
    def _unblock(blocked: InstanceView, others: list[InstanceView]) -> Move | None:
        need = blocked.load.head_waiting_blocks
        head = next((r for r in blocked.movable if r.request_id == blocked.load.head_waiting_id), None)
        roomy = [v for v in others if v.room >= need]
        if head is not None and roomy:  # the blocked request itself, where it starts at once
            return Move(blocked.instance_id, max(roomy, key=lambda v: v.room).instance_id, head.request_id)
        short = need - blocked.load.num_free_blocks
        running = sorted((r for r in blocked.movable if r.started and r is not head), key=lambda r: r.num_tokens)
        for request in running:
            blocks = blocked.blocks(request.num_tokens)
            roomy = [v for v in others if v.room > blocks]  # > : room for it to grow a little
            if blocks >= short and roomy:
                return Move(blocked.instance_id, max(roomy, key=lambda v: v.room).instance_id, request.request_id)
        return None


_REGISTRY: dict[str, type[MigrationPolicy]] = {cls.name: cls for cls in (NoMigration, BalancePolicy, DefragPolicy)}


def migration_policy_names() -> list[str]:
    return sorted(_REGISTRY)


def check_migration_policy(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown migration policy {name!r}; known: {', '.join(migration_policy_names())}")


def make_migration_policy(name: str) -> MigrationPolicy:
    check_migration_policy(name)
    return _REGISTRY[name]()
