"""The serving process: one AsyncLLM behind the OpenAI HTTP API (uvicorn) and the gRPC API, in one
asyncio loop. `run_server` is what `distinfer serve` runs; `ServerThread` runs the same thing on a
background thread (tests, benchmarks).

Shutdown (SIGINT/SIGTERM, or `stop()`): the engine drains first — new requests get 503/UNAVAILABLE
while the ones in flight finish (bounded by drain_timeout_s) — then both listeners stop, then the
engine and its workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import uvicorn

from distinfer.engine.async_llm import AsyncLLM
from distinfer.serving.metrics import EngineMetrics
from distinfer.serving.openai_http import build_app

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServeOptions:
    """Everything `distinfer serve` takes besides the engine's own arguments."""

    model: str | None = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: pick a free port
    grpc_port: int | None = 50051  # None: no gRPC listener
    api_key: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    drain_timeout_s: float = 30.0
    log_level: str = "warning"

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else DEFAULT_MODEL_NAME


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the serving process drains the engine first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DistInferServer:
    """Both APIs over one engine, in the running asyncio loop."""

    def __init__(self, engine: AsyncLLM, options: ServeOptions) -> None:
        self.engine, self.options = engine, options
        self.metrics = EngineMetrics.attach(engine, options.model_name)
        self.app = build_app(engine, options.model_name, options.api_key, self.metrics)
        self.http_port = options.http_port
        self.grpc_port = options.grpc_port
        self._uvicorn: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc: Any = None

    async def start(self) -> None:
        opts = self.options
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((opts.host, opts.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=opts.log_level, ssl_certfile=opts.tls_cert_file,
                                ssl_keyfile=opts.tls_key_file, timeout_graceful_shutdown=5, lifespan="off")
        self._uvicorn = _Uvicorn(config)
        self._http_task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._http_task.done():
                self._http_task.result()  # raises the start-up error
                raise RuntimeError("HTTP server exited during start-up")
            await asyncio.sleep(0.02)
        if opts.grpc_port is not None:
            await self._start_grpc()
        scheme = "https" if opts.tls_cert_file else "http"
        logger.info("serving %s: HTTP %s://%s:%d/v1, gRPC %s", opts.model_name, scheme, opts.host, self.http_port,
                    f"{opts.host}:{self.grpc_port}" if self._grpc is not None else "off")

    async def _start_grpc(self) -> None:
        opts = self.options
        try:
            from distinfer.serving.grpc_server import start_grpc_server
        except ImportError as exc:
            logger.warning("gRPC API unavailable (%s); serving HTTP only", exc)
            self.grpc_port = None
            return
        if opts.grpc_port == 0:
            self.grpc_port = free_port(opts.host)
        self._grpc = await start_grpc_server(self.engine, opts.host, self.grpc_port, model_name=opts.model_name,
                                             api_key=opts.api_key, tls_cert_file=opts.tls_cert_file,
                                             tls_key_file=opts.tls_key_file)

    async def wait(self) -> None:
        """Until the HTTP server stops (stop() or a fatal error)."""
        if self._http_task is not None:
            await asyncio.shield(self._http_task)

    async def stop(self) -> None:
        """Drain the engine (bounded), then stop both listeners. The engine itself is left running."""
        logger.info("draining: refusing new requests, waiting up to %.0f s for %d in flight",
                    self.options.drain_timeout_s, self.engine.num_pending_requests)
        await self.engine.drain(self.options.drain_timeout_s)
        if self._grpc is not None:
            await self._grpc.stop(grace=5.0)
            self._grpc = None
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)


async def run_server(options: ServeOptions, on_ready: Callable[[DistInferServer], None] | None = None) -> None:
    """`distinfer serve`: load the engine, serve until SIGINT/SIGTERM, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info("loading %s", options.model or "the default model")
    engine = await asyncio.to_thread(AsyncLLM, options.model, **options.engine_kwargs)
    server = DistInferServer(engine, options)
    try:
        await server.start()
        if on_ready is not None:
            on_ready(server)
        waiter = asyncio.ensure_future(server.wait())
        await asyncio.wait({waiter, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        logger.info("shutting down")
        await server.stop()
    finally:
        await asyncio.to_thread(engine.shutdown)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class ServerThread:
    """A DistInferServer on a background thread with its own loop (tests, in-process benchmarks).

    `with ServerThread(engine, ServeOptions(http_port=0, grpc_port=0)) as srv: srv.http_url`
    The engine belongs to the caller (it is not shut down here).
    """

    def __init__(self, engine: AsyncLLM, options: ServeOptions) -> None:
        self.engine, self.options = engine, options
        self.loop = asyncio.new_event_loop()
        self.server: DistInferServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="distinfer-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        self.server = DistInferServer(self.engine, self.options)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=60)
        return self

    @property
    def http_url(self) -> str:
        assert self.server is not None
        return f"http://{self.options.host}:{self.server.http_port}"

    @property
    def grpc_target(self) -> str | None:
        assert self.server is not None
        return f"{self.options.host}:{self.server.grpc_port}" if self.server.grpc_port else None

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=self.options.drain_timeout_s + 30)
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
