"""gRPC server: distinfer.v1.InferenceService on grpc.aio, with health, reflection, auth and TLS.

    server = await start_grpc_server(engine, "0.0.0.0", 50051, model_name="smollm2")
    await server.wait_for_termination()

`engine` may also be an awaitable that resolves to the engine (e.g. `asyncio.to_thread(AsyncLLM, ...)`):
the server listens at once, health says NOT_SERVING and calls answer UNAVAILABLE until the model is
loaded. `serve_grpc` returns a `GrpcServerHandle` (bound port, graceful stop); `GrpcServerThread`
runs a server on a private event loop in a background thread, for synchronous programs and tests.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Coroutine, Sequence

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distinfer.serving.grpc_auth import BearerTokenInterceptor
from distinfer.serving.grpc_codec import safe_deserializer
from distinfer.serving.grpc_health_check import EngineHealthServicer
from distinfer.serving.grpc_servicer import SERVICE_NAME, EngineSlot, InferenceServicer
from distinfer.serving.limits import ServerLimits
from distinfer.v1 import inference_pb2 as pb

if TYPE_CHECKING:
    from distinfer.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
)


def _method_handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC of the proto, each decoding its request with `safe_deserializer`."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return handlers


def _server_credentials(cert_file: str | None, key_file: str | None) -> grpc.ServerCredentials | None:
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        raise ValueError("tls_cert_file and tls_key_file must be given together")
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


@dataclass
class GrpcServerHandle:
    """A started server: where it listens, its parts, and a graceful stop."""

    server: grpc.aio.Server
    host: str
    port: int
    servicer: InferenceServicer
    health: EngineHealthServicer
    tls: bool

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 5.0) -> None:
        """Health goes NOT_SERVING, then running calls get `grace` seconds before being cancelled."""
        await self.health.shutdown()
        await self.server.stop(grace)


async def serve_grpc(
    engine: "AsyncLLM | Awaitable[AsyncLLM]",
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    model_name: str,
    api_key: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    limits: ServerLimits | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> GrpcServerHandle:
    """Build, bind and start the server (port 0 picks a free one); see the module docstring."""
    if not model_name:
        raise ValueError("model_name must be a non-empty string")
    limits = limits or ServerLimits()
    credentials = _server_credentials(tls_cert_file, tls_key_file)
    interceptors = [BearerTokenInterceptor(api_key)] if api_key else []
    server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=limits.grpc_max_concurrent_rpcs,
                             options=[*DEFAULT_OPTIONS, *limits.grpc_server_options(), *options])
    slot = EngineSlot(engine)
    servicer = InferenceServicer(slot, model_name, limits)
    handlers = _method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = EngineHealthServicer([SERVICE_NAME], slot.is_serving)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    await health_servicer.refresh()
    health_servicer.start()
    logger.info("gRPC server listening on %s:%d (%s%s), model %r", host, bound, "TLS" if credentials else "plaintext",
                ", API key required" if api_key else "", model_name)
    return GrpcServerHandle(server, host, bound, servicer, health_servicer, credentials is not None)


async def start_grpc_server(
    engine: "AsyncLLM | Awaitable[AsyncLLM]",
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    model_name: str,
    api_key: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    limits: ServerLimits | None = None,
) -> grpc.aio.Server:
    """Start the server and return it; the caller awaits `wait_for_termination()` or `stop(grace)`."""
    handle = await serve_grpc(engine, host, port, model_name=model_name, api_key=api_key,
                              tls_cert_file=tls_cert_file, tls_key_file=tls_key_file, limits=limits)
    return handle.server


class GrpcServerThread:
    """A gRPC server on its own event loop in a daemon thread.

        with GrpcServerThread(engine, model_name="m") as server:
            Client(server.target).generate("Hello")
    """

    def __init__(self, engine: "AsyncLLM | Awaitable[AsyncLLM]", host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self._args = (engine, host, port)
        self._kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.handle: GrpcServerHandle | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="distinfer-grpc", daemon=True)

    @property
    def port(self) -> int:
        assert self.handle is not None, "server not started"
        return self.handle.port

    @property
    def target(self) -> str:
        assert self.handle is not None, "server not started"
        return self.handle.target

    def start(self, timeout_s: float = 60.0) -> "GrpcServerThread":
        self._thread.start()
        try:
            self.handle = self.call(serve_grpc(*self._args, **self._kwargs), timeout_s)
        except BaseException:
            self.stop()  # do not leak the loop thread when the server cannot start
            raise
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop (e.g. `engine.drain()`) and return its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    def stop(self, grace: float | None = 1.0) -> None:
        if self.handle is not None:
            self.call(self.handle.stop(grace))
            self.handle = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> "GrpcServerThread":
        return self.start() if self.handle is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
