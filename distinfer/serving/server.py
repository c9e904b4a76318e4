"""The serving process: one AsyncLLM (or, with `--instances N`, a RouterEngine over N engine instances)
behind the OpenAI HTTP API (uvicorn) and the gRPC API, in one asyncio loop. `run_server` is what
`distinfer serve` runs; `ServerThread` runs the same thing on a background thread (tests, benchmarks).

Shutdown (SIGINT/SIGTERM, or `stop()`) fits in `drain_timeout_s` in all, so that it ends inside a
Kubernetes grace period: the engine drains first (new requests get 503 / UNAVAILABLE with a retry hint,
health turns NOT_SERVING) while the requests in flight finish; when the drain time runs out the rest are
cut (an SSE stream gets an error event and [DONE], a gRPC stream a retryable UNAVAILABLE); then both
listeners stop, then the engine and its workers. A second signal exits at once. A dead engine (a worker
died, or a step hung past the step timeout) makes the process exit with status 1, so that its
supervisor (Kubernetes, systemd, Ray) restarts it.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import uvicorn

from distinfer.engine.async_llm import AsyncLLM
from distinfer.errors import EngineDrainingError
from distinfer.router.policies import DEFAULT_DISPATCH_POLICY, check_dispatch_policy, check_pd_split
from distinfer.router.rebalance import DEFAULT_MIGRATION_POLICY, check_migration_policy, check_migration_transport
from distinfer.serving.http_guard import HeaderLimitedH11Protocol
from distinfer.serving.limits import ServerLimits
from distinfer.serving.metrics import EngineMetrics
from distinfer.serving.openai_http import build_app

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EXIT_OK, EXIT_ENGINE_DEAD = 0, 1
_CLOSE_RESERVE_S = 3.0  # of the drain budget, kept for cutting streams and closing the listeners
_TCP_KEEPALIVE = ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3)) \
    if hasattr(socket, "TCP_KEEPIDLE") else ()


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
    drain_timeout_s: float = 25.0  # the whole shutdown: drain, cut what is left, close the listeners
    limits: ServerLimits = field(default_factory=ServerLimits)
    log_level: str = "warning"
    num_instances: int = 1  # > 1: that many engine instances behind a router (distinfer.router)
    dispatch_policy: str | None = None  # the router's; only with num_instances > 1 (default least_load)
    prefill_instances: int = 0  # prefill/decode disaggregation: P prefill + D decode instances
    decode_instances: int = 0
    migration_policy: str | None = None  # moves the router starts on its own (default none)
    migration_transport: str = "object_store"  # how KV travels when a request moves ("p2p": gloo links)

    def __post_init__(self) -> None:
        if not self.drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")
        self.num_instances = check_instances(self.num_instances, self.dispatch_policy, self.prefill_instances,
                                             self.decode_instances, self.migration_policy)
        check_migration_transport(self.migration_transport)

    @property
    def router_kwargs(self) -> dict[str, Any]:
        return router_kwargs_of(self)

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else DEFAULT_MODEL_NAME


def check_instances(num_instances: int, dispatch_policy: str | None, prefill_instances: int = 0,
                    decode_instances: int = 0, migration_policy: str | None = None) -> int:
    """--instances / --dispatch-policy / --prefill-instances / --decode-instances (and the Serve app's
    fields of the same names); returns the number of instances (P + D under disaggregation)."""
    if isinstance(num_instances, bool) or not isinstance(num_instances, int) or num_instances < 1:
        raise ValueError(f"the number of instances (--instances, num_instances) must be an integer >= 1, "
                         f"got {num_instances!r}")
    total = check_pd_split(prefill_instances, decode_instances)
    if total:
        if num_instances not in (1, total):
            raise ValueError(f"--instances {num_instances} does not match --prefill-instances {prefill_instances} "
                             f"+ --decode-instances {decode_instances}; give only the latter two")
        num_instances = total
    for what, name, check in (("dispatch", dispatch_policy, check_dispatch_policy),
                              ("migration", migration_policy, check_migration_policy)):
        if name is not None:
            if num_instances == 1:
                raise ValueError(f"a {what} policy needs more than one instance (--instances / num_instances > 1)")
            check(name)
    return num_instances


def make_engine(model: str | None, engine_kwargs: dict[str, Any], num_instances: int = 1,
                dispatch_policy: str | None = None, prefill_instances: int = 0, decode_instances: int = 0,
                migration_policy: str | None = None, migration_transport: str = "object_store") -> Any:
    """One instance: an AsyncLLM in this process. More: a RouterEngine over that many instances."""
    if num_instances == 1:
        return AsyncLLM(model, **engine_kwargs)
    from distinfer.router.client import RouterEngine  # Ray is imported only here
    from distinfer.router.migration import MigrationConfig

    return RouterEngine(model, num_instances=num_instances, dispatch_policy=dispatch_policy or DEFAULT_DISPATCH_POLICY,
                        prefill_instances=prefill_instances, decode_instances=decode_instances,
                        migration_policy=migration_policy or DEFAULT_MIGRATION_POLICY,
                        migration=MigrationConfig(transport=migration_transport), **engine_kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_exposed(options: ServeOptions) -> None:
    """Serving off loopback without a key, or sending a key in clear text, deserves a loud warning."""
    if is_loopback(options.host):
        return
    if not options.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(give --api-key-file or DISTINFER_API_KEY)", options.host)
    elif not options.tls_cert_file:
        logger.warning("serving on %s with an API key but without TLS: the key crosses the network in clear "
                       "text (give --tls-cert and --tls-key, or terminate TLS in front of the server)", options.host)


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
        self.app = build_app(engine, options.model_name, options.api_key, self.metrics, options.limits)
        self.http_port = options.http_port
        self.grpc_port = options.grpc_port
        self._uvicorn: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc: Any = None

    async def start(self) -> None:
        opts = self.options
        warn_if_exposed(opts)
        # proto IPPROTO_TCP (not 0): asyncio then sets TCP_NODELAY on every accepted connection. Without it
        # Nagle held each response's body (and each SSE event) behind the client's delayed ACK, ~40 ms.
        sock = socket.socket(socket.AF_INET6 if ":" in opts.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit TCP keepalive: a vanished client is found and its requests aborted.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _TCP_KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        sock.bind((opts.host, opts.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=opts.log_level, ssl_certfile=opts.tls_cert_file,
                                ssl_keyfile=opts.tls_key_file, lifespan="off", http=HeaderLimitedH11Protocol,
                                h11_max_incomplete_event_size=opts.limits.max_header_bytes,
                                # uvicorn refuses once connections >= the limit, counting the new one too
                                limit_concurrency=opts.limits.max_http_connections + 1, timeout_graceful_shutdown=1)
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
            from distinfer.serving.grpc_server import serve_grpc
        except ImportError as exc:
            logger.warning("gRPC API unavailable (%s); serving HTTP only", exc)
            self.grpc_port = None
            return
        if opts.grpc_port == 0:
            self.grpc_port = free_port(opts.host)
        self._grpc = await serve_grpc(self.engine, opts.host, self.grpc_port, model_name=opts.model_name,
                                      api_key=opts.api_key, tls_cert_file=opts.tls_cert_file,
                                      tls_key_file=opts.tls_key_file, limits=opts.limits)

    async def wait(self) -> None:
        """Until the HTTP server stops (stop() or a fatal error)."""
        if self._http_task is not None:
            await asyncio.shield(self._http_task)

    async def stop(self) -> None:
        """Drain the engine, cut what is left when the budget runs out, stop both listeners; all within
        drain_timeout_s. The engine itself is left running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.drain_timeout_s
        drain_s = max(0.0, self.options.drain_timeout_s - min(_CLOSE_RESERVE_S, self.options.drain_timeout_s / 3))
        logger.info("draining: refusing new requests, waiting up to %.1f s for %d in flight", drain_s,
                    self.engine.num_pending_requests)
        await self.engine.drain(drain_s)
        cut = self.engine.abort_all(EngineDrainingError(
            f"the server shut down before this request finished (drain time {self.options.drain_timeout_s:g} s); "
            "retry it on another replica"))
        if cut:
            logger.warning("drain time ran out: cut %d requests", cut)
            await asyncio.sleep(0.1)  # let the streams send their final error event
        remaining = max(0.5, deadline - loop.time())
        if self._grpc is not None:
            await self._grpc.stop(grace=remaining / 2)
            self._grpc = None
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await asyncio.wait({self._http_task}, timeout=max(0.5, deadline - loop.time()))
            self._http_task.cancel()
            await asyncio.gather(self._http_task, return_exceptions=True)


