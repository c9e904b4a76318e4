"""Bearer-token authentication for the gRPC server (`authorization: Bearer <api key>` metadata),
parsed as on every other front end (serving/auth.py)."""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Sequence

import grpc

from distinfer.serving.auth import api_key_problem

logger = logging.getLogger(__name__)

# Probes (Kubernetes gRPC probes, load balancers) cannot send credentials.
DEFAULT_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny_handler(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""
    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def authorization_value(metadata: Sequence[tuple[str, Any]] | None) -> str | bytes | None:
    """The first `authorization` metadata value, if any."""
    return next((v for k, v in (metadata or ()) if k == "authorization"), None)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call outside `exempt_prefixes` that lacks `authorization: Bearer <api_key>`."""

    def __init__(self, api_key: str, exempt_prefixes: Sequence[str] = DEFAULT_EXEMPT_PREFIXES) -> None:
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self._key = api_key
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        problem = api_key_problem(authorization_value(handler_call_details.invocation_metadata), self._key)
        if problem is None:
            return handler
        logger.info("refused %s: %s", handler_call_details.method, problem)
        return _deny_handler(handler, problem)
