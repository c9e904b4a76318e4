"""AsyncLLM: the engine's step loop on a background thread, streamed to asyncio callers.

Every caller's request joins the same continuous batch. Commands (add/abort) cross into the loop
thread through a queue; outputs cross back with `call_soon_threadsafe` onto each caller's loop.
Text prompts are tokenized on a worker thread, never on the caller's event loop.

Fault isolation: a request the engine refuses, or that fails while it runs (non-finite logits, a
sampling or detokenizing error), ends alone with its error; only a failure of the step itself (the
model forward, a worker) kills the engine. A watchdog thread marks the engine dead when one step runs
longer than `step_timeout_s` (a hung forward or collective) and fails every request in flight.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from distinfer.config import DistInferConfig
from distinfer.engine.engine import LLMEngine
from distinfer.engine.input_processor import PromptType
from distinfer.engine.llm import build_config
from distinfer.engine.output_processor import RequestOutputKind
from distinfer.errors import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
    RequestFailedError,
    RequestMovedError,
)
from distinfer.messages import CompletionOutput, EngineRequest, EngineStats, FinishReason, RequestOutput, RequestSnapshot
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Called on the step-loop thread: (outputs of the step, stats after it, request ids just aborted).
StepCallback = Callable[[list[RequestOutput], EngineStats, list[str]], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    request: EngineRequest

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def needs_tokenizing(prompt: PromptType) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt)


def aborted_output(request: EngineRequest) -> RequestOutput:
    completion = CompletionOutput(index=0, text="", token_ids=[], finish_reason=FinishReason.ABORT.value)
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [completion], finished=True)


class AsyncLLM:
    def __init__(self, model: str | None = None, *, config: DistInferConfig | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(config or build_config(model, **kwargs))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._draining = False
        # Requests admitted but unfinished, bounded so the waiting queue can never overflow in the loop.
        self.max_pending_requests = self.engine.config.scheduler.max_waiting_requests
        self.dead_error: EngineDeadError | None = None
        self._step_callbacks: list[StepCallback] = []
        self.step_timeout_s = self.engine.config.scheduler.step_timeout_s
        self._step_started: float | None = None  # monotonic start of the step in progress (loop thread)
        self._shutdown_event = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="distinfer-step-loop", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch_steps, name="distinfer-step-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_draining(self) -> bool:
        """drain() or shutdown() was called: new requests are refused."""
        return self._draining or self._stopped

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def add_step_callback(self, callback: StepCallback) -> None:
        """Observe the engine (metrics): called on the loop thread after every step with its outputs
        and after every abort with the aborted ids. Must be quick; its exceptions are logged, not raised."""
        self._step_callbacks.append(callback)

    # ------------------------------------------------------------ caller side

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None,
        request_id: str,
        priority: int = 0,
        output_kind: RequestOutputKind = RequestOutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs; cancelling the iteration (or the task) aborts the request. A request that
        fails inside the engine raises RequestFailedError (its message is safe to show a client)."""
        stream = await self._submit(prompt, sampling_params, request_id, priority, output_kind)
        async for item in self._iterate(stream, request_id):
            yield item

    async def _iterate(self, stream: _Stream, request_id: str) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = isinstance(item, RequestMovedError)  # nothing is left here to abort
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._send_abort([request_id], notify=False)

    # ------------------------------------------------------------ moving requests (the router drives these)

    async def call_between_steps(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) on the step-loop thread between two steps; its result (or exception) comes back."""
        self._check_alive()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def pause_request(self, request_id: str, first_block: int = 0,
                            export: bool = True) -> tuple[RequestSnapshot, list]:
        """The last migration stage on the source (engine.mover.pause): no more steps for the request; its
        snapshot and its KV blocks from `first_block` on. Then release_request or resume_request."""
        return await self.call_between_steps(lambda engine: engine.mover.pause(request_id, first_block, export))

    async def resume_request(self, request_id: str) -> None:
        await self.call_between_steps(lambda engine: engine.mover.resume(request_id))

    async def release_request(self, request_id: str) -> None:
        """The request committed on another instance: it leaves this one, and its stream here ends with
        RequestMovedError after every output it produced here. KeyError when it is no longer paused here
        (it was aborted meanwhile)."""
        def release(engine: LLMEngine) -> None:
            engine.mover.release(request_id)
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(RequestMovedError(request_id))
        await self.call_between_steps(release)

    async def import_request(self, snapshot: RequestSnapshot, kv: list,
                             first_block: int = 0) -> AsyncIterator[RequestOutput] | None:
        """The last migration stage on the destination (engine.mover.commit): the request's stream from
        here on, or None (nothing changed) when its blocks are not free."""
        request_id = snapshot.request_id
        with self._lock:
            self._check_alive()
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), snapshot.request)
            self._streams[request_id] = stream
        try:
            committed = await self.call_between_steps(lambda engine: engine.mover.commit(snapshot, kv, first_block))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        if not committed:
            with self._lock:
                self._streams.pop(request_id, None)
            return None
        return self._iterate(stream, request_id)

    async def _submit(self, prompt, params, request_id, priority, output_kind) -> _Stream:
        self._check_accepting()
        process = self.engine.input_processor.process
        if needs_tokenizing(prompt):  # tokenizers release the GIL: the caller's loop keeps serving
            request = await asyncio.to_thread(process, request_id, prompt, params, priority=priority)
            self._check_accepting()
        else:
            request = process(request_id, prompt, params, priority=priority)
        with self._lock:
            if self.dead_error is not None:  # checked again under the lock that _fail_all takes
                raise self.dead_error
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            if len(self._streams) >= self.max_pending_requests:
                raise QueueFullError(f"too many requests in flight ({self.max_pending_requests}); retry later")
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request)
            self._streams[request_id] = stream
        self._inbox.put(("add", request, output_kind))
        self._wake.set()
        return stream

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._stopped:
            raise EngineDrainingError("engine is shut down")

    def _check_accepting(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._stopped or self._draining:
            raise EngineDrainingError("engine is draining or shut down: not accepting new requests")

    async def abort(self, request_id: str | list[str]) -> None:
        self._send_abort([request_id] if isinstance(request_id, str) else list(request_id), notify=True)

    def _send_abort(self, request_ids: list[str], notify: bool) -> None:
        with self._lock:
            streams = [self._streams.pop(i, None) for i in request_ids]
        if notify:
            for stream in filter(None, streams):
                stream.put(aborted_output(stream.request))
        self._inbox.put(("abort", request_ids, None))
        self._wake.set()

    @property
    def num_pending_requests(self) -> int:
        return len(self._streams)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests and wait (bounded) for the ones in flight to finish."""
        self._draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._streams and asyncio.get_running_loop().time() < deadline and not self.is_dead:
            await asyncio.sleep(0.05)

    def abort_all(self, error: BaseException) -> int:
        """End every request in flight with `error` (e.g. the drain time ran out) and free its KV
        blocks; returns how many there were."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(error)
        if streams:
            self._inbox.put(("abort", [s.request.request_id for s in streams], None))
            self._wake.set()
        return len(streams)

    def shutdown(self) -> None:
        self._stopped = True
        self._shutdown_event.set()
        self._wake.set()
        # A dead engine's loop may be stuck in a hung step that nothing can interrupt: do not wait for it.
        self._thread.join(timeout=1.0 if self.is_dead else 30.0)
        self.engine.shutdown()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:  # nothing will answer them any more
            try:
                stream.put(EngineDrainingError("engine shut down before this request finished"))
            except RuntimeError:  # the caller's event loop is already closed
                pass

    # ------------------------------------------------------------ loop thread

    def _run_loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step_started = time.monotonic()
                try:
                    outputs = self.engine.step()
                finally:
                    self._step_started = None
                if self.dead_error is not None:  # the watchdog gave up on this step meanwhile
                    return
                self._dispatch(outputs)
                self._notify(outputs, [])
        except BaseException as exc:  # the engine is unusable: fail everyone, clearly
            logger.exception("engine step loop died")
            dead = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine is dead: {type(exc).__name__}: {exc}")
            self._fail_all(dead)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, payload, kind = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "call":
                self._call(payload, kind)
            elif command == "add":
                with self._lock:
                    live = payload.request_id in self._streams
                if live:  # not aborted before it arrived
                    self._add(payload, kind)
            else:
                self.engine.abort_request(payload)
                self._notify([], payload)

    def _call(self, fn: Callable[[LLMEngine], Any], future: concurrent.futures.Future) -> None:
        """A call from call_between_steps: its exception goes to the caller, not the loop (a refused
        migration is not an engine failure; a dead worker shows on the next step)."""
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as exc:
            future.set_exception(exc)

    def _add(self, request: EngineRequest, kind: RequestOutputKind) -> None:
        """A request the engine refuses (or fails to queue) fails alone; the loop goes on."""
        try:
            self.engine.add_processed_request(request, kind)
        except Exception as exc:
            if not isinstance(exc, (QueueFullError, ValueError)):
                logger.exception("adding request %s failed", request.request_id)
                exc = RequestFailedError(request.request_id, "internal error while queueing it (details are in the server log)")
            with self._lock:
                stream = self._streams.pop(request.request_id, None)
            if stream is not None:
                stream.put(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._lock:
                stream = self._streams.get(output.request_id)
                if stream is not None and output.finished:
                    del self._streams[output.request_id]
            if stream is not None:
                stream.put(output if output.error is None else RequestFailedError(output.request_id, output.error))

    def _notify(self, outputs: list[RequestOutput], aborted: list[str]) -> None:
        if not self._step_callbacks:
            return
        stats = self.engine.get_stats()
        for callback in list(self._step_callbacks):
            try:
                callback(outputs, stats, aborted)
            except Exception:  # an observer must never kill the step loop
                logger.exception("step callback %r failed", callback)

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            if self.dead_error is None:  # the first cause is the one reported
                self.dead_error = error
            error = self.dead_error
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(error)

    # ------------------------------------------------------------ watchdog thread

    def _watch_steps(self) -> None:
        """Mark the engine dead when a step runs past step_timeout_s (checked a few times a second)."""
        interval = min(1.0, self.step_timeout_s / 10)
        while not self._shutdown_event.wait(interval):
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout_s:
                self._on_hung_step(time.monotonic() - started)
                return
            if self.dead_error is not None:
                return

    def _on_hung_step(self, elapsed_s: float) -> None:
        reason = (f"engine is dead: a step has run {elapsed_s:.0f} s, past the step timeout "
                  f"({self.step_timeout_s:g} s): the model forward or a collective is hung")
        logger.error("%s; failing every request in flight", reason)
        self._fail_all(EngineDeadError(reason))
        try:  # release the workers (a Ray executor's wait then returns); an in-process forward cannot be interrupted
            self.engine.executor.shutdown()
        except Exception:
            logger.exception("releasing the workers of the hung engine failed")