async def _until_dead(engine: AsyncLLM, poll_s: float = 0.25) -> None:
    while not engine.is_dead:
        await asyncio.sleep(poll_s)


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once (128 + signal)."""
    def on_signal(sig: int) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now without finishing the shutdown", signal.Signals(sig).name)
            logging.shutdown()
            os._exit(128 + sig)
        logger.info("%s: shutting down (a second signal exits at once)", signal.Signals(sig).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def run_server(options: ServeOptions, on_ready: Callable[[DistInferServer], None] | None = None,
                     handle_signals: bool = True) -> int:
    """`distinfer serve`: load the engine, serve until a signal or the engine's death, shut down;
    returns the exit status (0, or 1 when the engine died)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if handle_signals:
        _install_signal_handlers(loop, stop)
    logger.info("loading %s", options.model or "the default model")
    engine = await asyncio.to_thread(make_engine, options.model, options.engine_kwargs, **options.router_kwargs)
    if handle_signals:
        # Again: starting Ray installs abseil's failure-signal handler over ours for SIGTERM, which
        # aborts the process (SIGABRT, exit 134) 3 s after the signal, in the middle of the drain.
        _install_signal_handlers(loop, stop)
    server = DistInferServer(engine, options)
    try:
        await server.start()
        if on_ready is not None:
            on_ready(server)
        waits = {asyncio.ensure_future(server.wait()), asyncio.ensure_future(stop.wait()),
                 asyncio.ensure_future(_until_dead(engine))}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if engine.is_dead:
            logger.error("the engine is dead (%s); stopping so that a supervisor restarts the server", engine.dead_error)
        else:
            logger.info("shutting down")
        await server.stop()
    finally:
        await asyncio.to_thread(engine.shutdown)
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return EXIT_ENGINE_DEAD if engine.is_dead else EXIT_OK


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


def router_kwargs_of(options: Any) -> dict[str, Any]:
    """RouterEngine's keywords from the router fields that ServeOptions and the Serve app's args share."""
    return dict(num_instances=options.num_instances, dispatch_policy=options.dispatch_policy,
                prefill_instances=options.prefill_instances, decode_instances=options.decode_instances,
                migration_policy=options.migration_policy, migration_transport=options.migration_transport)
