"""The gRPC edge's limits on a real server over loopback (distinfer.client.Client and raw grpc): message
size (RESOURCE_EXHAUSTED), prompt characters and max_tokens beyond the context (INVALID_ARGUMENT naming
the field), the concurrent-RPC bound, a half-open client found by keepalive (its request aborted, its KV
freed), Abort scoped to the caller, and a retryable UNAVAILABLE with a retry hint while draining (last:
draining is permanent)."""
from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from distinfer import AsyncLLM
from distinfer.client import (
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from distinfer.client.errors import RETRY_AFTER_KEY, RETRYABLE_KEY
from distinfer.messages import EngineStats, RequestOutput
from distinfer.serving.limits import ServerLimits
from distinfer.serving.server import ServeOptions, ServerThread
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)
logger = logging.getLogger(__name__)

MAX_MODEL_LEN = 512
MESSAGE_BOUND = 1 << 20
CHAR_BOUND = 20_000
NO_RETRY = RetryPolicy(max_attempts=1)
LONG = {"max_tokens": 450, "ignore_eos": True, "temperature": 0}  # always cut short by the tests
STORY = "Tell me a very long story."


class StepRecorder:
    """A step callback: which engine requests produced output, finished (and why), or were aborted.
    With `step_delay_s` set it also slows every step down (an injected slow engine)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.step_delay_s = 0.0
        self.seen: list[str] = []
        self.finished: dict[str, str | None] = {}
        self.aborted: set[str] = set()

    def __call__(self, outputs: list[RequestOutput], stats: EngineStats, aborted: list[str]) -> None:
        with self.lock:
            for out in outputs:
                if out.request_id not in self.seen:
                    self.seen.append(out.request_id)
                if out.finished:
                    self.finished[out.request_id] = out.outputs[0].finish_reason if out.outputs else None
            self.aborted.update(aborted)
        if outputs and self.step_delay_s:
            time.sleep(self.step_delay_s)


@pytest.fixture(scope="module")
def recorder() -> StepRecorder:
    return StepRecorder()


@pytest.fixture(scope="module")
def engine(recorder: StepRecorder) -> Iterator[AsyncLLM]:
    engine = AsyncLLM(dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256)
    engine.add_step_callback(recorder)
    yield engine
    engine.shutdown()


def _serve(engine: AsyncLLM, limits: ServerLimits) -> ServerThread:
    return ServerThread(engine, ServeOptions(http_port=0, grpc_port=0, limits=limits, drain_timeout_s=5))


@pytest.fixture(scope="module")
def server(engine: AsyncLLM) -> Iterator[ServerThread]:
    """1 MiB messages, 20 000 prompt characters."""
    with _serve(engine, ServerLimits(grpc_max_message_bytes=MESSAGE_BOUND, max_prompt_chars=CHAR_BOUND)) as server:
        yield server


@pytest.fixture(scope="module")
def watchful(engine: AsyncLLM) -> Iterator[ServerThread]:
    """Keepalive pings every second, 1 s to answer."""
    with _serve(engine, ServerLimits(grpc_keepalive_time_s=1, grpc_keepalive_timeout_s=1)) as server:
        yield server


@pytest.fixture(scope="module")
def narrow(engine: AsyncLLM) -> Iterator[ServerThread]:
    """At most two RPCs at a time."""
    with _serve(engine, ServerLimits(grpc_max_concurrent_rpcs=2)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.grpc_target, timeout=60, retry=NO_RETRY) as client:
        yield client


def wait_idle(client: Client, timeout_s: float = 30.0) -> float:
    """Bounded wait until nothing runs and every KV block is free; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        load = client.server_info().load
        if load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks:
            return time.monotonic() - start
        time.sleep(0.05)
    load = client.server_info().load
    assert (load.num_running, load.num_waiting, load.num_free_blocks) == (0, 0, load.num_total_blocks)
    return time.monotonic() - start


# ---------------------------------------------------------------- size and context bounds


