"""The distinfer.v1.InferenceService servicer (assembled into a server by grpc_server.py).

The servicer is a thin adapter: it validates every request at the edge (serving/validation.py),
streams AsyncLLM deltas as GenerateResponses, and maps errors onto status codes. A bad request is
answered alone; it never reaches the engine's step loop. Cancelling a call or passing its deadline
aborts the request and frees its KV blocks (the engine stream is closed when the handler is cancelled).

Request ids are the caller's: each caller (its API key, or its address when it sends none) has its own
namespace, so `Abort` reaches only the caller's own requests and an id in use by another caller is not
revealed. The engine runs each request under a server-made id. Internal errors reach the client as a
generic message with an error id; the details go to the log under that id.

`DrainInstance` (admin) needs an engine with instances behind a router (RouterEngine): it awaits
`engine.drain_instance(id, timeout_s)`, which stops dispatch to that instance and moves its requests
away; a single AsyncLLM answers FAILED_PRECONDITION, an unknown id NOT_FOUND. The API key, when one is
set, applies to it as to every RPC (grpc_auth.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable

import grpc

import distinfer
from distinfer.client.errors import RETRY_AFTER_KEY, RETRYABLE_KEY  # trailing metadata on UNAVAILABLE
from distinfer.errors import EngineDeadError, EngineDrainingError, QueueFullError, RequestFailedError
from distinfer.messages import EngineStats
from distinfer.serving.auth import caller_identity
from distinfer.serving.grpc_auth import authorization_value
from distinfer.serving.grpc_codec import (
    StreamState,
    UndecodableRequest,
    to_responses,
    to_sampling_params,
)
from distinfer.serving.limits import ServerLimits, max_prompt_chars
from distinfer.serving.validation import (
    MAX_N,
    MAX_STOP_STRINGS,
    RequestValidationError,
    UnknownModelError,
    ServingLimits,
    check_fits_context,
    check_text,
    validate_drain_timeout,
    validate_instance_id,
    validate_model_name,
    validate_request_id,
    tokenize_checked_text,
    validate_token_ids,
)
from distinfer.sampling_params import MAX_LOGPROBS, SamplingParams
from distinfer.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from distinfer.engine.async_llm import AsyncLLM
    from distinfer.router.stats import InstanceLoad

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
RETRY_AFTER_MS = 1000  # the hint sent with a retryable UNAVAILABLE (draining, loading)
SINGLE_ENGINE = ("this server runs a single engine, not several instances behind a router: there is no "
                 "instance to drain (to drain the server itself, stop it: SIGTERM refuses new requests and "
                 "lets those in flight finish)")


class Refused(Exception):
    """A request the server refuses with `code` (not a validation error of one field)."""

    def __init__(self, code: grpc.StatusCode, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


def status_for(exc: BaseException, error_id: str) -> tuple[grpc.StatusCode, str, bool]:
    """(status code, message, retryable) for an error raised while serving a request."""
    if isinstance(exc, UnknownModelError):
        return grpc.StatusCode.NOT_FOUND, exc.message, False
    if isinstance(exc, RequestValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message, False
    if isinstance(exc, Refused):
        return exc.code, exc.message, exc.retryable
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), True
    if isinstance(exc, EngineDrainingError):  # another replica can take it; this one is going away
        return grpc.StatusCode.UNAVAILABLE, str(exc), True
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), False
    if isinstance(exc, ValueError):  # the engine's own validation names the field too
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), False
    if isinstance(exc, RequestFailedError):  # its message is ours and safe to show
        return grpc.StatusCode.INTERNAL, str(exc), False
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); the details are in the server log", False


def _is_draining(engine: "AsyncLLM") -> bool:
    return engine.is_draining


class EngineSlot:
    """The served engine, or the pending load of it (the server answers UNAVAILABLE meanwhile)."""

    def __init__(self, engine: "AsyncLLM | Awaitable[AsyncLLM]") -> None:
        self.engine: AsyncLLM | None = None
        self.load_error: BaseException | None = None
        self._task: asyncio.Future | None = None
        if inspect.isawaitable(engine):
            self._task = asyncio.ensure_future(engine)
            self._task.add_done_callback(self._loaded)
        else:
            self.engine = engine

    def _loaded(self, task: asyncio.Future) -> None:
        if task.cancelled():
            self.load_error = RuntimeError("model loading was cancelled")
        elif task.exception() is not None:
            self.load_error = task.exception()
            logger.error("model failed to load: %s", self.load_error)
        else:
            self.engine = task.result()
            logger.info("model loaded; gRPC server is serving")

    def get(self) -> "AsyncLLM":
        """The engine for read-only calls; Refused(UNAVAILABLE) while loading."""
        if self.load_error is not None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"model failed to load: {self.load_error}")
        if self.engine is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "model is loading; retry shortly", retryable=True)
        return self.engine

    def get_for_generate(self) -> "AsyncLLM":
        engine = self.get()
        if engine.is_dead:
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(engine.dead_error))
        if _is_draining(engine):
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is draining: not accepting new requests", retryable=True)
        return engine

    def is_serving(self) -> bool:
        engine = self.engine
        return engine is not None and not engine.is_dead and not _is_draining(engine)


@dataclass
class GenerateJob:
    request_id: str  # the caller's
    engine_request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


class InferenceServicer:
    """distinfer.v1.InferenceService over one AsyncLLM."""

    def __init__(self, slot: EngineSlot, model_name: str, limits: ServerLimits | None = None) -> None:
        self.slot = slot
        self.model_name = model_name
        self.server_limits = limits or ServerLimits()
        self.started_at = time.monotonic()
        self._active: dict[tuple[str, str], str] = {}  # (caller, caller's request id) -> engine request id
        self._limits: ServingLimits | None = None

    # ------------------------------------------------------------ helpers

    def limits(self, engine: "AsyncLLM") -> ServingLimits:
        if self._limits is None:
            core = engine.engine
            self._limits = ServingLimits(core.hf_config.vocab_size, core.max_model_len,
                                         max_prompt_chars(self.server_limits, engine.tokenizer, core.max_model_len))
        return self._limits

    @staticmethod
    def caller(context: grpc.aio.ServicerContext) -> str:
        peer = context.peer() if hasattr(context, "peer") else ""
        return caller_identity(authorization_value(context.invocation_metadata()), peer or "")

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, error_id: str | None = None) -> None:
        error_id = error_id or f"err-{uuid.uuid4().hex[:16]}"
        code, message, retryable = status_for(exc, error_id)
        if code == grpc.StatusCode.INTERNAL and not isinstance(exc, RequestFailedError):
            logger.error("internal error (error id %s)", error_id, exc_info=exc)
        else:
            logger.info("request %s refused: %s %s", error_id, code.name, message)
        metadata: tuple[tuple[str, str], ...] = ()
        if code == grpc.StatusCode.UNAVAILABLE:
            metadata = ((RETRYABLE_KEY, "true" if retryable else "false"),)
            if retryable:
                metadata += ((RETRY_AFTER_KEY, str(RETRY_AFTER_MS)),)
        await context.abort(code, message, trailing_metadata=metadata)

    async def _prepare(self, request: pb.GenerateRequest | UndecodableRequest, engine: "AsyncLLM") -> GenerateJob:
        if isinstance(request, UndecodableRequest):
            raise request.error
        validate_request_id(request.request_id)
        validate_model_name(request.model, self.model_name)
        limits = self.limits(engine)
        params = to_sampling_params(request.sampling_params, limits)
        which = request.WhichOneof("input")
        if which == "text":
            check_text(request.text, limits, "text")  # before any tokenizing work
            encode = lambda text: engine.tokenizer.encode(text, add_special_tokens=True)  # noqa: E731
            ids = await asyncio.to_thread(tokenize_checked_text, request.text, limits, encode)
        elif which == "token_ids":
            ids = validate_token_ids(request.token_ids.ids, limits, "token_ids.ids")
        else:
            raise RequestValidationError("input", "input is not set: give text or token_ids")
        check_fits_context(len(ids), params.max_tokens, limits, "sampling_params.max_tokens")
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        return GenerateJob(request_id, f"grpc-{uuid.uuid4().hex}", ids, params, request.priority)

    # ------------------------------------------------------------ RPCs

    async def Generate(self, request: pb.GenerateRequest | UndecodableRequest, context: grpc.aio.ServicerContext) -> None:
        error: BaseException | None = None
        claimed: tuple[str, str] | None = None
        job: GenerateJob | None = None
        try:
            engine = self.slot.get_for_generate()
            job = await self._prepare(request, engine)
            key = (self.caller(context), job.request_id)
            if key in self._active:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"request_id {job.request_id!r} is already running")
            claimed = key
            self._active[key] = job.engine_request_id
            await self._stream(engine, job, context)
        except Exception as exc:  # mapped onto a status below; cancellation passes through
            error = exc
        finally:
            if claimed is not None:
                self._active.pop(claimed, None)
        if error is not None and not context.done():
            await self._abort(context, error, job.engine_request_id if job is not None else None)

    async def _stream(self, engine: "AsyncLLM", job: GenerateJob, context: grpc.aio.ServicerContext) -> None:
        state = StreamState(job.request_id, job.params.n)
        outputs = engine.generate(job.prompt_token_ids, job.params, job.engine_request_id, priority=job.priority)
        # aclosing: a cancelled handler closes the engine stream at once, which aborts the request.
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                for response in to_responses(output, state):
                    await context.write(response)

    async def Abort(self, request: pb.AbortRequest | UndecodableRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error
            engine = self.slot.get()
            engine_request_id = self._active.get((self.caller(context), request.request_id))
            if engine_request_id is not None:  # only the caller's own requests
                await engine.abort(engine_request_id)
            return pb.AbortResponse(found=engine_request_id is not None)
        except Exception as exc:
            await self._abort(context, exc)
            raise  # unreachable: abort raises

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        try:
            engine = self.slot.get()
            validate_model_name(getattr(request, "model", ""), self.model_name)
            core = engine.engine
            tokenizer = engine.tokenizer
            dtype = str(core.config.model.dtype).removeprefix("torch.")
            info = pb.GetModelInfoResponse(
                model_name=self.model_name, model_type=getattr(core.hf_config, "model_type", "") or "",
                max_model_len=core.max_model_len, vocab_size=core.hf_config.vocab_size, dtype=dtype,
                eos_token_ids=core.input_processor.limits.eos_token_ids, max_logprobs=MAX_LOGPROBS,
                max_n=MAX_N, max_stop_strings=MAX_STOP_STRINGS,
                has_chat_template=bool(getattr(tokenizer, "chat_template", None)))
            if getattr(tokenizer, "bos_token_id", None) is not None:
                info.bos_token_id = tokenizer.bos_token_id
            return info
        except Exception as exc:
            await self._abort(context, exc)
            raise

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        try:
            engine = self.slot.get()
            validate_model_name(getattr(request, "model", ""), self.model_name)
            config = engine.engine.config
            parallel = config.parallel
            return pb.GetServerInfoResponse(
                version=distinfer.__version__, model_name=self.model_name,
                parallel_config=pb.ParallelConfig(
                    tensor_parallel_size=parallel.tensor_parallel_size,
                    pipeline_parallel_size=parallel.pipeline_parallel_size,
                    sequence_parallel_size=parallel.sequence_parallel_size, world_size=parallel.world_size),
                load=_load(engine.get_stats(), engine.num_pending_requests),
                max_pending_requests=max(0, engine.max_pending_requests),
                max_num_seqs=config.scheduler.max_num_seqs,
                max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                block_size=config.cache.block_size, draining=_is_draining(engine), dead=engine.is_dead,
                uptime_seconds=time.monotonic() - self.started_at, instances=_instances(engine))
        except Exception as exc:
            await self._abort(context, exc)
            raise

    async def DrainInstance(self, request: pb.DrainInstanceRequest | UndecodableRequest,
                            context: grpc.aio.ServicerContext) -> pb.DrainInstanceResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error
            validate_model_name(request.model, self.model_name)
            instance_id = validate_instance_id(request.instance_id)
            timeout_s = validate_drain_timeout(request.timeout_s if request.HasField("timeout_s") else None)
            engine = self.slot.get()
            drain_instance = getattr(engine, "drain_instance", None)  # RouterEngine's; AsyncLLM has none
            if drain_instance is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, SINGLE_ENGINE)
            if engine.is_dead:
                raise Refused(grpc.StatusCode.UNAVAILABLE, str(engine.dead_error))
            try:  # awaits the router actor: the event loop keeps serving meanwhile
                result = await drain_instance(instance_id, timeout_s)
            except ValueError as exc:  # RouterEngine.drain_instance's only ValueError: an unknown id
                raise Refused(grpc.StatusCode.NOT_FOUND, str(exc)) from None
            logger.info("DrainInstance %s: %d request(s) moved, %d left", result.instance_id, result.moved,
                        result.remaining)
            return pb.DrainInstanceResponse(instance_id=result.instance_id, moved=result.moved,
                                            remaining=result.remaining, finished_in_place=result.finished_in_place)
        except Exception as exc:
            await self._abort(context, exc)
            raise

    async def Tokenize(self, request: pb.TokenizeRequest | UndecodableRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error
            engine = self.slot.get()
            validate_model_name(request.model, self.model_name)
            limits = self.limits(engine)
            if limits.max_prompt_chars is not None and len(request.text) > limits.max_prompt_chars:
                raise RequestValidationError("text", f"text has {len(request.text)} characters; at most "
                                             f"{limits.max_prompt_chars} are allowed")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return await asyncio.to_thread(_tokenize, engine.tokenizer, request.text, add_special,
                                           engine.engine.max_model_len)
        except Exception as exc:
            await self._abort(context, exc)
            raise


def _load(stats: EngineStats, num_pending: int) -> pb.Load:
    return pb.Load(
        num_running=stats.num_running, num_waiting=stats.num_waiting, num_pending=num_pending,
        kv_cache_usage=stats.kv_cache_usage, num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_total_blocks, prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits, num_preemptions=stats.num_preemptions,
        host_kv_cache_usage=stats.host_kv_cache_usage, num_host_blocks=stats.num_host_blocks,
        host_prefix_cache_hits=stats.host_prefix_cache_hits, kv_bytes_to_host=stats.kv_bytes_to_host,
        kv_bytes_to_device=stats.kv_bytes_to_device, num_swapped_preemptions=stats.num_swapped_preemptions,
        num_recomputed_tokens=stats.num_recomputed_tokens)


def _instance_status(load: "InstanceLoad") -> pb.InstanceStatus:
    status = pb.InstanceStatus(instance_id=load.instance_id, draining=load.draining)
    if load.stats is not None:  # the whole report (always, from a live instance)
        status.load.CopyFrom(_load(load.stats, load.num_running + load.num_waiting))
    else:
        status.load.CopyFrom(pb.Load(num_running=load.num_running, num_waiting=load.num_waiting,
                                     num_pending=load.num_running + load.num_waiting,
                                     num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks,
                                     num_preemptions=load.num_preemptions))
    return status


def _instances(engine: Any) -> list[pb.InstanceStatus]:
    """The live instances behind a RouterEngine, as of its last state fetch; none for a single AsyncLLM."""
    instance_loads = getattr(engine, "instance_loads", None)
    return [] if instance_loads is None else [_instance_status(load) for load in instance_loads()]


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool, max_model_len: int) -> pb.TokenizeResponse:
    """The whole Tokenize answer, built on a worker thread (a long text's response is large too)."""
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    tokens = [t if isinstance(t, str) else "" for t in tokenizer.convert_ids_to_tokens(ids)]
    return pb.TokenizeResponse(token_ids=ids, tokens=tokens, max_model_len=max_model_len)
