"""Dispatch policies: which live, non-draining instance a new request goes to.

Small classes in a name -> class registry (`make_dispatch_policy("least_load")`), as the scheduling
policies of engine/policies.py. A policy sees one `InstanceView` per candidate instance: its latest load
report plus what the router knows and the report cannot yet (requests dispatched to it since, and its
high-priority requests in flight). Policies are plain, deterministic objects: no Ray, no clocks.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from distinfer.router.stats import InstanceLoad

DEFAULT_DISPATCH_POLICY = "least_load"


@dataclass(frozen=True)
class DispatchRequest:
    """What a policy knows of the request it places."""

    num_prompt_tokens: int
    priority: int = 0  # lower is more important (vLLM semantics)


@dataclass(frozen=True)
class RequestView:
    """A request in flight on an instance that a migration policy may move."""

    request_id: str
    num_tokens: int  # prompt + tokens streamed so far: about the KV a move copies
    started: bool  # it has streamed a token (so it runs, or was preempted after running)


@dataclass(frozen=True)
class InstanceView:
    """A candidate instance as the router sees it now."""

    load: InstanceLoad
    unreported_tokens: int = 0  # prompt tokens dispatched to it after its latest report was taken
    unreported_requests: int = 0
    # its requests in flight through the router, by priority: priority -> how many
    in_flight_by_priority: Mapping[int, int] = field(default_factory=dict)
    movable: tuple[RequestView, ...] = ()  # its requests not already moving, finished or aborted

    @property
    def instance_id(self) -> str:
        return self.load.instance_id

    def blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / max(1, self.load.block_size))

    @property
    def room(self) -> int:
        """Free device blocks not already spoken for by its queue or by requests dispatched since its report."""
        return self.load.num_free_blocks - self.blocks(self.load.num_queued_tokens + self.unreported_tokens)


class DispatchPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def pick(self, views: Sequence[InstanceView], request: DispatchRequest) -> str:
        """The id of the instance (one of `views`, never empty) that takes `request`."""


class LeastLoadPolicy(DispatchPolicy):
    """The lowest *virtual usage* (Llumnix): the fraction of an instance's device blocks that are used or
    already spoken for,

        (used blocks + ceil(queued tokens / block size) + headroom x total blocks x high-priority requests)
        / total blocks

    where queued tokens are those its waiting requests still have to compute, plus the prompt tokens the
    router dispatched to it since its last report (so a burst between two reports still spreads).

    Headroom for high priority: every request in flight on an instance whose priority is below
    `high_priority_below` (default 0, the default priority: so any negative priority) adds `headroom`
    (a fraction of the instance's blocks, default 0.1) to that instance's virtual usage. New requests of
    any priority then prefer other instances while it runs, which leaves the high-priority request room to
    grow without being preempted. Ties go to the instance with fewer requests, then to the earlier one
    in the router's order.
    """

    name = "least_load"

    def __init__(self, headroom: float = 0.1, high_priority_below: int = 0) -> None:
        if not 0.0 <= headroom <= 1.0:
            raise ValueError(f"headroom must be in [0, 1], got {headroom}")
        self.headroom = headroom
        self.high_priority_below = high_priority_below

    def is_high_priority(self, priority: int) -> bool:
        return priority < self.high_priority_below

    def num_high_priority(self, view: InstanceView) -> int:
        return sum(n for priority, n in view.in_flight_by_priority.items() if self.is_high_priority(priority))

    def virtual_usage(self, view: InstanceView) -> float:
        load = view.load
        total = max(1, load.num_total_blocks)
        demand = math.ceil((load.num_queued_tokens + view.unreported_tokens) / max(1, load.block_size))
        reserved = self.headroom * total * self.num_high_priority(view)
        return (load.num_used_blocks + demand + reserved) / total

    def pick(self, views: Sequence[InstanceView], request: DispatchRequest) -> str:
        if not views:
            raise ValueError("no instance to dispatch to")
        order = {view.instance_id: i for i, view in enumerate(views)}

        def key(view: InstanceView) -> tuple[float, int, int]:
            load = view.load
            requests = load.num_running + load.num_waiting + view.unreported_requests
            return self.virtual_usage(view), requests, order[view.instance_id]

        return min(views, key=key).instance_id


class RoundRobinPolicy(DispatchPolicy):
    """Each request to the next instance after the previous pick, in the router's order, ignoring load
    (the baseline load-aware dispatch is compared against). An instance that left the candidates is
    skipped; when the previous pick itself left, it starts again from the first."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, views: Sequence[InstanceView], request: DispatchRequest) -> str:
        if not views:
            raise ValueError("no instance to dispatch to")
        ids = [view.instance_id for view in views]
        index = (ids.index(self._last) + 1) % len(ids) if self._last in ids else 0
        self._last = ids[index]
        return self._last


_REGISTRY: dict[str, type[DispatchPolicy]] = {}


def register_dispatch_policy(cls: type[DispatchPolicy]) -> type[DispatchPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def dispatch_policy_names() -> list[str]:
    return sorted(_REGISTRY)


def check_dispatch_policy(name: str) -> str:
    """`name` when it is a known policy, else ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dispatch policy {name!r}; known: {', '.join(dispatch_policy_names())}")
    return name


def make_dispatch_policy(name: str, **kwargs: Any) -> DispatchPolicy:
    return _REGISTRY[check_dispatch_policy(name)](**kwargs)


register_dispatch_policy(LeastLoadPolicy)
register_dispatch_policy(RoundRobinPolicy)


def check_pd_split(prefill: int, decode: int, num_instances: int | None = None) -> int:
    """Prefill/decode disaggregation's instance counts (0 and 0: off); returns P + D. With `num_instances`,
    P + D must make up all of them."""
    for name, value in (("prefill_instances", prefill), ("decode_instances", decode)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    total = prefill + decode
    if total and (prefill < 1 or decode < 1 or (num_instances is not None and total != num_instances)):
        of = f" making up all {num_instances} instances" if num_instances is not None else ""
        raise ValueError(f"prefill/decode disaggregation needs >= 1 prefill and >= 1 decode instance{of}; "
                         f"got {prefill} prefill + {decode} decode")
    return total
