"""What stands between a raw HTTP connection and the OpenAI app, so that no request can cost memory or
parsing time before it is known to be allowed and small enough:

- `HeaderLimitedH11Protocol`: uvicorn's h11 protocol, whose buffer for a request line and headers still
  incomplete is bounded (`h11_max_incomplete_event_size`): memory stays bounded, and past it the client
  gets 431, not a generic 400.
- `RequestGuard` (ASGI middleware): the exact header bound (431: h11 lets a head that arrived whole pass),
  then the API key, checked before any body byte is read (401), then the body, read with a bound (413,
  from Content-Length when given) before FastAPI parses it.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from distinfer.serving.auth import api_key_problem
from distinfer.serving.openai_protocol import error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_json(message: str, type_: str, code: str | int | None) -> bytes:
    """OpenAI's error body, encoded."""
    return json.dumps(error_body(message, type_, None, code)).encode()


class HeaderLimitedH11Protocol(H11Protocol):
    """Answers 431 when the request line and headers outgrow the configured bound."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        if limit is None or len(self.conn.trailing_data[0]) <= limit:
            super().send_400_response(msg)
            return
        logger.info("refused a request whose headers exceed %d bytes", limit)
        body = error_json(f"the request line and headers exceed the limit of {limit} bytes",
                          "invalid_request_error", "headers_too_large")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=431, headers=headers, reason=b"Request Header Fields Too Large"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class RequestGuard:
    """ASGI middleware: API key on `protected_prefix` paths first, then a bounded body read."""

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, max_body_bytes: int,
                 max_header_bytes: int, protected_prefix: str = "/v1") -> None:
        self.app, self.api_key, self.prefix = app, api_key, protected_prefix
        self.max_body_bytes, self.max_header_bytes = max_body_bytes, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        headers = dict(raw_headers)
        try:
            head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            if head + sum(len(k) + len(v) + 4 for k, v in raw_headers) > self.max_header_bytes:
                raise _Refused(431, error_json(f"the request line and headers exceed the limit of "
                                               f"{self.max_header_bytes} bytes", "invalid_request_error",
                                               "headers_too_large"))
            if self.api_key and scope["path"].startswith(self.prefix):
                problem = api_key_problem(headers.get(b"authorization"), self.api_key)
                if problem is not None:
                    raise _Refused(401, error_json(problem, "authentication_error", "invalid_api_key"))
            self._check_length(headers.get(b"content-length"))
            body = await self._read_body(receive)
        except _Refused as refused:
            await _respond(send, refused.status, refused.body)
            return
        if body is not None:  # None: the client left while sending
            await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> "_Refused":
        return _Refused(413, error_json(f"the request body exceeds the limit of {self.max_body_bytes} bytes",
                                        "invalid_request_error", "request_too_large"))

    def _check_length(self, value: bytes | None) -> None:
        if value is None:
            return
        if not value.isdigit():
            raise _Refused(400, error_json("the Content-Length header is not a number", "invalid_request_error",
                                           "bad_request"))
        if int(value) > self.max_body_bytes:
            raise self._too_large()

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when the client disconnected before sending all of it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Refused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then the connection's own events (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replay


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
