"""Live migration of one request between two engine instances: the Llumnix protocol, made abort-safe.

Stages (the request keeps decoding on the source until the last):
  1..k  pre-copy: the source exports its full computed blocks not sent yet; the destination reserves blocks
        and writes them, in chunks of at most `chunk_blocks` (so that no single copy or serialization holds
        either instance for long: the request's tokens keep flowing between chunks). Stops when a stage
        finds at most `threshold_blocks` new blocks, or after `max_stages` stages.
  last  the source pauses the request (kept, not scheduled) and exports the rest with its RequestSnapshot;
        the destination commits it and starts streaming; the router points the caller's stream at the
        destination; the source releases the request (its stream there ends with RequestMovedError, after
        which the router reads the destination's).
Statuses: FINISHED; ABORTED_SRC (the request finished, was aborted, or the source died first: the
reservation is dropped); ABORTED_DST (the destination refused, filled up or died: the request goes on at
the source as if nothing happened). A reservation that is never committed is also freed by the
destination's own timeout.

Transports: "object_store" (the default, any topology): the KV of a stage goes from the source to the
destination as a Ray object (the router passes the reference on; the bytes never enter the router).
"p2p": each source rank sends straight to the same destination rank over a gloo link of their own
(worker/kv_link.py), opened once per instance pair; it needs both instances to shard the KV the same way
(else the object store is used). Stage copies run off the instances' step loops, which go on stepping.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayTaskError

from distinfer.router.instance import remote_error
from distinfer.router.rebalance import check_migration_transport

if TYPE_CHECKING:
    from distinfer.router.router import Router
    from distinfer.router.state import RequestStream, _Instance

logger = logging.getLogger(__name__)



class MigrationStatus(str, enum.Enum):
    FINISHED = "finished"
    ABORTED_SRC = "aborted_src"
    ABORTED_DST = "aborted_dst"


@dataclass
class MigrationConfig:
    max_stages: int = 4  # pre-copy stages before the last one (0: stop-and-copy)
    threshold_blocks: int = 2  # a stage with at most this many new blocks is the last pre-copy stage
    chunk_blocks: int = 32  # a pre-copy stage's blocks travel in chunks of at most this many
    transport: str = "object_store"

    def __post_init__(self) -> None:
        for name, minimum in (("max_stages", 0), ("threshold_blocks", 0), ("chunk_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        check_migration_transport(self.transport)


@dataclass
class MigrationResult:
    request_id: str
    source: str
    destination: str
    status: MigrationStatus
    reason: str = ""
    stage_blocks: list[int] = field(default_factory=list)  # blocks copied per stage, the last one included
    stage_seconds: list[float] = field(default_factory=list)
    paused_s: float = 0.0  # the last stage: from the pause on the source to the commit on the destination
    transport: str = "object_store"  # the one the KV went by


class _Aborted(Exception):
    def __init__(self, status: MigrationStatus, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def migrate(router: Router, stream: RequestStream, src: _Instance, dst: _Instance,
                  config: MigrationConfig) -> MigrationResult:
    """Move the request of `stream` from src to dst (the router's caller stream never notices)."""
    request_id = stream.request.request_id
    result = MigrationResult(request_id, src.instance_id, dst.instance_id, MigrationStatus.FINISHED)
    try:
        link = await router.kv_link(src, dst) if config.transport == "p2p" else None
        result.transport = "p2p" if link is not None else "object_store"
        lock = router._link_locks.get(link) if link is not None else None
        async with lock if lock is not None else contextlib.nullcontext():
            sent = await _precopy(router, stream, src, dst, config, result, link)
            await _last_stage(router, stream, src, dst, sent, result, link)
    except _Aborted as aborted:
        result.status, result.reason = aborted.status, aborted.reason
        await _call(dst, "cancel_reservation", request_id, quiet=True)
        logger.info("migration of %s from %s to %s: %s (%s)", request_id, src.instance_id, dst.instance_id,
                    result.status.value, result.reason)
    return result


async def _precopy(router: Router, stream: RequestStream, src: _Instance, dst: _Instance,
                   config: MigrationConfig, result: MigrationResult, link: str | None) -> int:
    sent = 0
    for _ in range(config.max_stages):
        start = time.perf_counter()
        end = await _precopy_stage(router, stream, src, dst, config, link, sent)
        result.stage_blocks.append(end - sent)
        result.stage_seconds.append(time.perf_counter() - start)
        new, sent = end - sent, end
        if new <= config.threshold_blocks:
            break
    return sent


async def _precopy_stage(router: Router, stream: RequestStream, src: _Instance, dst: _Instance,
                         config: MigrationConfig, link: str | None, sent: int) -> int:
    """One pre-copy stage: the full computed blocks from `sent` on, chunk by chunk, until a chunk comes back
    short (the stage caught up with the request); the index after the last block sent."""
    request_id, chunk = stream.request.request_id, config.chunk_blocks
    while True:
        if link is None:
            kv_ref, end_ref = src.actor.export_blocks.options(num_returns=2).remote(request_id, sent, chunk)
            end = await _source(src, end_ref, stream, router, kv_ref)
        else:
            end = min(await _source(src, src.actor.num_full_blocks.remote(request_id), stream, router, None),
                      sent + chunk)
        if end > sent:
            await _reserve(dst, request_id, end)
            if link is None:
                await _destination(dst, dst.actor.import_blocks.remote(request_id, sent, kv_ref))
            else:
                await _over_link(link, src, dst, request_id, sent, end)
        if end - sent < chunk:
            return end
        sent = end


async def _last_stage(router: Router, stream: RequestStream, src: _Instance, dst: _Instance, sent: int,
                      result: MigrationResult, link: str | None) -> None:
    request_id = stream.request.request_id
    start = time.perf_counter()
    snapshot_ref, kv_ref = src.actor.pause.options(num_returns=2).remote(request_id, sent, link is None)
    snapshot = await _source(src, snapshot_ref, stream, router, kv_ref)
    try:
        if link is not None:  # the rest over the link; the destination then commits with no KV in hand
            end = -(-snapshot.num_computed_tokens // dst.info.config.cache.block_size)
            if end > sent:
                await _reserve(dst, request_id, end)
                await _over_link(link, src, dst, request_id, sent, end)
            kv_ref, sent = [], max(end, sent)
        adopted = dst.actor.adopt.options(num_returns="streaming").remote(snapshot, kv_ref, sent)
        committed = await _destination(dst, await adopted.__anext__())
    except _Aborted:
        await _call(src, "resume", request_id, quiet=True)
        raise
    if not committed:
        await _call(src, "resume", request_id, quiet=True)
        raise _Aborted(MigrationStatus.ABORTED_DST, f"{dst.instance_id} has no room for the request")
    result.paused_s = time.perf_counter() - start
    router.switch(stream, dst, adopted)  # from here the caller's aborts go to the destination
    try:
        await src.actor.release.remote(request_id)
    except (RayTaskError, RayActorError) as exc:  # gone from the source meanwhile (aborted, finished, died)
        router.unswitch(stream, src)
        await _call(dst, "abort", [request_id], quiet=True)
        raise _Aborted(MigrationStatus.ABORTED_SRC, f"the source let the request go first: {exc}") from None
    block_size = dst.info.config.cache.block_size
    result.stage_blocks.append(max(-(-snapshot.num_computed_tokens // block_size) - sent, 0))
    result.stage_seconds.append(time.perf_counter() - start)


async def _reserve(dst: _Instance, request_id: str, num_blocks: int) -> None:
    if not await _destination(dst, dst.actor.reserve.remote(request_id, num_blocks)):
        raise _Aborted(MigrationStatus.ABORTED_DST, f"{dst.instance_id} has no room for {num_blocks} blocks")


async def _over_link(link: str, src: _Instance, dst: _Instance, request_id: str, first: int, end: int) -> None:
    """The "p2p" transport: the source's ranks send blocks [first, end) as the destination's receive them."""
    sending = src.actor.send_blocks.remote(link, request_id, first, end)
    receiving = dst.actor.receive_blocks.remote(link, request_id, first, end - first)
    results = await asyncio.gather(sending, receiving, return_exceptions=True)
    for side, outcome in zip((MigrationStatus.ABORTED_SRC, MigrationStatus.ABORTED_DST), results):
        if isinstance(outcome, BaseException):
            reason = remote_error(outcome) if isinstance(outcome, RayTaskError) else outcome
            raise _Aborted(side, f"KV link {link}: {type(reason).__name__}: {reason}")


async def _source(src: _Instance, ref: Any, stream: RequestStream, router: Router, sibling: Any) -> Any:
    """A source call's result; the request finishing or the source failing aborts the migration. `sibling`
    is the call's other return (KV), fetched on failure so that Ray does not report it as unhandled."""
    try:
        value = await ref
    except (RayTaskError, RayActorError) as exc:
        try:
            if sibling is not None:
                await sibling
        except (RayTaskError, RayActorError):
            pass
        reason = remote_error(exc) if isinstance(exc, RayTaskError) else exc
        raise _Aborted(MigrationStatus.ABORTED_SRC, f"{src.instance_id}: {type(reason).__name__}: {reason}") from None
    if stream.finished or stream.aborted or router.streams.get(stream.request.request_id) is not stream:
        raise _Aborted(MigrationStatus.ABORTED_SRC, "the request ended during the migration")
    return value


async def _destination(dst: _Instance, ref: Any) -> Any:
    try:
        return await ref
    except (RayTaskError, RayActorError) as exc:
        raise _Aborted(MigrationStatus.ABORTED_DST, f"{dst.instance_id}: {type(exc).__name__}: {exc}") from None


async def _call(instance: _Instance, method: str, *args: Any, quiet: bool = False) -> None:
    try:
        await getattr(instance.actor, method).remote(*args)
    except (RayTaskError, RayActorError) as exc:
        if not quiet:
            raise
        logger.debug("%s.%s failed: %s", instance.instance_id, method, exc)
