"""Relaying requests between Ray Serve deployments: the multi-model ingress (ray_serve_multi.py) hands an
HTTP request to a model deployment's OpenAI app over a DeploymentHandle and streams its ASGI messages
back; gRPC refusals travel back as a GrpcStatus.

Model side: `run_asgi(app, call)` runs one request through an ASGI app and yields every message the app
sends (`http.response.start`, then each body chunk as it is produced). Closing the generator early (the
client went away, so the ingress cancelled its handle call) reports `http.disconnect` to the app, which
aborts the engine requests, as a disconnect does in `distinfer serve`.

Ingress side: `HttpCall.of(request, body)` captures a request; `RelayResponse` streams a handle's
messages to the client; `collect` gathers a whole (small) response.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from distinfer.serving.openai_errors import to_openai_error

logger = logging.getLogger(__name__)

APP_EXIT_GRACE_S = 10.0  # after a disconnect, how long the app may take to clean up before it is cancelled


@dataclass
class GrpcStatus:
    """A refused gRPC call relayed from a model deployment: the code and details to send."""

    code: grpc.StatusCode
    details: str


@dataclass
class HttpCall:
    """One HTTP request, whole (the body is read at the ingress, within its size limit)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    @classmethod
    def of(cls, request: Request, body: bytes) -> "HttpCall":
        client = (request.client.host, request.client.port) if request.client else None
        return cls(request.method, request.url.path, request.scope.get("query_string", b""),
                   list(request.scope.get("headers", [])), body, client)

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": self.headers,
                "client": self.client, "server": None, "state": {}}


async def run_asgi(app: Callable[[Scope, Receive, Send], Awaitable[None]], call: HttpCall) -> AsyncIterator[dict]:
    """Every ASGI message `app` sends for `call`, as it sends it (model side)."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(call.scope(), receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if messages.empty():
                    task.result()  # the app's own error, if it ended without answering
                    return
                continue
            message = getter.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        disconnected.set()  # over, or the caller went away: the app cleans up (aborts its requests)
        if not task.done():
            await asyncio.wait({task}, timeout=APP_EXIT_GRACE_S)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def collect(stream: AsyncIterator[dict]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of a relayed response, whole."""
    status, headers, body = 500, [], b""
    async for message in stream:
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")
    return status, headers, body


class RelayResponse(Response):
    """Streams a model deployment's ASGI messages to the client; a client that disconnects cancels the
    stream (and with it the model deployment's request). A failure before the response started is
    answered in OpenAI's error format."""

    def __init__(self, open_stream: Callable[[], Any]) -> None:
        super().__init__()
        self._open_stream = open_stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self._open_stream()
        started = False

        async def pump() -> None:
            nonlocal started
            async for message in stream:
                started = started or message["type"] == "http.response.start"
                await send(message)

        relay = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished = relay.done()
            for task in (relay, watcher):
                task.cancel()
            error = (await asyncio.gather(relay, watcher, return_exceptions=True))[0]
            if not finished:  # the client went away (or this call was cancelled): stop the model's request
                _cancel(stream)
        if isinstance(error, Exception) and not started:
            await to_openai_error(error).response()(scope, receive, send)
        elif isinstance(error, Exception):
            logger.warning("relayed response failed after it started: %r", error)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _cancel(stream: Any) -> None:
    cancel = getattr(stream, "cancel", None)  # a DeploymentResponseGenerator
    if cancel is not None:
        cancel()
