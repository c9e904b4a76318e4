"""RouterEngine: AsyncLLM's interface over a Router actor and its engine instances, for the serving
process (`distinfer serve --instances N`, the Ray Serve replica, or Python).

    engine = RouterEngine(model, num_instances=2, dispatch_policy="least_load", **engine_kwargs)
    async for delta in engine.generate(prompt, params, request_id): ...

It does at the edge what AsyncLLM does: validates and tokenizes with its own copy of the tokenizer
(text on a worker thread; only token ids cross processes), bounds the requests in flight, and streams
deltas. Nothing here blocks the event loop: every Ray call is awaited or fire-and-forget, except the
start-up and `shutdown()` (both synchronous, like AsyncLLM's) and a background thread that fetches the
router's state (summed stats, instances alive) every `state_interval_s` for get_stats(), /metrics,
health and `is_dead`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from distinfer.config import DistInferConfig
from distinfer.engine.async_llm import StepCallback, aborted_output, needs_tokenizing
from distinfer.engine.input_processor import InputProcessor, ModelLimits, PromptType
from distinfer.engine.llm import build_config
from distinfer.engine.output_processor import RequestOutputKind
from distinfer.errors import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
    RequestFailedError,
)
from distinfer.executor.ray import check_parallel_shapes, ensure_ray
from distinfer.messages import (
    EngineRequest,
    EngineStats,
    RequestOutput,
)
from distinfer.model.loader import load_hf_config, load_tokenizer
from distinfer.router.instance import InstanceInfo, remote_error
from distinfer.router.migration import MigrationConfig, MigrationResult
from distinfer.router.moves import DrainResult
from distinfer.router.policies import DEFAULT_DISPATCH_POLICY
from distinfer.router.rebalance import DEFAULT_MIGRATION_POLICY
from distinfer.router.router import (
    START_TIMEOUT_S,
    Router,
    RouterConfig,
    RouterState,
)
from distinfer.router.stats import InstanceLoad
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STATE_TIMEOUT_S = 10.0


@dataclass
class ServedModel:
    """What the front ends read from `engine.engine` (an AsyncLLM's LLMEngine): the instances' config
    and the model's limits."""

    config: DistInferConfig
    hf_config: Any
    max_model_len: int
    tokenizer: Any
    input_processor: InputProcessor


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request: EngineRequest
    pump: asyncio.Future | None = None
    done: bool = False  # a final output or an error was delivered (nothing left to abort)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def resolve_router_device(device: str) -> str:
    """"auto" -> "cuda" when the Ray cluster has a GPU (decided here, not inside an actor that Ray may have
    given no GPU). One instance per GPU set means "cuda:N" cannot name the same device for all of them."""
    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    if device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: with several instances each uses the GPU Ray gives it; "
                         "pass device='cuda'")
    return device


def instance_actor_options(config: DistInferConfig) -> dict[str, Any]:
    """An instance actor takes a CPU, and the GPU when it runs the model itself (world size 1 on CUDA);
    a larger instance reserves a placement group for its ranks (the engine's Ray executor does that).
    `scheduling_strategy="DEFAULT"`: never captured by the caller's placement group."""
    gpu = config.parallel.world_size == 1 and config.model.device.startswith("cuda")
    return {"num_cpus": 1, "num_gpus": 1 if gpu else 0, "scheduling_strategy": "DEFAULT"}


def start_router(model: str | None, engine_kwargs: dict[str, Any], router_config: RouterConfig,
                 config: DistInferConfig, ray_address: str | None) -> tuple[Any, InstanceInfo, RouterState]:
    """Start the Router actor and wait for its instances (blocking): (router, instance info, first state).
    On any failure the router is killed (its instances end with it) and the engine's own error raised."""
    world_size = config.parallel.world_size
    ensure_ray(router_config.num_instances * (1 + (world_size if world_size > 1 else 0)), ray_address)
    engine_kwargs = dict(engine_kwargs, device=resolve_router_device(str(engine_kwargs.get("device", "auto"))))
    options = instance_actor_options(build_config(model, **engine_kwargs))
    concurrency = router_config.num_instances * (config.scheduler.max_waiting_requests + 64)
    router = ray.remote(Router).options(num_cpus=0, scheduling_strategy="DEFAULT", max_concurrency=concurrency).remote(
        model, engine_kwargs, router_config, options)
    try:
        info = ray.get(router.start.remote(), timeout=START_TIMEOUT_S + 30)
        return router, info, ray.get(router.state.remote(), timeout=STATE_TIMEOUT_S)
    except BaseException as exc:
        ray.kill(router)
        raise (remote_error(exc) if isinstance(exc, RayTaskError) else exc) from None


