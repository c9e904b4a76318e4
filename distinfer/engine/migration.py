"""Both ends of moving a running request between engine instances (live migration, prefill/decode
hand-off), on one engine, between its steps. The caller (the router) drives the stages:

    source                                   destination
    export_blocks(rid, 0) -> kv, n1          reserve(rid, n1); import_blocks(rid, 0, kv)       stage 1
    export_blocks(rid, n1) -> kv, n2         reserve(rid, n2); import_blocks(rid, n1, kv)      stage 2 ...
    pause(rid, nk) -> snapshot, kv           commit(snapshot, kv, nk)                          last stage
    release(rid): gone here                  (it runs here from the next step)
    (or resume(rid) when the commit failed)

While stages run the request keeps decoding on the source: a stage copies only full, computed blocks,
which no step writes again. The last stage takes the rest (the partial block) with the request's state.
A reservation never committed is freed by cancel() or, after `timeout_s`, by the engine's next step.
KV moves as one KVShard per source rank (its layout and a CPU tensor per layer it holds, see
worker/kv_transfer.py); the destination re-shards it for its own ranks, so source and destination may differ
in tensor and pipeline parallel sizes, not in model, block size or dtype.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distinfer.engine.request import Request
from distinfer.messages import RequestSnapshot
from distinfer.worker.kv_transfer import KVLayout, KVShard, check_export, reshard

if TYPE_CHECKING:
    from distinfer.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

KVExport = list[KVShard]  # per source rank, in rank order; [] when no blocks move


@dataclass
class _Reservation:
    num_blocks: int
    deadline: float  # time.monotonic()
    copying: int = 0  # writes in progress off the step loop: it does not expire meanwhile


class RequestMover:
    def __init__(self, engine: LLMEngine, timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.block_size = engine.config.cache.block_size
        self.timeout_s = timeout_s
        self._reservations: dict[str, _Reservation] = {}
        self._layouts: list[KVLayout] | None = None  # this instance's ranks' KV layouts, asked once
        self._epochs: dict[str, int] = {}  # request id -> its preemption count when its pre-copy began
        self.num_in = self.num_out = 0  # requests committed here / released from here

    @property
    def _scheduler(self):
        return self.engine.scheduler

    def _check_instance(self) -> None:
        """Moves carry each rank's whole cache of a request; under sequence parallelism a request's KV is
        spread over the SP ranks block by block, which export/import do not re-shard (yet)."""
        if self.engine.config.parallel.sequence_parallel_size > 1:
            raise ValueError("moving requests between instances is not supported with sequence_parallel_size > 1")

    def _check_movable(self, request_id: str) -> None:
        self._check_instance()
        self.engine.output_processor.check_movable(request_id)

    # ------------------------------------------------------------ source

    def export_blocks(self, request_id: str, first_block: int) -> tuple[KVExport, int]:
        """The request's full, computed blocks from `first_block` on (it keeps running); and the index after
        the last one exported (== first_block when there is nothing new, e.g. it is waiting or swapped)."""
        block_ids, end = self.stage_blocks(request_id, first_block)
        return (self.copy_out(block_ids) if block_ids else []), end

    def stage_blocks(self, request_id: str, first_block: int,
                     max_blocks: int | None = None) -> tuple[list[int], int]:
        """A pre-copy stage's device blocks (full, computed, from `first_block` on; at most `max_blocks`) and
        the index after them.
        Their copy (`copy_out`) may then run off the step loop, while steps go on: no step writes a full
        computed block, and one the request frees (a preemption) makes `pause` refuse the move."""
        self._check_movable(request_id)
        request = self._scheduler.requests[request_id]
        if first_block == 0:
            self._epochs[request_id] = request.num_preemptions
        block_ids = self._scheduler.exportable_blocks(request_id)[:request.num_computed_tokens // self.block_size]
        if max_blocks is not None:
            block_ids = block_ids[:first_block + max_blocks]
        return block_ids[first_block:], max(len(block_ids), first_block)

    def copy_out(self, block_ids: list[int]) -> KVExport:
        return self._export(block_ids)

    def pause(self, request_id: str, first_block: int = 0, export: bool = True) -> tuple[RequestSnapshot, KVExport]:
        """The last stage on the source: stop scheduling the request (it keeps its blocks and its place) and
        take its snapshot and its computed blocks from `first_block` on ([] when it holds none: then the
        destination computes its tokens again; or without `export`, when a link carries them, send_blocks).
        Then `release` it (committed elsewhere) or `resume` it."""
        self._check_movable(request_id)
        request = self._scheduler.requests[request_id]
        if self._epochs.pop(request_id, request.num_preemptions) != request.num_preemptions:
            raise RuntimeError(f"request {request_id!r} was preempted during the pre-copy: the blocks copied then "
                               "may have been reused; it stays here")
        block_ids = self._scheduler.exportable_blocks(request_id)
        self._scheduler.pause(request_id)
        try:
            kv = self._export(block_ids[first_block:]) if export and len(block_ids) > first_block else []
            states = self.engine.executor.collective_rpc("sampler_state", request_id)
        except BaseException:
            self._scheduler.resume(request_id)
            raise
        engine_request, output = self.engine.output_processor.snapshot(request_id)
        num_computed = request.num_computed_tokens if block_ids else 0
        return RequestSnapshot(engine_request, list(request.output_token_ids), num_computed,
                               request.num_cached_tokens, request.num_preemptions, request.first_scheduled_time,
                               next((s for s in states if s), None), output), kv

    def resume(self, request_id: str) -> None:
        """The move failed: the paused request goes on here as if nothing happened (no-op if it is gone)."""
        self._scheduler.resume(request_id)

    def release(self, request_id: str) -> None:
        """The move committed elsewhere: the paused request leaves this instance (no output, blocks freed)."""
        if not self._scheduler.is_paused(request_id):
            raise KeyError(f"request {request_id!r} is not paused for a move here (finished or aborted meanwhile)")
        self.engine.output_processor.abort_requests([request_id])
        self._scheduler.remove_request(request_id)
        self._epochs.pop(request_id, None)
        self.num_out += 1

    def export_request(self, request_id: str, first_block: int = 0) -> tuple[RequestSnapshot, KVExport]:
        """pause + release: take the request out of this instance with its snapshot and KV."""
        result = self.pause(request_id, first_block)
        self.release(request_id)
        return result

    # ------------------------------------------------------------ the "p2p" transport (worker/kv_link.py)

    def num_full_blocks(self, request_id: str) -> int:
        """How many leading blocks of the request are full and computed (what a pre-copy stage may send)."""
        self._check_movable(request_id)
        request = self._scheduler.requests[request_id]
        return len(self._scheduler.exportable_blocks(request_id)[:request.num_computed_tokens // self.block_size])

    def link_send_ids(self, request_id: str, first_block: int, end_block: int) -> list[int]:
        """The device blocks [first_block, end_block) of the request, to send over a link (`send_blocks`;
        off the step loop is safe for the same reasons as `copy_out`)."""
        block_ids = self._scheduler.exportable_blocks(request_id)[first_block:end_block]
        if len(block_ids) != end_block - first_block:
            raise ValueError(f"request {request_id!r} holds no blocks [{first_block}, {end_block})")
        return block_ids

    def link_receive_ids(self, request_id: str, first_block: int, num_blocks: int) -> list[int]:
        """The reserved blocks a link transfer writes, at block index first_block on (`receive_blocks`)."""
        reservation = self._reservations.get(request_id)
        if reservation is None or first_block + num_blocks > reservation.num_blocks:
            raise KeyError(f"no reservation of {first_block + num_blocks} blocks for request {request_id!r}")
        reservation.deadline = time.monotonic() + self.timeout_s
        reservation.copying += 1  # until receive_blocks ends
        return self._scheduler.kv.get_block_ids(request_id)[first_block:first_block + num_blocks]

    def send_blocks(self, link_id: str, block_ids: list[int]) -> None:
        self.engine.executor.collective_rpc("kv_link_send", link_id, block_ids)

    def receive_blocks(self, link_id: str, request_id: str, block_ids: list[int]) -> None:
        try:
            self.engine.executor.collective_rpc("kv_link_receive", link_id, block_ids)
        finally:
            reservation = self._reservations.get(request_id)
            if reservation is not None:
                reservation.copying -= 1

    def _export(self, block_ids: list[int]) -> KVExport:
        tensors = self.engine.executor.collective_rpc("export_kv_blocks", block_ids)
        return [KVShard(layout, layers) for layout, layers in zip(self.kv_layouts, tensors)]

    @property
    def kv_layouts(self) -> list[KVLayout]:
        """Which layers and KV heads each rank of this instance holds (asked of the ranks on first use)."""
        if self._layouts is None:
            self._layouts = self.engine.executor.collective_rpc("kv_layout")
        return self._layouts

    # ------------------------------------------------------------ destination

    def reserve(self, request_id: str, num_blocks: int) -> bool:
        """Hold at least `num_blocks` device blocks for an incoming request (grows an earlier reservation).
        False (nothing changed) when they are not free."""
        self._check_instance()
        if request_id in self._scheduler.requests or self.engine.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use in this instance")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if self._scheduler.kv.allocate_slots(request_id, num_blocks * self.block_size) is None:
            return False
        held = len(self._scheduler.kv.get_block_ids(request_id))
        self._reservations[request_id] = _Reservation(held, time.monotonic() + self.timeout_s)
        return True

    def import_blocks(self, request_id: str, first_block: int, kv: KVExport) -> None:
        """Write a stage's blocks into the reservation, at block index `first_block` on."""
        self.copy_in(request_id, self.stage_import(request_id, first_block, kv), kv)

    def stage_import(self, request_id: str, first_block: int, kv: KVExport) -> list[int]:
        """The reserved device blocks a stage's KV goes to (checked). Their write (`copy_in`) may then run off
        the step loop: no step touches a reservation's blocks."""
        reservation = self._reservations.get(request_id)
        if reservation is None:
            raise KeyError(f"no reservation for request {request_id!r} (never made, committed, or expired)")
        num = self._check_kv(kv)
        if first_block < 0 or first_block + num > reservation.num_blocks:
            raise ValueError(f"blocks [{first_block}, {first_block + num}) are outside the reservation of "
                             f"{reservation.num_blocks}")
        reservation.deadline = time.monotonic() + self.timeout_s
        reservation.copying += 1  # until copy_in ends
        return self._scheduler.kv.get_block_ids(request_id)[first_block:first_block + num]

    def copy_in(self, request_id: str, block_ids: list[int], kv: KVExport) -> None:
        try:
            if block_ids:
                local = reshard(kv, self.kv_layouts)  # pass-through when the layouts are the same
                self.engine.executor.collective_rpc("import_kv_blocks", block_ids,
                                                    rank_args=[(layers,) for layers in local])
        finally:
            reservation = self._reservations.get(request_id)
            if reservation is not None:
                reservation.copying -= 1
                reservation.deadline = time.monotonic() + self.timeout_s

    def commit(self, snapshot: RequestSnapshot, kv: KVExport, first_block: int = 0) -> bool:
        """Resume the request here from its snapshot: `kv` holds its blocks from `first_block` on, the earlier
        ones came in stages (or none: then it computes its tokens again). False (nothing changed, a
        reservation kept) when the blocks are not free."""
        self._check_snapshot(snapshot)
        if snapshot.request.sampling_params.max_tokens is None:  # as LLMEngine.add_processed_request sets it
            snapshot.request.sampling_params.max_tokens = self.engine.max_model_len - len(snapshot.request.prompt_token_ids)
        request_id, num_kv = snapshot.request_id, self._check_kv(kv)
        num_needed = -(-snapshot.num_computed_tokens // self.block_size)
        if num_needed and first_block + num_kv < num_needed:
            raise ValueError(f"KV blocks up to {first_block + num_kv} for {snapshot.num_computed_tokens} computed "
                             f"tokens ({num_needed} blocks of {self.block_size})")
        if not num_needed:
            self.cancel(request_id)
        elif not self.reserve(request_id, num_needed):
            return False
        else:
            try:
                self.import_blocks(request_id, first_block, kv)
            except BaseException:
                self.cancel(request_id)
                raise
            del self._reservations[request_id]  # the blocks are the request's now
        self.engine.output_processor.import_request(snapshot.request, snapshot.output_token_ids, snapshot.output)
        self._scheduler.import_request(_request_from(snapshot), has_kv=bool(num_needed))
        self.num_in += 1
        return True

    def cancel(self, request_id: str) -> None:
        """Drop a reservation (the migration was aborted); no-op when there is none."""
        if self._reservations.pop(request_id, None) is not None:
            self._scheduler.kv.free(request_id)

    def expire_reservations(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, res in self._reservations.items() if res.deadline < now and not res.copying]:
            logger.warning("migration reservation for request %s expired: its blocks are freed", request_id)
            self.cancel(request_id)

    def _check_snapshot(self, snapshot: RequestSnapshot) -> None:
        engine = self.engine
        if snapshot.request_id in self._scheduler.requests or engine.output_processor.has_request(snapshot.request_id):
            raise ValueError(f"request id {snapshot.request_id!r} is already in use in this instance")
        if len(snapshot.all_token_ids) >= engine.max_model_len:
            raise ValueError(f"request {snapshot.request_id!r} has {len(snapshot.all_token_ids)} tokens; this "
                             f"instance's max_model_len is {engine.max_model_len}")

    def _check_kv(self, kv: KVExport) -> int:
        """The number of blocks in an export, checked (before anything reaches a rank) against this instance's
        model cache: same layers, KV heads, head size, block size and dtype; any tp/pp split."""
        return check_export(kv, self.kv_layouts) if kv else 0


def _request_from(snapshot: RequestSnapshot) -> Request:
    request = Request.from_engine_request(snapshot.request)
    request.output_token_ids = list(snapshot.output_token_ids)
    request.num_computed_tokens = snapshot.num_computed_tokens
    request.num_cached_tokens, request.num_preemptions = snapshot.num_cached_tokens, snapshot.num_preemptions
    request.first_scheduled_time, request.generator_state = snapshot.first_scheduled_time, snapshot.generator_state
    return request
