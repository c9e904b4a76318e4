"""The router's bookkeeping: per caller stream (RequestStream), per instance (_Instance), and the state the
front end reads (RouterState)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from distinfer.engine.output_processor import RequestOutputKind
from distinfer.messages import EngineRequest, EngineStats, RequestOutput
from distinfer.router.instance import InstanceInfo
from distinfer.router.policies import InstanceView, RequestView
from distinfer.router.stats import InstanceLoad


@dataclass
class Delivered:
    """What the caller has received of one completion (all of it, whatever the output kind)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float | None = None


@dataclass
class RequestStream:
    """The router's state of one caller's stream. It stays with the router whichever instance runs the
    request: `delivered` holds, per completion index, everything the caller has received (what a failover
    resumes from)."""

    request: EngineRequest
    output_kind: RequestOutputKind
    instance_id: str
    dispatched_at: float  # time.monotonic()
    delivered: dict[int, Delivered] = field(default_factory=dict)
    finished: bool = False
    aborted: bool = False  # the caller asked to abort; the instance's final "abort" output ends it
    migrating: bool = False  # one migration at a time
    handed_off: bool = False  # prefill/decode: the hand-off to a decode instance was tried
    moved_to: Any = None  # the destination's output stream, read once the source's ends with RequestMovedError

    def record(self, output: RequestOutput) -> None:
        for completion in output.outputs:
            sent = self.delivered.setdefault(completion.index, Delivered())
            if self.output_kind != RequestOutputKind.DELTA:  # cumulative (and final-only): everything so far
                sent.token_ids, sent.text, sent.logprobs = [], "", []
            sent.token_ids += completion.token_ids
            sent.text += completion.text
            sent.logprobs += completion.logprobs or []
            sent.cumulative_logprob = completion.cumulative_logprob
        self.finished = output.finished

    @property
    def num_delivered_tokens(self) -> int:
        return sum(len(d.token_ids) for d in self.delivered.values())


@dataclass
class RouterState:
    """What the front end reads every few hundred ms: the summed stats and who is alive."""

    stats: EngineStats  # summed over the live instances' latest reports
    loads: list[InstanceLoad]  # latest report of each live instance
    dead: dict[str, str]  # instance id -> why it died
    draining: bool  # the router refuses new requests (drain(), or every live instance drains)
    num_streams: int
    dead_error: str | None  # set when no instance is left
    migrations: dict[str, int] = field(default_factory=dict)  # migrations by result status (all causes)
    num_failovers: int = 0  # requests resumed elsewhere after their instance died


@dataclass
class _Instance:
    """The router's view of one instance."""

    instance_id: str
    actor: Any
    role: str = "both"  # "prefill" / "decode" under prefill/decode disaggregation
    info: InstanceInfo | None = None
    load: InstanceLoad | None = None
    dead_reason: str | None = None
    stop_dispatch: bool = False  # drain_instance() was called
    moving: bool = False  # in a migration started by the migration policy (one at a time)
    streams: dict[str, RequestStream] = field(default_factory=dict)  # in flight through the router
    priorities: collections.Counter = field(default_factory=collections.Counter)
    unreported: list[tuple[float, int]] = field(default_factory=list)  # (dispatched at, prompt tokens)

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    @property
    def open(self) -> bool:
        return self.alive and not self.stop_dispatch and self.load is not None and not self.load.draining

    def add(self, stream: RequestStream) -> None:
        self.streams[stream.request.request_id] = stream
        self.priorities[stream.request.priority] += 1
        self.unreported.append((stream.dispatched_at, len(stream.request.prompt_token_ids)))

    def remove(self, stream: RequestStream) -> None:
        if self.streams.pop(stream.request.request_id, None) is not None:
            self.priorities[stream.request.priority] -= 1
            if not self.priorities[stream.request.priority]:
                del self.priorities[stream.request.priority]

    def set_load(self, load: InstanceLoad, asked_at: float) -> None:
        """A report asked for at `asked_at` covers the requests dispatched before then."""
        self.load = load
        self.unreported = [(t, n) for t, n in self.unreported if t >= asked_at]

    def view(self) -> InstanceView:
        assert self.load is not None
        movable = tuple(RequestView(s.request.request_id, len(s.request.prompt_token_ids) + s.num_delivered_tokens,
                                    s.num_delivered_tokens > 0)
                        for s in self.streams.values() if not (s.migrating or s.finished or s.aborted))
        return InstanceView(self.load, sum(n for _, n in self.unreported), len(self.unreported), dict(self.priorities),
                            movable)
