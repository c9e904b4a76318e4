"""The Router's request moves (a mixin of Router, kept apart for size): live migration on request,
prefill/decode hand-off, moves started by the migration policy, drain of an instance, and failover when an
instance dies. It uses the Router's `instances`, `streams`, `policy`, `migration_policy`, `migrations`,
`num_failovers` and `config`; the stage machine itself is router/migration.py."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from distinfer.errors import EngineDeadError, EngineDrainingError
from distinfer.router.failover import resume_snapshot
from distinfer.router.migration import MigrationConfig, MigrationResult, MigrationStatus, migrate
from distinfer.router.policies import DispatchRequest
from distinfer.router.state import RequestStream, _Instance

logger = logging.getLogger(__name__)

PD_HAND_OFF = MigrationConfig(max_stages=0)  # the prompt's KV in one stage, right after the first token
PD_RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0)  # a hand-off refused for lack of room is tried again after these
# Where a request may move from an instance of each role (prefill hands off to decode; decode stays decode).
_DESTINATION_ROLES = {"both": ("both",), "prefill": ("decode",), "decode": ("decode",)}


@dataclass
class DrainResult:
    instance_id: str
    moved: int  # requests moved to other instances
    remaining: int  # requests still on it when drain_instance returned (0: it can be removed)
    finished_in_place: int = 0  # requests that ended there (finished or aborted) while their move was under way


class RequestMoves:
    """Mixed into Router (see the module docstring for what it uses of it)."""

    async def kv_link(self, src: _Instance, dst: _Instance) -> str | None:
        """The "p2p" transport's link from src to dst, opened on first use (None: the instances shard the KV
        differently, or the link could not be opened: the object store carries the KV then)."""
        key = (src.instance_id, dst.instance_id)
        async with self._link_open_lock:
            if key not in self._links:
                self._links[key] = await self._open_link(src, dst)
            return self._links[key]

    async def _open_link(self, src: _Instance, dst: _Instance) -> str | None:
        link_id = f"{src.instance_id}->{dst.instance_id}"
        try:
            layouts = await asyncio.gather(src.actor.kv_layouts.remote(), dst.actor.kv_layouts.remote())
            if layouts[0] != layouts[1]:
                logger.info("no KV link %s: the instances shard the KV differently; using the object store", link_id)
                return None
            addresses = await dst.actor.link_listen.remote(link_id)
            await asyncio.gather(dst.actor.link_connect.remote(link_id, None),
                                 src.actor.link_connect.remote(link_id, addresses))
        except (RayTaskError, RayActorError) as exc:
            logger.warning("opening KV link %s failed (%s); using the object store", link_id, exc)
            return None
        self._link_locks[link_id] = asyncio.Lock()  # one transfer at a time on a link: messages stay in order
        return link_id

    async def _hand_off(self, stream: RequestStream) -> None:
        """Prefill/decode: the request has its first token; it moves (one stage) to a decode instance chosen
        by load. A decode pool without room (ABORTED_DST) is tried again after PD_RETRY_DELAYS_S; meanwhile,
        and if every try fails, it goes on decoding where it is."""
        request_id = stream.request.request_id
        for delay in (0.0, *PD_RETRY_DELAYS_S):
            await asyncio.sleep(delay)
            if stream.finished or stream.aborted or self.streams.get(request_id) is not stream:
                return
            try:
                result = await self.migrate(request_id, config=PD_HAND_OFF)
            except (KeyError, ValueError, EngineDrainingError) as exc:  # finished already, or no decode instance open
                logger.info("no hand-off for request %s: %s", request_id, exc)
                return
            if result.status != MigrationStatus.ABORTED_DST:
                return
        logger.warning("hand-off of request %s to a decode instance failed (%s): it decodes on %s",
                       request_id, result.reason, result.source)

    def _rebalance(self) -> None:
        """Start the moves the migration policy asks for, within each pool of instances of one role."""
        for role in ("both", "prefill", "decode"):
            pool = [i for i in self.instances.values() if i.role == role and i.open and not i.moving]
            for move in self.migration_policy.plan([i.view() for i in pool]):
                src, dst = self.instances[move.source], self.instances[move.destination]
                stream = src.streams.get(move.request_id)
                if stream is not None and not (stream.migrating or stream.finished or stream.aborted):
                    src.moving = dst.moving = True
                    asyncio.ensure_future(self._policy_move(move.request_id, src, dst))

    async def _policy_move(self, request_id: str, src: _Instance, dst: _Instance) -> None:
        try:
            await self.migrate(request_id, dst.instance_id)
        except (KeyError, ValueError, EngineDrainingError) as exc:  # finished, or moving already
            logger.debug("policy move of %s not started: %s", request_id, exc)
        finally:
            src.moving = dst.moving = False

    async def _fail_over(self, stream: RequestStream, dead: _Instance) -> Any:
        """Resume a request of a dead instance on a live one (see router/failover.py); its output stream
        there. EngineDeadError when that cannot be done (no instance left, n > 1, or it failed there too)."""
        request_id = stream.request.request_id
        where = f"engine instance {dead.instance_id} died while serving request {request_id}"
        try:
            snapshot = resume_snapshot(stream)
            dst = self._destination_for(stream, None, any_role=True)
        except (ValueError, EngineDrainingError) as exc:
            raise EngineDeadError(f"{where} ({stream.num_delivered_tokens} tokens were streamed) and it cannot "
                                  f"resume elsewhere: {exc}") from None
        adopted = dst.actor.adopt.options(num_returns="streaming").remote(snapshot, [], 0)
        try:
            committed = await (await adopted.__anext__())
        except (RayTaskError, RayActorError, StopAsyncIteration) as exc:
            raise EngineDeadError(f"{where}; resuming it on {dst.instance_id} failed too: {exc}") from None
        if not committed:
            raise EngineDeadError(f"{where}; {dst.instance_id} could not take it")
        logger.warning("%s: it resumes on %s from its %d streamed tokens", where, dst.instance_id,
                       stream.num_delivered_tokens)
        dead.remove(stream)
        stream.instance_id = dst.instance_id
        dst.add(stream)
        self.num_failovers += 1
        return adopted

    async def migrate(self, request_id: str, destination: str | None = None,
                      config: MigrationConfig | None = None) -> MigrationResult:
        """Move a request in flight to another instance (by default the one dispatch would pick; `config`
        overrides the router's stage settings); its caller's stream goes on with no gap, duplicate or
        reordering. See router/migration.py."""
        stream = self.streams.get(request_id)
        if stream is None or stream.finished:
            raise KeyError(f"no request {request_id!r} in flight")
        if stream.migrating:
            raise ValueError(f"request {request_id!r} is already moving")
        src = self.instances[stream.instance_id]
        dst = self._destination_for(stream, destination)
        stream.migrating = True
        try:
            result = await migrate(self, stream, src, dst, config or self.config.migration)
        finally:
            stream.migrating = False
        self.migrations[result.status.value] += 1
        return result

    def _destination_for(self, stream: RequestStream, destination: str | None, any_role: bool = False) -> _Instance:
        if destination is not None:
            dst = self.instances.get(destination)
            if dst is None or not dst.alive or destination == stream.instance_id:
                raise ValueError(f"cannot move request {stream.request.request_id!r} to {destination!r}: "
                                 "not another live instance")
            return dst
        roles = ("both", "prefill", "decode") if any_role else _DESTINATION_ROLES[self.instances[stream.instance_id].role]
        candidates = [i for i in self.instances.values()
                      if i.open and i.instance_id != stream.instance_id and i.role in roles]
        if not candidates:
            raise EngineDrainingError("no other instance takes requests")
        chosen = self.policy.pick([i.view() for i in candidates],
                                  DispatchRequest(stream.num_delivered_tokens + len(stream.request.prompt_token_ids),
                                                  stream.request.priority))
        return self.instances[chosen]

    def switch(self, stream: RequestStream, dst: _Instance, outputs: Any) -> None:
        """The request committed on dst: the caller's stream continues from `outputs` there."""
        self.instances[stream.instance_id].remove(stream)
        stream.instance_id, stream.moved_to = dst.instance_id, outputs
        dst.add(stream)

    def unswitch(self, stream: RequestStream, src: _Instance) -> None:
        self.instances[stream.instance_id].remove(stream)
        stream.instance_id, stream.moved_to = src.instance_id, None
        src.add(stream)

    async def drain_instance(self, instance_id: str, timeout_s: float = 30.0) -> DrainResult:
        """Stop dispatching to one instance, move its requests to the others (live migration; one that
        cannot move finishes where it is), and wait (up to timeout_s) until it holds none. The instance
        refuses new requests from then on; once empty it can be removed with no request dropped."""
        instance = self.instances.get(instance_id)
        if instance is None:
            raise ValueError(f"unknown instance {instance_id!r}; known: {sorted(self.instances)}")
        instance.stop_dispatch = True
        moves = [self.migrate(request_id) for request_id, stream in list(instance.streams.items())
                 if not stream.migrating and any(i.open for i in self.instances.values())]
        results = await asyncio.gather(*moves, return_exceptions=True)
        moved = sum(isinstance(r, MigrationResult) and r.status == MigrationStatus.FINISHED for r in results)
        ended = sum(isinstance(r, MigrationResult) and r.status == MigrationStatus.ABORTED_SRC for r in results)
        if instance.alive:
            try:
                await instance.actor.drain.remote(timeout_s)
            except (RayActorError, RayTaskError) as exc:
                logger.warning("draining %s failed: %s", instance_id, exc)
        logger.info("drained %s: %d request(s) moved, %d left", instance_id, moved, len(instance.streams))
        return DrainResult(instance_id, moved, len(instance.streams), ended)
