"""Errors of the OpenAI-compatible HTTP API: every failure becomes OpenAI's error shape with a status code
(400 bad input, 401, 404, 413, 429, 500, 503) and, where a retry can help, a Retry-After header.

Internal errors never send exception text to the client: they carry the request id, and the details go
to the server log under that id.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distinfer.errors import EngineDeadError, EngineDrainingError, QueueFullError, RequestFailedError
from distinfer.serving import openai_protocol as proto

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # Retry-After on 429 and on 503 while draining: another replica, or this one later


class ErrorResponse(JSONResponse):
    """An error body that renders whatever client text it echoes: non-ASCII is \\u-escaped, so a lone
    surrogate (valid in JSON, not in UTF-8) cannot make rendering fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return proto.error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return ErrorResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its requests were aborted."""


_PARAM_ALIASES = {"prompt_token_ids": "prompt", "request_id": None, "sampling_params": None}


def to_openai_error(exc: BaseException, prompt_param: str = "prompt", request_id: str | None = None) -> OpenAIError:
    """Map engine and validation errors onto HTTP status codes (400/429/500/503)."""
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
        return OpenAIError(429, str(exc), "rate_limit_error", None, "queue_full", RETRY_AFTER_S)
    if isinstance(exc, EngineDrainingError):
        return OpenAIError(503, str(exc), "service_unavailable", None, "engine_draining", RETRY_AFTER_S)
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc), "service_unavailable", None, "engine_dead")
    if isinstance(exc, RequestFailedError):  # its message is ours and safe to show
        return OpenAIError(500, str(exc), "internal_server_error", None, "request_failed")
    request_id = request_id or f"err-{uuid.uuid4().hex[:16]}"
    logger.error("internal error in request %s", request_id, exc_info=exc)
    return OpenAIError(500, f"internal error (request id {request_id}); the details are in the server log",
                       "internal_server_error", None, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
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
            param, message = None, "request body must be a JSON object in UTF-8 (Content-Type: application/json)"
        return ErrorResponse(proto.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorResponse(proto.error_body(str(exc.detail), "invalid_request_error", None, exc.status_code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return to_openai_error(exc).response()
