"""OpenAI-compatible HTTP API over AsyncLLM: /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics.

A thin adapter: bodies are validated by pydantic (openai_protocol) and SamplingParams, errors come
back in OpenAI's shape with the offending field in `param`. Every request waits for its first output
before answering, so refusals (bad prompt, queue full, engine dead) get their own status code even
when streaming; a client that disconnects aborts its requests, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distinfer.engine.async_llm import AsyncLLM
from distinfer.engine.scheduler import QueueFullError
from distinfer.executor.base import EngineDeadError, EngineDrainingError
from distinfer.messages import RequestOutput
from distinfer.sampling_params import SamplingParams
from distinfer.serving import openai_protocol as proto
from distinfer.serving.metrics import EngineMetrics
from distinfer.serving.validation import ServingLimits

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(proto.error_body(self.message, self.type, self.param, self.code), status_code=self.status)


_PARAM_ALIASES = {"prompt_token_ids": "prompt", "request_id": None, "sampling_params": None}


def to_openai_error(exc: BaseException, prompt_param: str = "prompt") -> OpenAIError:
    """Map engine and validation errors onto HTTP status codes (400/429/503/500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ClientDisconnected):
        return OpenAIError(499, "client disconnected", "client_closed_request")
    if isinstance(exc, proto.OpenAIRequestError):
        return OpenAIError(400, str(exc), "invalid_request_error", exc.param)
    if isinstance(exc, ValueError):  # validation, SamplingParams and the input processor name the field first
        message = str(exc)
        param: str | None = getattr(exc, "field", None) or message.split(" ", 1)[0]
        param = _PARAM_ALIASES.get(param, param) if param.isidentifier() else None
        return OpenAIError(400, message, "invalid_request_error", prompt_param if param == "prompt" else param)
    if isinstance(exc, QueueFullError):
        return OpenAIError(429, str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, (EngineDeadError, EngineDrainingError)):
        code = "engine_dead" if isinstance(exc, EngineDeadError) else "engine_draining"
        return OpenAIError(503, str(exc), "service_unavailable", None, code)
    logger.exception("internal error", exc_info=exc)
    return OpenAIError(500, f"internal error: {type(exc).__name__}", "internal_server_error")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its requests were aborted."""


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

    def __init__(self, engine: AsyncLLM, model_name: str, metrics: EngineMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.created = int(time.time())
        self.limits = ServingLimits(engine.engine.hf_config.vocab_size, engine.engine.max_model_len)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                              "invalid_request_error", "model", "model_not_found")

    def chat_prompt(self, body: proto.ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", "invalid_request_error", "messages")
        try:
            ids = tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=body.add_generation_prompt, tokenize=True)
        except proto.OpenAIRequestError:
            raise
        except Exception as exc:  # jinja raise_exception, e.g. roles out of order
            raise OpenAIError(400, f"messages could not be rendered by the chat template: {exc}", "invalid_request_error", "messages") from exc
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
        except Exception:  # already failed; its abort has been sent
            pass


async def _respond(server: OpenAIServer, request: Request, body: Any, prompts: list[Any], chat: bool) -> Response:
    params = body.to_sampling_params(server.limits)
    prefix = "chatcmpl" if chat else "cmpl"
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    num_logprobs = params.logprobs
    render = proto.ResponseBuilder(server.model_name, chat, request_id, params.n, num_logprobs)
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
    except Exception as exc:  # after the 200 went out: report in-band, like vLLM
        error = to_openai_error(exc)
        yield _sse(proto.error_body(error.message, error.type, error.param, error.code))
    finally:
        await _close(gens)
    yield _sse("[DONE]")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # Union members add their type to the path (prompt.str, prompt.list[int].0): keep the field.
        param = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float")) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "json_invalid" or (not loc and first.get("type") in ("model_attributes_type", "dict_type")):
            param, message = None, "request body must be a JSON object in UTF-8"
        return JSONResponse(proto.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(proto.error_body(str(exc.detail), "invalid_request_error", None, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return to_openai_error(exc).response()


def _auth_dependency(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected):
            raise OpenAIError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                              "authentication_error", None, "invalid_api_key")

    return check


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, metrics: EngineMetrics | None = None) -> FastAPI:
    """The FastAPI app; /v1 routes need `Authorization: Bearer <api_key>` when api_key is set."""
    server = OpenAIServer(engine, model_name, metrics or EngineMetrics.attach(engine, model_name))
    app = FastAPI(title="distinfer OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.openai_server = server
    _install_error_handlers(app)
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(api_key))] if api_key else [])

    @router.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "distinfer",
                "root": model_name, "max_model_len": engine.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @router.post("/completions")
    async def completions(body: proto.CompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        try:
            return await _respond(server, request, body, body.prompts(), chat=False)
        except Exception as exc:
            raise to_openai_error(exc) from exc

    @router.post("/chat/completions")
    async def chat_completions(body: proto.ChatCompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        try:
            return await _respond(server, request, body, [server.chat_prompt(body)], chat=True)
        except Exception as exc:
            raise to_openai_error(exc, prompt_param="messages") from exc

    app.include_router(router)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(proto.error_body(str(engine.dead_error), "service_unavailable", None, "engine_dead"), status_code=503)
        if getattr(engine, "is_draining", False):  # shutting down: load balancers should stop sending
            return JSONResponse(proto.error_body("server is draining", "service_unavailable", None, "engine_draining"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        payload, content_type = server.metrics.render()
        return Response(payload, media_type=content_type)

    return app
