"""Router: a Ray actor that makes N engine instances behave as one service.

It starts N `EngineInstance` actors with the same engine arguments, keeps a recent view of their load,
places each new request on one of them with a dispatch policy, and relays the instance's output stream
to the caller. The caller's stream belongs to the router, not to the instance: `RequestStream` keeps,
per request, which instance runs it and every token the caller has already received, so that a request
can later move to another instance while its caller's stream continues.

Load reports: the router asks every live instance for its `InstanceLoad` every `load_interval_s`
(default 0.1 s; one small actor call per instance, answered from the scheduler's counters between two
steps, so at most one step late). A report covers every request dispatched to the instance before it
was asked for (Ray delivers one caller's calls to an actor in order, and the engine takes queued
requests before the report); the requests dispatched after that are added by the router
(`InstanceView.unreported_*`), so a burst between two reports still spreads.

Failures: an instance whose actor dies, or whose engine reports itself dead, leaves dispatch at once;
its requests in flight end with EngineDeadError naming the instance (failover is not built yet); the
other instances go on. Only when no instance is left is the whole router dead (new requests then get
EngineDeadError). A full service refuses with QueueFullError, a draining one with EngineDrainingError.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from distinfer.engine.output_processor import RequestOutputKind
from distinfer.errors import EngineDeadError, EngineDrainingError, QueueFullError, RequestMovedError
from distinfer.messages import EngineRequest, RequestOutput
from distinfer.router.instance import EngineInstance, InstanceInfo, remote_error
from distinfer.router.migration import MigrationConfig
from distinfer.router.policies import (
    DEFAULT_DISPATCH_POLICY,
    DispatchRequest,
    check_dispatch_policy,
    check_pd_split,
    make_dispatch_policy,
)
from distinfer.router.moves import RequestMoves
from distinfer.router.rebalance import DEFAULT_MIGRATION_POLICY, check_migration_policy, make_migration_policy
from distinfer.router.state import RequestStream, RouterState, _Instance
from distinfer.router.stats import sum_stats

logger = logging.getLogger(__name__)


START_TIMEOUT_S = 600.0  # loading a model on every instance
SHUTDOWN_TIMEOUT_S = 30.0
_CONTROL_CONCURRENCY = 64  # actor calls besides the streams: reports, aborts, state


def instance_roles(config: RouterConfig) -> list[tuple[str, str]]:
    """(instance id, role) of every instance."""
    if not config.prefill_instances:
        return [(f"instance-{i}", "both") for i in range(config.num_instances)]
    return ([(f"prefill-{i}", "prefill") for i in range(config.prefill_instances)]
            + [(f"decode-{i}", "decode") for i in range(config.decode_instances)])


@dataclass
class RouterConfig:
    """How many instances, and how the router places requests on them."""

    num_instances: int = 2
    dispatch_policy: str = DEFAULT_DISPATCH_POLICY
    load_interval_s: float = 0.1  # how often every instance is asked for its load
    load_timeout_s: float = 10.0  # a report that takes longer is skipped (the previous one stays)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    # Prefill/decode disaggregation: that many of the instances take new requests (prompt and first
    # token), the others decode; 0 and 0: every instance does both.
    prefill_instances: int = 0
    decode_instances: int = 0
    migration_policy: str = DEFAULT_MIGRATION_POLICY  # moves the router starts on its own (router/rebalance.py)

    def __post_init__(self) -> None:
        if isinstance(self.num_instances, bool) or not isinstance(self.num_instances, int) or self.num_instances < 1:
            raise ValueError(f"num_instances must be an integer >= 1, got {self.num_instances!r}")
        check_pd_split(self.prefill_instances, self.decode_instances, self.num_instances)
        check_migration_policy(self.migration_policy)
        check_dispatch_policy(self.dispatch_policy)
        if not 0.0 < self.load_interval_s <= 60.0:
            raise ValueError(f"load_interval_s must be in (0, 60], got {self.load_interval_s}")
        if not self.load_timeout_s > 0:
            raise ValueError(f"load_timeout_s must be > 0, got {self.load_timeout_s}")


def _death(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = [line for line in lines if line.startswith("The actor is dead because")]
    return f"{type(exc).__name__}: {(why or lines or [''])[0]}"


class Router(RequestMoves):
    """The actor body: `ray.remote(Router).options(...).remote(model, engine_kwargs, config, instance_options)`,
    then `start()` once before any request."""

    def __init__(self, model: str | None, engine_kwargs: dict[str, Any], config: RouterConfig,
                 instance_options: dict[str, Any] | None = None) -> None:
        logging.getLogger("distinfer").setLevel(logging.INFO)
        self.config = config
        self.policy = make_dispatch_policy(config.dispatch_policy)
        self.migration_policy = make_migration_policy(config.migration_policy)
        self.migrations: collections.Counter = collections.Counter()  # results by status (all causes)
        self._links: dict[tuple[str, str], str | None] = {}  # "p2p" KV links by (source, destination)
        self._link_locks: dict[str, asyncio.Lock] = {}
        self._link_open_lock = asyncio.Lock()
        self.streams: dict[str, RequestStream] = {}
        self.num_failovers = 0  # requests resumed on another instance after theirs died
        self._draining = False
        self._stopped = False
        self._reporter: asyncio.Task | None = None
        concurrency = int(engine_kwargs.get("max_waiting_requests", 4096)) + _CONTROL_CONCURRENCY
        options = dict(instance_options or {}, max_concurrency=concurrency)
        actor_cls = ray.remote(EngineInstance)
        self.instances: dict[str, _Instance] = {}
        for instance_id, role in instance_roles(config):
            actor = actor_cls.options(**options).remote(instance_id, model, engine_kwargs)
            self.instances[instance_id] = _Instance(instance_id, actor, role)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> InstanceInfo:
        """Wait until every instance has loaded the model; start the load reports. Any instance failing to
        start fails the router (the caller then kills it, which ends the instances too)."""
        instances = list(self.instances.values())
        infos = await asyncio.wait_for(asyncio.gather(*(i.actor.info.remote() for i in instances),
                                                      return_exceptions=True), START_TIMEOUT_S)
        for instance, info in zip(instances, infos):
            if isinstance(info, BaseException):
                raise remote_error(info) if isinstance(info, RayTaskError) else info
            instance.info = info
        await self._report_all()
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())
        logger.info("router ready: %d instances, %s dispatch", len(instances), self.config.dispatch_policy)
        return instances[0].info  # type: ignore[return-value]

    async def shutdown(self) -> None:
        """Stop every instance (its engine and workers), then end the actors."""
        self._stopped = self._draining = True
        if self._reporter is not None:
            self._reporter.cancel()
        instances = list(self.instances.values())
        stops = [asyncio.ensure_future(self._stop_instance(i)) for i in instances]
        await asyncio.wait(stops, timeout=SHUTDOWN_TIMEOUT_S)
        for instance in instances:
            ray.kill(instance.actor)

    async def _stop_instance(self, instance: _Instance) -> None:
        try:
            await instance.actor.shutdown.remote()
        except Exception as exc:  # already dead: nothing to stop
            logger.debug("shutting down %s: %s", instance.instance_id, exc)

    # ------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest,
                       output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> AsyncIterator[RequestOutput]:
        """Place the request and relay its outputs (called with num_returns="streaming"). Refusals raise
        before the first output, with the errors AsyncLLM raises."""
        stream = self._admit(request, output_kind)
        try:
            async for output in self._relay(stream):
                yield output
        finally:
            self._release(stream)

    def _admit(self, request: EngineRequest, output_kind: RequestOutputKind) -> RequestStream:
        if self._stopped or self._draining:
            raise EngineDrainingError("engine is draining or shut down: not accepting new requests")
        if not any(i.alive for i in self.instances.values()):
            raise EngineDeadError(self._dead_message())
        if request.request_id in self.streams:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        instance = self._choose(request)
        stream = RequestStream(request, output_kind, instance.instance_id, time.monotonic())
        self.streams[request.request_id] = stream
        instance.add(stream)
        return stream

    def _choose(self, request: EngineRequest) -> _Instance:
        candidates = [i for i in self.instances.values() if i.open and i.role != "decode"]
        if not candidates:
            raise EngineDrainingError("every engine instance is draining: not accepting new requests")
        candidates = [i for i in candidates if len(i.streams) < i.info.max_pending_requests]  # type: ignore[union-attr]
        if not candidates:
            raise QueueFullError("too many requests in flight on every engine instance; retry later")
        chosen = self.policy.pick([i.view() for i in candidates],
                                  DispatchRequest(len(request.prompt_token_ids), request.priority))
        return self.instances[chosen]

    async def _relay(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """The current instance's outputs; when it ends with RequestMovedError (a migration committed), the
        destination's, which start where the source's stopped."""
        instance = self.instances[stream.instance_id]
        source = instance.actor.generate.options(num_returns="streaming").remote(stream.request, stream.output_kind)
        while True:
            try:
                async for ref in source:
                    output = await ref
                    stream.record(output)
                    yield output
                    if output.finished:
                        return
                    if instance.role == "prefill" and not stream.handed_off and stream.num_delivered_tokens:
                        stream.handed_off = True
                        asyncio.ensure_future(self._hand_off(stream))
            except RayTaskError as exc:  # the instance refused or failed the request (or its engine died)
                cause = remote_error(exc)
                if isinstance(cause, RequestMovedError) and stream.moved_to is not None:
                    source, stream.moved_to = stream.moved_to, None
                    instance = self.instances[stream.instance_id]
                    continue
                raise cause from None
            except RayActorError as exc:
                self._mark_dead(instance, _death(exc))
                source = await self._fail_over(stream, instance)
                instance = self.instances[stream.instance_id]
                continue
            raise EngineDeadError(f"engine instance {instance.instance_id} ended request "
                                  f"{stream.request.request_id} without a final output")

    # ------------------------------------------------------------ migration

    def _release(self, stream: RequestStream) -> None:
        """The caller's stream ended (finished, failed, or the caller went away)."""
        request_id = stream.request.request_id
        if self.streams.get(request_id) is stream:
            del self.streams[request_id]
        instance = self.instances[stream.instance_id]
        instance.remove(stream)
        if not stream.finished and instance.alive:  # the instance frees the request's blocks
            instance.actor.abort.remote([request_id])

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests in flight (unknown ids are ignored): each stream ends with a final "abort"
        output from its instance, which frees the request's KV blocks."""
        by_instance: dict[str, list[str]] = collections.defaultdict(list)
        for request_id in request_ids:
            stream = self.streams.get(request_id)
            if stream is not None and not stream.finished:
                stream.aborted = True
                by_instance[stream.instance_id].append(request_id)
        for instance_id, ids in by_instance.items():
            instance = self.instances[instance_id]
            if instance.alive:
                instance.actor.abort.remote(ids)

    async def drain(self, timeout_s: float = 30.0) -> int:
        """Refuse new requests and wait (up to timeout_s) for those in flight; returns how many are left."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.streams)

    # ------------------------------------------------------------ load reports

    async def _report_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.config.load_interval_s)
            try:
                await self._report_all()
                self._rebalance()
            except Exception:  # a report must never stop the loop
                logger.exception("load reports failed")

    async def _report_all(self) -> None:
        await asyncio.gather(*(self._report(i) for i in self.instances.values() if i.alive))

    async def _report(self, instance: _Instance) -> None:
        asked_at = time.monotonic()
        try:
            load = await asyncio.wait_for(instance.actor.load.remote(), self.config.load_timeout_s)
        except RayActorError as exc:
            self._mark_dead(instance, _death(exc))
        except RayTaskError as exc:
            cause = remote_error(exc)
            if isinstance(cause, EngineDeadError):
                self._mark_dead(instance, str(cause))
                asyncio.ensure_future(self._retire(instance))
            else:
                logger.warning("load report of %s failed: %s", instance.instance_id, cause)
        except (asyncio.TimeoutError, GetTimeoutError):
            logger.warning("load report of %s took over %.0f s; keeping its previous one", instance.instance_id,
                           self.config.load_timeout_s)
        else:
            instance.set_load(load, asked_at)

    def _mark_dead(self, instance: _Instance, reason: str) -> None:
        if instance.dead_reason is None:
            instance.dead_reason = reason
            alive = sum(i.alive for i in self.instances.values())
            logger.error("engine instance %s is dead (%s); %d instance(s) left", instance.instance_id, reason, alive)

    async def _retire(self, instance: _Instance) -> None:
        """An instance whose engine died: stop it and end the actor (its resources go back to Ray)."""
        await asyncio.wait([asyncio.ensure_future(self._stop_instance(instance))], timeout=SHUTDOWN_TIMEOUT_S)
        ray.kill(instance.actor)

    def _dead_message(self) -> str:
        reasons = "; ".join(f"{i.instance_id}: {i.dead_reason}" for i in self.instances.values())
        return f"engine is dead: every engine instance has died ({reasons})"

    # ------------------------------------------------------------ views

    def state(self) -> RouterState:
        live = [i for i in self.instances.values() if i.alive and i.load is not None]
        loads = [i.load for i in live]  # type: ignore[misc]
        stats = sum_stats([load.stats for load in loads if load.stats is not None])
        dead = {i.instance_id: i.dead_reason for i in self.instances.values() if i.dead_reason is not None}
        draining = self._draining or not any(i.open for i in live)
        dead_error = None if any(i.alive for i in self.instances.values()) else self._dead_message()
        return RouterState(stats, loads, dead, draining, len(self.streams), dead_error,  # type: ignore[arg-type]
                           dict(self.migrations), self.num_failovers)

    def instance_actors(self) -> dict[str, Any]:
        """The live instances' actor handles, by id (admin and tests)."""
        return {i.instance_id: i.actor for i in self.instances.values() if i.alive}

    def where(self, request_id: str) -> str | None:
        """The instance running a request in flight, or None."""
        stream = self.streams.get(request_id)
        return None if stream is None else stream.instance_id