def test_message_over_the_bound_is_resource_exhausted(client):
    """A request larger than grpc_max_message_bytes is refused by grpc itself, before any decoding."""
    huge = "x" * (MESSAGE_BOUND + 1024)
    with pytest.raises(ResourceExhaustedError) as info:
        client.generate(huge, max_tokens=2)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(ResourceExhaustedError):
        client.tokenize(huge)
    assert len(client.generate("Hi", max_tokens=2).token_ids) == 2, "the server keeps serving"


def test_text_over_the_character_bound_is_invalid_argument(client):
    """Tokenize and Generate refuse a text one character over max_prompt_chars, naming `text`."""
    at_bound = ("hello world " * CHAR_BOUND)[:CHAR_BOUND]
    assert len(client.tokenize(at_bound).token_ids) > MAX_MODEL_LEN  # Tokenize does not need the context
    for call in (lambda text: client.tokenize(text), lambda text: client.generate(text, max_tokens=2)):
        with pytest.raises(InvalidArgumentError) as info:
            call(at_bound + "!")
        assert info.value.details.startswith("text has") and str(CHAR_BOUND) in info.value.details, info.value.details


def test_max_tokens_beyond_the_context_is_invalid_argument(client):
    """prompt + max_tokens may fill the context exactly; one token more is refused (no silent capping)."""
    room = 3
    ids = [42] * (MAX_MODEL_LEN - room)
    assert len(client.generate(ids, max_tokens=room, ignore_eos=True).token_ids) == room
    for prompt, max_tokens in ((ids, room + 1), ("Hi", MAX_MODEL_LEN)):
        with pytest.raises(InvalidArgumentError) as info:
            client.generate(prompt, max_tokens=max_tokens)
        assert info.value.details.startswith("sampling_params.max_tokens") and "max_model_len" in info.value.details


# ---------------------------------------------------------------- concurrency bound


