"""OpenAI-compatible HTTP API over AsyncLLM: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics.

A thin adapter: bodies are checked by RequestGuard (API key before the body is read, then its size),
validated by pydantic (openai_protocol) and the shared serving validation, and errors come back in
OpenAI's shape with the offending field in `param` (openai_errors). Prompts are tokenized and chat
templates rendered off the event loop. Every request waits for its first output before answering, so
refusals (bad prompt, queue full, engine dead) get their own status code even when streaming; a client
that disconnects aborts its requests, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from distinfer.engine.async_llm import AsyncLLM
from distinfer.messages import RequestOutput
from distinfer.sampling_params import SamplingParams
from distinfer.serving import openai_protocol as proto
from distinfer.serving.http_guard import RequestGuard
from distinfer.serving.limits import ServerLimits, max_prompt_chars
from distinfer.serving.metrics import EngineMetrics
from distinfer.serving.openai_errors import (
    RETRY_AFTER_S,
    ClientDisconnected,
    OpenAIError,
    install_error_handlers,
    to_openai_error,
)
from distinfer.serving.validation import (
    ServingLimits,
    check_fits_context,
    check_prompt_length,
    check_text,
    tokenize_checked_text,
    validate_token_ids,
)

logger = logging.getLogger(__name__)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`; cancel it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        logger.info("client disconnected: request aborted")
        raise ClientDisconnected()
    return task.result()


class _SSEResponse(StreamingResponse):
    """Streams until done or the client disconnects; either way the body iterator is closed at once."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streamer = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streamer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, watcher):
                task.cancel()
            await asyncio.gather(streamer, watcher, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """Request handling shared by both endpoints; `build_app` wires it into FastAPI routes."""

    def __init__(self, engine: AsyncLLM, model_name: str, metrics: EngineMetrics, limits: ServerLimits) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.created = int(time.time())
        core = engine.engine
        self.limits = ServingLimits(core.hf_config.vocab_size, core.max_model_len,
                                    max_prompt_chars(limits, engine.tokenizer, core.max_model_len))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                              "invalid_request_error", "model", "model_not_found")

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=True)

    async def completion_prompts(self, body: proto.CompletionRequest) -> list[list[int]]:
        """Token ids of every prompt of the batch (text tokenized on a worker thread)."""
        prompts = body.prompts()
        texts = [check_text(p, self.limits, "prompt") for p in prompts if isinstance(p, str)]  # before any tokenizing
        if not texts:
            return [validate_token_ids(p, self.limits, "prompt") for p in prompts]
        return await asyncio.to_thread(
            lambda: [tokenize_checked_text(p, self.limits, self._encode, "prompt") if isinstance(p, str)
                     else validate_token_ids(p, self.limits, "prompt") for p in prompts])

    async def chat_prompt(self, body: proto.ChatCompletionRequest) -> list[int]:
        """The conversation rendered by the chat template and tokenized, on a worker thread."""
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", "invalid_request_error", "messages")
        conversation = body.conversation()
        chars = sum(len(m["content"]) for m in conversation)
        if self.limits.max_prompt_chars is not None and chars > self.limits.max_prompt_chars:
            raise proto.OpenAIRequestError("messages", f"have {chars} characters; at most {self.limits.max_prompt_chars} "
                                           "are allowed (a longer conversation cannot fit the context)")
        ids = await asyncio.to_thread(self._render_chat, conversation, body.add_generation_prompt)
        if not ids:
            raise proto.OpenAIRequestError("messages", "render to an empty prompt")
        check_prompt_length(len(ids), self.limits, "messages")
        return ids

    def _render_chat(self, conversation: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        try:
            ids = self.engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                            tokenize=True)
        except Exception as exc:  # jinja raise_exception, e.g. roles out of order
            raise OpenAIError(400, f"messages could not be rendered by the chat template: {exc}",
                              "invalid_request_error", "messages") from exc
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # ------------------------------------------------------------ generation

    async def start(self, request_id: str, prompts: list[Any], params: SamplingParams, priority: int) -> tuple[list, list[RequestOutput]]:
        """Submit every prompt and wait for each one's first output (so refusals raise here)."""
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        gens = [self.engine.generate(p, params, rid, priority=priority) for p, rid in zip(prompts, ids)]
        tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
        try:
            return gens, list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close(gens)
            raise

    async def outputs(self, gens: list, firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) for every output of every prompt, as they come."""
        for i, first in enumerate(firsts):
            yield i, first
        if len(gens) == 1:
            async for out in gens[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Any) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as exc:
                queue.put_nowait((i, exc))

        pumps = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(gens)
            while remaining:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    remaining -= 1
                else:
                    yield i, item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _close(gens: list) -> None:
    for gen in gens:
        try:
            await gen.aclose()
        except Exception as exc:  # already failed; its abort has been sent
            logger.debug("closing a finished stream raised %s", type(exc).__name__)


async def _respond(server: OpenAIServer, request: Request, body: Any, chat: bool, request_id: str) -> Response:
    params = body.to_sampling_params(server.limits)
    prompts = [await server.chat_prompt(body)] if chat else await server.completion_prompts(body)
    for ids in prompts:
        check_fits_context(len(ids), params.max_tokens, server.limits, body.max_tokens_field)
    render = proto.ResponseBuilder(server.model_name, chat, request_id, params.n, params.logprobs)
    if body.stream:
        gens, firsts = await _unless_disconnected(request, server.start(request_id, prompts, params, body.priority))
        return _SSEResponse(_stream(server, render, gens, firsts, body.include_usage, len(prompts) * params.n),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def run() -> Response:
        gens, firsts = await server.start(request_id, prompts, params, body.priority)
        try:
            seen: set[int] = set()
            async for i, out in server.outputs(gens, firsts):
                render.add(i, out, i not in seen)
                seen.add(i)
        finally:
            await _close(gens)
        response = render.envelope([render.full_choice(i, c) for i, c in sorted(render.choices.items())])
        response["usage"] = render.usage()
        return JSONResponse(response)

    return await _unless_disconnected(request, run())


async def _stream(server: OpenAIServer, render: proto.ResponseBuilder, gens: list, firsts: list[RequestOutput],
                  include_usage: bool, num_choices: int) -> AsyncIterator[str]:
    try:
        if render.chat:
            role = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(num_choices)]
            yield _sse(render.envelope(role, chunk=True))
        seen: set[int] = set()
        async for i, out in server.outputs(gens, firsts):
            choices = [c for c in (render.delta_choice(*t) for t in render.add(i, out, i not in seen)) if c is not None]
            seen.add(i)
            if choices:
                yield _sse(render.envelope(choices, chunk=True))
        if include_usage:
            final = render.envelope([], chunk=True)
            final["usage"] = render.usage()
            yield _sse(final)
    except Exception as exc:  # after the 200 went out (or a drain cut it): report in-band, like vLLM
        yield _sse(to_openai_error(exc, request_id=render.id).body())
    finally:
        await _close(gens)
    yield _sse("[DONE]")


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, metrics: EngineMetrics | None = None,
              limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app; /v1 routes need `Authorization: Bearer <api_key>` when api_key is set."""
    limits = limits or ServerLimits()
    server = OpenAIServer(engine, model_name, metrics or EngineMetrics.attach(engine, model_name), limits)
    app = FastAPI(title="distinfer OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.openai_server = server
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       max_header_bytes=limits.max_header_bytes)
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "distinfer",
                "root": model_name, "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card]}

    async def generation(request: Request, body: Any, chat: bool) -> Response:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:  # every refusal becomes an OpenAIError here: an exception left for Starlette is logged as a crash
            proto.check_unicode(body)  # first: no error message may echo a lone surrogate (e.g. the model name)
            server.check_model(body.model)
            return await _respond(server, request, body, chat, request_id)
        except Exception as exc:
            raise to_openai_error(exc, "messages" if chat else "prompt", request_id) from exc

    @router.post("/completions")
    async def completions(body: proto.CompletionRequest, request: Request) -> Response:
        return await generation(request, body, chat=False)

    @router.post("/chat/completions")
    async def chat_completions(body: proto.ChatCompletionRequest, request: Request) -> Response:
        return await generation(request, body, chat=True)

    app.include_router(router)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(proto.error_body(str(engine.dead_error), "service_unavailable", None, "engine_dead"), status_code=503)
        if getattr(engine, "is_draining", False):  # shutting down: load balancers should stop sending
            return JSONResponse(proto.error_body("server is draining", "service_unavailable", None, "engine_draining"),
                                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        payload, content_type = server.metrics.render()
        return Response(payload, media_type=content_type)

    return app