class RouterEngine:
    """N engine instances behind a Router, with AsyncLLM's API (see the module docstring)."""

    def __init__(self, model: str | None = None, *, num_instances: int = 2,
                 dispatch_policy: str = DEFAULT_DISPATCH_POLICY, load_interval_s: float = 0.1,
                 state_interval_s: float = 0.25, ray_address: str | None = None,
                 migration: MigrationConfig | None = None, prefill_instances: int = 0, decode_instances: int = 0,
                 migration_policy: str = DEFAULT_MIGRATION_POLICY, **engine_kwargs: Any) -> None:
        if prefill_instances or decode_instances:  # prefill/decode disaggregation: P + D instances
            num_instances = prefill_instances + decode_instances
        self.router_config = RouterConfig(num_instances, dispatch_policy, load_interval_s,
                                          migration=migration or MigrationConfig(),
                                          prefill_instances=prefill_instances, decode_instances=decode_instances,
                                          migration_policy=migration_policy)
        # Every engine argument, the model path and its shapes are checked before any actor starts.
        config = build_config(model, **engine_kwargs)
        check_parallel_shapes(load_hf_config(config.model), config.parallel)
        tokenizer = load_tokenizer(config.model)
        self.router, info, self._state = start_router(model, engine_kwargs, self.router_config, config, ray_address)
        limits = ModelLimits(info.hf_config.vocab_size, info.max_model_len, info.eos_token_ids)
        processor = InputProcessor(tokenizer, limits)
        self.engine = ServedModel(info.config, info.hf_config, info.max_model_len, tokenizer, processor)
        self.max_pending_requests = num_instances * info.max_pending_requests
        self.dead_error: EngineDeadError | None = None
        self._streams: dict[str, _Stream] = {}
        self._step_callbacks: list[StepCallback] = []
        self._draining = False
        self._closed = threading.Event()
        self._state_interval_s = state_interval_s
        self._refresher = threading.Thread(target=self._refresh_loop, name="distinfer-router-state", daemon=True)
        self._refresher.start()
        logger.info("router engine ready: %d instances of %s, %s dispatch", num_instances,
                    info.config.model.model or "the default model", dispatch_policy)

    # ------------------------------------------------------------ AsyncLLM's read side

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_draining(self) -> bool:
        return self._draining or self._closed.is_set() or self._state.draining

    @property
    def num_pending_requests(self) -> int:
        return len(self._streams)

    def get_stats(self) -> EngineStats:
        """Summed over the live instances, as of the last state fetch (at most state_interval_s old)."""
        return self._state.stats

    def instance_loads(self) -> list[InstanceLoad]:
        """The live instances' latest load reports, as of the last state fetch."""
        return list(self._state.loads)

    def add_step_callback(self, callback: StepCallback) -> None:
        """Called on the caller's event loop with each output as it arrives (and with aborted ids), with
        the latest summed stats. Must be quick; its exceptions are logged."""
        self._step_callbacks.append(callback)

    # ------------------------------------------------------------ requests

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str,
                       priority: int = 0,
                       output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> AsyncIterator[RequestOutput]:
        """As AsyncLLM.generate: stream outputs; closing the iteration aborts the request."""
        stream = await self._submit(prompt, sampling_params, request_id, priority, output_kind)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished and not stream.done:
                self._send_abort([request_id], notify=False)
            elif stream.pump is not None:
                stream.pump.cancel()

    async def _submit(self, prompt, params, request_id, priority, output_kind) -> _Stream:
        self._check_accepting()
        process = self.engine.input_processor.process
        if needs_tokenizing(prompt):  # tokenizers release the GIL: the caller's loop keeps serving
            request = await asyncio.to_thread(process, request_id, prompt, params, priority=priority)
            self._check_accepting()
        else:
            request = process(request_id, prompt, params, priority=priority)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(self._streams) >= self.max_pending_requests:
            raise QueueFullError(f"too many requests in flight ({self.max_pending_requests}); retry later")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request)
        self._streams[request_id] = stream
        stream.pump = asyncio.ensure_future(self._pump(stream, output_kind))
        return stream

    def _check_accepting(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._closed.is_set() or self._draining:
            raise EngineDrainingError("engine is draining or shut down: not accepting new requests")

    async def _pump(self, stream: _Stream, output_kind: RequestOutputKind) -> None:
        """Router stream -> the caller's queue. The router sends outputs without the prompt; it is restored
        here from the request."""
        request = stream.request
        try:
            source = self.router.generate.options(num_returns="streaming").remote(request, output_kind)
            async for ref in source:
                output: RequestOutput = await ref
                output.prompt, output.prompt_token_ids = request.prompt, request.prompt_token_ids
                if not self._deliver(stream, output) or output.finished:
                    return
            error: BaseException = EngineDeadError("the router ended the stream without a final output")
        except RayTaskError as exc:  # refused or failed: the router's (or the instance's) own error
            error = remote_error(exc)
        except RayActorError as exc:
            error = EngineDeadError(f"engine is dead: the router actor died ({type(exc).__name__})")
        except Exception:  # never lose a stream silently
            logger.exception("request %s: relaying its stream failed", request.request_id)
            error = RequestFailedError(request.request_id, "internal error while relaying its outputs (details are "
                                       "in the server log)")
        if self._streams.get(request.request_id) is stream:
            del self._streams[request.request_id]
            stream.done = True
            stream.queue.put_nowait(error)

    def _deliver(self, stream: _Stream, output: RequestOutput) -> bool:
        """Hand an output to the caller; False when the stream was aborted meanwhile."""
        request_id = stream.request.request_id
        if self._streams.get(request_id) is not stream:
            return False
        if output.finished:
            del self._streams[request_id]
            stream.done = True
        stream.queue.put_nowait(output)
        self._notify([output], [])
        return True

    async def abort(self, request_id: str | list[str]) -> None:
        self._send_abort([request_id] if isinstance(request_id, str) else list(request_id), notify=True)

    def _send_abort(self, request_ids: list[str], notify: bool) -> None:
        streams = [self._streams.pop(i, None) for i in request_ids]
        for stream in filter(None, streams):
            stream.done = True
            if stream.pump is not None:
                stream.pump.cancel()
            if notify:
                stream.put(aborted_output(stream.request))
        self.router.abort.remote(request_ids)  # the instances free the requests' blocks
        self._notify([], request_ids)

    def abort_all(self, error: BaseException) -> int:
        """End every request in flight with `error` and free its blocks; returns how many there were."""
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.done = True
            if stream.pump is not None:
                stream.loop.call_soon_threadsafe(stream.pump.cancel)
            stream.put(error)
        if streams:
            self.router.abort.remote([s.request.request_id for s in streams])
        return len(streams)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests and wait (bounded) for the ones in flight to finish."""
        self._draining = True
        self.router.drain.remote(0.0)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._streams and asyncio.get_running_loop().time() < deadline and not self.is_dead:
            await asyncio.sleep(0.05)

    async def drain_instance(self, instance_id: str, timeout_s: float = 30.0) -> DrainResult:
        """Stop dispatching to one instance, move its requests to the others and wait (bounded) for the
        rest; says how many moved and how many are left. An unknown id raises ValueError."""
        try:
            return await self.router.drain_instance.remote(instance_id, timeout_s)
        except RayTaskError as exc:
            raise remote_error(exc) from None

    async def migrate(self, request_id: str, destination: str | None = None,
                      config: MigrationConfig | None = None) -> MigrationResult:
        """Move a request in flight to another instance (default: the one dispatch would pick); its stream
        goes on unchanged. The result says whether it moved (FINISHED) or stayed (ABORTED_*), and why."""
        try:
            return await self.router.migrate.remote(request_id, destination, config)
        except RayTaskError as exc:
            raise remote_error(exc) from None

    async def where(self, request_id: str) -> str | None:
        """The instance running a request in flight (None when it is not in flight)."""
        return await self.router.where.remote(request_id)

    def shutdown(self) -> None:
        """Stop every instance and the router (blocking, like AsyncLLM.shutdown: call it off the event loop)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._refresher.join(timeout=STATE_TIMEOUT_S + 1)
        try:
            ray.get(self.router.shutdown.remote(), timeout=60)
        except Exception as exc:  # the router is gone already: killing it below is enough
            logger.debug("router shutdown: %s", exc)
        ray.kill(self.router)
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:  # nothing will answer them any more
            try:
                stream.put(EngineDrainingError("engine shut down before this request finished"))
            except RuntimeError:  # the caller's event loop is already closed
                pass

    # ------------------------------------------------------------ background

    def _notify(self, outputs: list[RequestOutput], aborted: list[str]) -> None:
        for callback in list(self._step_callbacks):
            try:
                callback(outputs, self._state.stats, aborted)
            except Exception:  # an observer must never break a stream
                logger.exception("step callback %r failed", callback)

    def _refresh_loop(self) -> None:
        while not self._closed.wait(self._state_interval_s) and self._refresh():
            pass

    def _refresh(self) -> bool:
        """Fetch the router's state; False once the router itself is gone (nothing more to fetch)."""
        try:
            self._state = ray.get(self.router.state.remote(), timeout=STATE_TIMEOUT_S)
        except RayActorError as exc:
            self._set_dead(f"engine is dead: the router actor died ({type(exc).__name__})")
            return False
        except (GetTimeoutError, Exception) as exc:  # a slow or failed fetch keeps the previous state
            if not self._closed.is_set():
                logger.warning("fetching the router's state failed: %s", exc)
            return True
        if self._state.dead_error is not None:
            self._set_dead(self._state.dead_error)
        return True

    def _set_dead(self, reason: str) -> None:
        if self.dead_error is None and not self._closed.is_set():
            logger.error("%s", reason)
            self.dead_error = EngineDeadError(reason)
