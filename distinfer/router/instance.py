"""EngineInstance: one engine (an AsyncLLM, with its own tp x pp workers and KV tiers) in its own Ray
actor process, with an instance id.

The actor is async: its methods run on one event loop next to the AsyncLLM step-loop thread, so a
stream, an abort and a load report never wait for one another. Requests arrive tokenized and validated
(an `EngineRequest` made by the front end's own tokenizer; the tokenizer never crosses processes), and
each streams its `RequestOutput` deltas back as a Ray streaming generator. A tp/pp > 1 instance runs its
ranks with the engine's Ray executor, in a placement group of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from ray.exceptions import RayTaskError

from distinfer.config import DistInferConfig
from distinfer.engine.async_llm import AsyncLLM
from distinfer.engine.output_processor import RequestOutputKind
from distinfer.messages import EngineRequest, RequestOutput
from distinfer.router.stats import InstanceLoad

logger = logging.getLogger(__name__)


def remote_error(exc: RayTaskError) -> BaseException:
    """The exception the remote method raised (Ray wraps it with the remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@dataclass
class InstanceInfo:
    """What the router and its front ends need to know of the model an instance serves."""

    instance_id: str
    config: DistInferConfig  # as resolved inside the instance (device, dtype)
    hf_config: Any  # transformers PretrainedConfig
    max_model_len: int
    eos_token_ids: list[int]
    max_pending_requests: int
    pid: int


class EngineInstance:
    """The actor body: `ray.remote(EngineInstance).options(...).remote(instance_id, model, engine_kwargs)`."""

    def __init__(self, instance_id: str, model: str | None, engine_kwargs: dict[str, Any]) -> None:
        logging.getLogger("distinfer").setLevel(logging.INFO)
        self.instance_id = instance_id
        self.start_error: Exception | None = None
        try:
            self.engine = AsyncLLM(model, **engine_kwargs)
        except Exception as exc:  # kept for info(): the router raises the engine's own error, not Ray's
            logger.exception("engine instance %s failed to start", instance_id)
            self.start_error = exc
            return
        logger.info("engine instance %s ready (pid %d)", instance_id, os.getpid())

    def info(self) -> InstanceInfo:
        """The model's limits and config; raises the engine's start-up error if it failed to start."""
        if self.start_error is not None:
            raise self.start_error
        core = self.engine.engine
        return InstanceInfo(self.instance_id, core.config, core.hf_config, core.max_model_len,
                            list(core.input_processor.limits.eos_token_ids), self.engine.max_pending_requests,
                            os.getpid())

    async def generate(self, request: EngineRequest,
                       output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (called with num_returns="streaming"). The prompt is not sent back
        with every delta: outputs carry `prompt=None, prompt_token_ids=[]` and the caller restores them.
        Refusals and failures raise (QueueFullError, EngineDrainingError, EngineDeadError, ValueError,
        RequestFailedError); cancelling the stream aborts the request, as `abort` does."""
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        outputs = self.engine.generate(prompt, request.sampling_params, request.request_id,
                                       priority=request.priority, output_kind=output_kind)
        async for output in outputs:
            yield replace(output, prompt=None, prompt_token_ids=[])

    # ---- live migration, driven by the router (router/migration.py); each runs between two steps

    async def export_blocks(self, request_id: str, first_block: int, max_blocks: int | None = None) -> tuple[list, int]:
        """A pre-copy chunk on the source: (KV of the full computed blocks from first_block on, at most max_blocks
        of them; the index after them). The copy runs off the step loop, so the request (and every other) keeps
        decoding meanwhile."""
        mover = self.engine.engine.mover
        block_ids, end = await self.engine.call_between_steps(
            lambda e: mover.stage_blocks(request_id, first_block, max_blocks))
        return (await asyncio.to_thread(mover.copy_out, block_ids) if block_ids else []), end

    async def reserve(self, request_id: str, num_blocks: int) -> bool:
        return await self.engine.call_between_steps(lambda e: e.mover.reserve(request_id, num_blocks))

    async def import_blocks(self, request_id: str, first_block: int, kv: list) -> None:
        """A pre-copy stage on the destination: the write runs off the step loop (into reserved blocks)."""
        mover = self.engine.engine.mover
        block_ids = await self.engine.call_between_steps(lambda e: mover.stage_import(request_id, first_block, kv))
        await asyncio.to_thread(mover.copy_in, request_id, block_ids, kv)

    async def cancel_reservation(self, request_id: str) -> None:
        await self.engine.call_between_steps(lambda e: e.mover.cancel(request_id))

    async def pause(self, request_id: str, first_block: int, export: bool = True) -> tuple[Any, list]:
        """The last stage on the source: (RequestSnapshot, KV from first_block on, or [] without `export`:
        a link carries it); the request is paused."""
        return await self.engine.pause_request(request_id, first_block, export)

    async def kv_layouts(self) -> list:
        return await self.engine.call_between_steps(lambda e: e.mover.kv_layouts)

    async def num_full_blocks(self, request_id: str) -> int:
        return await self.engine.call_between_steps(lambda e: e.mover.num_full_blocks(request_id))

    async def link_listen(self, link_id: str) -> list[tuple[str, int]]:
        """The "p2p" transport: every rank listens for the peer instance's same rank; their addresses."""
        return await self.engine.call_between_steps(lambda e: e.executor.collective_rpc("kv_link_listen", link_id))

    async def link_connect(self, link_id: str, addresses: list[tuple[str, int]] | None) -> None:
        """Every rank joins its link (the source gives the destination's addresses; the destination None)."""
        rank_args = [(a,) for a in addresses] if addresses is not None else None
        # Off the step loop: the rendezvous waits for the peer; the workers take it between their steps.
        await asyncio.to_thread(self.engine.engine.executor.collective_rpc, "kv_link_connect", link_id,
                                *(() if rank_args else (None,)), rank_args=rank_args)

    async def send_blocks(self, link_id: str, request_id: str, first_block: int, end_block: int) -> None:
        """The "p2p" transport, source side; the transfer runs off the step loop (it waits for the peer)."""
        mover = self.engine.engine.mover
        block_ids = await self.engine.call_between_steps(lambda e: mover.link_send_ids(request_id, first_block, end_block))
        await asyncio.to_thread(mover.send_blocks, link_id, block_ids)

    async def receive_blocks(self, link_id: str, request_id: str, first_block: int, num_blocks: int) -> None:
        mover = self.engine.engine.mover
        block_ids = await self.engine.call_between_steps(
            lambda e: mover.link_receive_ids(request_id, first_block, num_blocks))
        await asyncio.to_thread(mover.receive_blocks, link_id, request_id, block_ids)

    async def resume(self, request_id: str) -> None:
        await self.engine.resume_request(request_id)

    async def release(self, request_id: str) -> None:
        await self.engine.release_request(request_id)

    async def adopt(self, snapshot: Any, kv: list, first_block: int) -> AsyncIterator[bool | RequestOutput]:
        """The last stage on the destination (num_returns="streaming"): yields whether the request was
        committed here, then (if it was) its outputs from here on, like generate."""
        outputs = await self.engine.import_request(snapshot, kv, first_block)
        yield outputs is not None
        if outputs is not None:
            async for output in outputs:
                yield replace(output, prompt=None, prompt_token_ids=[])

    async def abort(self, request_ids: list[str]) -> None:
        """End these requests (each stream gets a final "abort" output) and free their KV blocks."""
        await self.engine.abort(request_ids)

    async def load(self) -> InstanceLoad:
        """This instance's load, read on the step-loop thread between two steps: after every request this
        instance received before the call (they are queued ahead of it), so a report covers each
        request dispatched before it was asked for. Raises EngineDeadError when the engine has died."""
        stats, head = await self.engine.call_between_steps(
            lambda engine: (engine.get_stats(), engine.scheduler.head_of_queue()))
        return InstanceLoad.from_stats(self.instance_id, stats, self.engine.engine.config.cache.block_size,
                                       self.engine.is_draining, head_of_queue=head)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, and wait (up to timeout_s) for the ones in flight to finish."""
        await self.engine.drain(timeout_s)

    def num_pending_requests(self) -> int:
        return self.engine.num_pending_requests

    async def shutdown(self) -> None:
        """Stop the step loop and release the workers (off the actor's event loop: it joins a thread)."""
        await asyncio.to_thread(self.engine.shutdown)