def test_concurrent_rpc_bound(narrow, client):
    """Two streams held open fill the bound: a third call is RESOURCE_EXHAUSTED; once they are
    cancelled calls work again and every KV block is free."""
    with Client(narrow.grpc_target, timeout=60, retry=NO_RETRY) as small:
        streams = [small.generate_stream(f"{STORY} {i}", **LONG) for i in range(2)]
        for stream in streams:
            assert next(stream).token_ids
        with pytest.raises(ResourceExhaustedError) as info:
            small.generate("Hi", max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(ResourceExhaustedError):
            small.model_info()
        for stream in streams:
            stream.cancel()
        deadline = time.monotonic() + 30
        while True:  # the server counts a cancelled call out once its handler has finished
            try:
                assert len(small.generate("Hi", max_tokens=2).token_ids) == 2
                break
            except ResourceExhaustedError:
                assert time.monotonic() < deadline, "calls still refused 30 s after the streams were cancelled"
                time.sleep(0.05)
    wait_idle(client)


@pytest.fixture(scope="module")
def one_stream(engine: AsyncLLM) -> Iterator[ServerThread]:
    """One stream per connection (stopping a server drains the shared engine: only at module end)."""
    with _serve(engine, ServerLimits(grpc_max_concurrent_streams=1)) as server:
        yield server


def test_streams_per_connection_bound(one_stream, client):
    """grpc_max_concurrent_streams=1: a second call on the same connection waits for a free stream (its
    deadline passes) while a call on another connection is answered; once the first stream ends, the
    queued connection serves again."""
    with Client(one_stream.grpc_target, timeout=60, retry=NO_RETRY) as first, \
            Client(one_stream.grpc_target, timeout=60, retry=NO_RETRY) as other:
        stream = first.generate_stream(STORY, **LONG)
        assert next(stream).token_ids
        with pytest.raises(DeadlineExceededError):
            first.generate("Hi", max_tokens=2, timeout=2)
        assert len(other.generate("Hi", max_tokens=2).token_ids) == 2
        stream.cancel()
        assert len(first.generate("Hi", max_tokens=2).token_ids) == 2
    wait_idle(client)


# ---------------------------------------------------------------- half-open clients


class FreezableProxy:
    """A TCP proxy on loopback that can stop forwarding both ways while every socket stays open: the
    server sees a peer that neither closes nor answers (a half-open connection)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.frozen, self.closed = threading.Event(), threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                downstream, _ = self.listener.accept()
            except OSError:  # timeout, or closed
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)
                continue
            if not select.select([src], [], [], 0.1)[0]:
                continue
            try:
                data = src.recv(65536)
                if not data:
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for thread in self.threads:
            thread.join(timeout=5)
        for sock in [self.listener, *self.sockets]:
            sock.close()


def test_half_open_client_is_found_by_keepalive(watchful, client, recorder):
    """A client that stops answering mid-stream (no FIN, no RST) has its request aborted and its KV
    blocks freed within a bounded time, long before the request could have finished (steps are slowed
    to >= 20 ms, so its 450 tokens take >= 9 s on any machine)."""
    seen_before = len(recorder.seen)
    proxy = FreezableProxy(watchful.server.grpc_port)
    recorder.step_delay_s = 0.02
    try:
        with Client(f"127.0.0.1:{proxy.port}", timeout=120, retry=NO_RETRY) as far:
            stream = far.generate_stream(STORY, **LONG)
            tokens = sum(len(next(stream).token_ids) for _ in range(3))
            proxy.frozen.set()
            took = wait_idle(client, timeout_s=15)
            stream.cancel()
    finally:
        recorder.step_delay_s = 0.0
        proxy.close()
    logger.info("half-open client: request aborted and its KV freed %.2f s after the freeze", took)
    with recorder.lock:
        new = recorder.seen[seen_before:]
        assert len(new) == 1, new
        assert new[0] in recorder.aborted and recorder.finished.get(new[0]) is None, (recorder.finished, new)
    assert tokens >= 3


# ---------------------------------------------------------------- Abort is the caller's own


@pytest.mark.parametrize("key_a", [None, "alice"], ids=["a-by-address", "a-by-key"])
def test_abort_reaches_only_the_callers_requests(server, client, key_a):
    """B (another bearer token) can neither abort A's "same-id" nor collide with it; A can."""
    with Client(server.grpc_target, api_key=key_a, timeout=120, retry=NO_RETRY) as a, \
            Client(server.grpc_target, api_key="bob", timeout=120, retry=NO_RETRY) as b:
        stream_a = a.generate_stream(STORY, request_id="same-id", **LONG)
        next(stream_a)
        assert b.abort("same-id") is False
        after = [next(stream_a) for _ in range(3)]
        assert all(d.token_ids and d.finish_reason is None for d in after), "A's stream goes on"
        with b.generate_stream("Another story", request_id="same-id", **LONG) as stream_b:
            assert next(stream_b).request_id == "same-id"  # no ALREADY_EXISTS: B's ids are B's own
            assert a.abort("same-id") is True
            rest_a = list(stream_a)
            assert rest_a[-1].finish_reason == "abort" and rest_a[-1].usage is not None
            assert next(stream_b).finish_reason is None, "B's request is untouched by A's abort"
            assert b.abort("same-id") is True
            assert list(stream_b)[-1].finish_reason == "abort"
        assert a.abort("same-id") is False and b.abort("same-id") is False
    wait_idle(client)


# ---------------------------------------------------------------- draining (last: it is permanent)


def test_draining_is_retryable_unavailable_with_pushback(server, engine, client):
    """While the engine drains, Generate is UNAVAILABLE with trailing metadata saying it is retryable and
    when (grpc-retry-pushback-ms); health is NOT_SERVING; the SDK's retry waits for that hint."""
    asyncio.run_coroutine_threadsafe(engine.drain(0.1), server.loop).result(timeout=30)
    request = pb.GenerateRequest(text="Hi", sampling_params=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=30))
    error = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "draining" in error.details(), error.details()
    metadata = dict(error.trailing_metadata())
    assert metadata.get(RETRYABLE_KEY) == "true" and metadata.get(RETRY_AFTER_KEY) == "1000", metadata
    assert client.health() == "NOT_SERVING" and client.server_info().draining
    # The SDK retries it, waiting at least the server's hint (1 s) although its own backoff is 10 ms.
    retrying = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=5.0)
    with Client(server.grpc_target, timeout=30, retry=retrying) as sdk:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            sdk.generate("Hi", max_tokens=2)
        assert time.monotonic() - start >= 1.0
