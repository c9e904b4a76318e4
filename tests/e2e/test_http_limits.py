"""The HTTP edge's limits on a real server over loopback (httpx and raw sockets): body (413) and header
(431) bounds, the API key checked before the body is read (401) and parsed like gRPC parses it, prompt
characters, max_tokens beyond the context and lone surrogates (400 naming the field), an event loop that
keeps answering /health while huge prompts are tokenized (HTTP and gRPC), and 503 + Retry-After while
draining (last: draining is permanent)."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest

from distinfer import AsyncLLM
from distinfer.client import Client, InvalidArgumentError
from distinfer.serving.limits import ServerLimits
from distinfer.serving.server import ServeOptions, ServerThread
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(240)
logger = logging.getLogger(__name__)

KEY = "s3cret-key"
MAX_MODEL_LEN = 512
BODY_BOUND = 64 << 10
HEADER_BOUND = 8 << 10
CHAR_BOUND = 2000
GUARDED = ServerLimits(max_body_bytes=BODY_BOUND, max_header_bytes=HEADER_BOUND, max_prompt_chars=CHAR_BOUND)
ROOMY = ServerLimits(max_body_bytes=32 << 20, max_prompt_chars=30_000_000, grpc_max_message_bytes=32 << 20)
# Tokenizing 24 MiB takes 15-30 s on a 2-core machine; a few MiB already takes seconds, which is what a
# blocked loop would show as /health latency.
HUGE_TEXT = ("hello world " * (1 << 20))[: 4 << 20]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncLLM]:
    engine = AsyncLLM(dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def guarded(engine: AsyncLLM) -> Iterator[ServerThread]:
    """API key, 64 KiB bodies, 8 KiB heads, 2000 prompt characters."""
    options = ServeOptions(http_port=0, grpc_port=0, api_key=KEY, limits=GUARDED, drain_timeout_s=5)
    with ServerThread(engine, options) as server:
        yield server


@pytest.fixture(scope="module")
def roomy(engine: AsyncLLM) -> Iterator[ServerThread]:
    """No key; 32 MiB bodies and gRPC messages, 30 M prompt characters: huge prompts reach the tokenizer."""
    with ServerThread(engine, ServeOptions(http_port=0, grpc_port=0, limits=ROOMY, drain_timeout_s=5)) as server:
        yield server


# ---------------------------------------------------------------- raw HTTP


def _connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _send(sock: socket.socket, data: bytes) -> bool:
    """False once the server has closed the connection (it answered before reading everything)."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response; socket.timeout (30 s) when none comes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _head(path: str, *extra: str, method: str = "POST") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "", ""]).encode()


def _error(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]


def _completion(max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    return {"prompt": "Hi", "max_tokens": max_tokens, "temperature": 0, **extra}


# ---------------------------------------------------------------- 413 / 431


def test_content_length_over_the_bound_is_413_before_the_body_is_sent(guarded):
    """The 413 comes back although no body byte was sent: the bound is checked on Content-Length."""
    with _connect(guarded) as sock:
        sock.sendall(_head("/v1/completions", f"Authorization: Bearer {KEY}", "Content-Type: application/json",
                           f"Content-Length: {100 << 20}"))
        status, headers, body = _read_response(sock)
    assert status == 413 and _error(body)["code"] == "request_too_large", body
    assert str(BODY_BOUND) in _error(body)["message"] and headers.get("connection") == "close"


def test_chunked_body_growing_past_the_bound_is_413(guarded):
    """No Content-Length: the body is counted as it streams in, and refused once past the bound."""
    with _connect(guarded) as sock:
        sock.sendall(_head("/v1/completions", f"Authorization: Bearer {KEY}", "Content-Type: application/json",
                           "Transfer-Encoding: chunked"))
        piece = b"x" * (16 << 10)
        sent = 0
        while sent <= BODY_BOUND + len(piece) and _send(sock, b"%x\r\n%s\r\n" % (len(piece), piece)):
            sent += len(piece)
            time.sleep(0.01)
        status, _, body = _read_response(sock)  # the body never ended: the server answered mid-stream
    assert status == 413 and _error(body)["code"] == "request_too_large", body


def _padded_body(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON whitespace as padding)."""
    body = json.dumps(_completion()).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_at_the_bound_is_accepted_and_one_byte_more_is_413(guarded, chunked):
    def post(payload: bytes) -> httpx.Response:
        content: Any = iter([payload[: len(payload) // 2], payload[len(payload) // 2:]]) if chunked else payload
        return httpx.post(guarded.http_url + "/v1/completions", content=content, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})

    ok = post(_padded_body(BODY_BOUND))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
    over = post(_padded_body(BODY_BOUND + 1))
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"


@pytest.fixture(scope="module")
def two_connections(engine: AsyncLLM) -> Iterator[ServerThread]:
    """At most two HTTP connections (stopping a server drains the shared engine: only at module end)."""
    options = ServeOptions(http_port=0, grpc_port=None, limits=ServerLimits(max_http_connections=2), drain_timeout_s=5)
    with ServerThread(engine, options) as server:
        yield server


def test_connections_over_the_bound_get_503(two_connections):
    """max_http_connections=2: with two connections open, a request on a third is answered 503; once they
    close, requests are served again."""
    server = two_connections
    held = [_connect(server) for _ in range(2)]
    for sock in held:  # both connections are accepted and served
        assert _send(sock, _head("/health", method="GET"))
        assert _read_response(sock)[0] == 200
    third = _connect(server)
    assert _send(third, _head("/health", method="GET"))
    assert _read_response(third)[0] == 503
    for sock in [third, *held]:
        sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.http_url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "still refused after the connections closed"
        time.sleep(0.05)


def test_connections_are_tcp_nodelay(guarded):
    """Every accepted connection has Nagle off: otherwise a response's body (and every SSE event) waits
    behind the client's delayed ACK (~40 ms per small response; benchmarks/http_latency.py)."""
    sock = _connect(guarded)
    assert _send(sock, _head("/health", method="GET"))
    assert _read_response(sock)[0] == 200
    connections = list(guarded.server._uvicorn.server_state.connections)
    assert connections
    for protocol in connections:
        server_side = protocol.transport.get_extra_info("socket")
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    sock.close()


def test_head_over_the_bound_sent_at_once_is_431(guarded):
    small = httpx.get(guarded.http_url + "/health", headers={"X-Pad": "a" * (HEADER_BOUND - 2048)}, timeout=30)
    assert small.status_code == 200
    big = httpx.get(guarded.http_url + "/health", headers={"X-Pad": "a" * HEADER_BOUND}, timeout=30)
    assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large", big.text


def test_head_over_the_bound_trickled_is_431(guarded):
    """Sent in small pieces, the head is refused while still incomplete (its buffer is bounded)."""
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
        for _ in range(2 * HEADER_BOUND // 512):
            if not _send(sock, b"a" * 512):
                break
            time.sleep(0.005)
        status, _, body = _read_response(sock)
    assert status == 431 and _error(body)["code"] == "headers_too_large", body


# ---------------------------------------------------------------- API key


def test_no_key_is_401_before_parsing_or_reading_the_body(guarded):
    """Malformed JSON and an over-bound body without the key both get 401: auth comes first."""
    url = guarded.http_url + "/v1/completions"
    malformed = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(url, content=b"{not json", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    with _connect(guarded) as sock:  # 100 MiB announced, nothing sent: answered all the same
        sock.sendall(_head("/v1/completions", "Content-Type: application/json", f"Content-Length: {100 << 20}"))
        status, _, body = _read_response(sock)
    assert status == 401 and _error(body)["type"] == "authentication_error", body
    keyed = httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert keyed.status_code == 400, "with the key, the same body reaches the parser"


# (Authorization value, accepted). grpcio cannot send tabs in metadata, so those are HTTP only.
SPELLINGS = [
    (f"Bearer {KEY}", True), (f"bearer {KEY}", True), (f"BEARER {KEY}", True), (f"Bearer    {KEY}", True),
    (f"   Bearer {KEY}   ", True), (f"Bearer\t{KEY}", True), (f"bearer \t {KEY}\t", True),
    (f"Basic {KEY}", False), (f"Bearer{KEY}", False), (KEY, False), ("Bearer", False), ("Bearer   ", False),
    (f"Bearer {KEY} extra", False), (f"Bearer {KEY}x", False), (f"Bearer {KEY.upper()}", False),
]


@pytest.mark.parametrize("value,accepted", SPELLINGS, ids=[repr(v) for v, _ in SPELLINGS])
def test_bearer_spelling_is_parsed_like_grpc(guarded, value, accepted):
    """The same header value passes or fails on HTTP and on gRPC (one parser for both). Sent on a raw
    socket: HTTP clients refuse to send surrounding whitespace."""
    with _connect(guarded) as sock:
        sock.sendall(_head("/v1/models", f"Authorization: {value}", method="GET"))
        status, _, body = _read_response(sock)
    assert status == (200 if accepted else 401), body
    if "\t" in value:
        return
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        try:
            pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                                                metadata=(("authorization", value),))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    assert code == (grpc.StatusCode.OK if accepted else grpc.StatusCode.UNAUTHENTICATED), code


# ---------------------------------------------------------------- 400 naming the field


def _post(server: ServerThread, endpoint: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.http_url}/v1/{endpoint}", content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})


def _assert_400(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert all(w in error["message"] for w in words), error["message"]


def test_prompt_characters_over_the_bound_are_400(guarded):
    at_bound = ("hello world " * CHAR_BOUND)[:CHAR_BOUND]  # ~340 tokens: fits the context
    assert _post(guarded, "completions", _completion(prompt=at_bound)).status_code == 200
    _assert_400(_post(guarded, "completions", _completion(prompt=at_bound + "!")), "prompt", "characters")
    messages = [{"role": "system", "content": "x" * (CHAR_BOUND // 2)}, {"role": "user", "content": "y" * (CHAR_BOUND // 2 + 1)}]
    _assert_400(_post(guarded, "chat/completions", {"messages": messages, "max_tokens": 2}), "messages", "characters")


def test_max_tokens_beyond_the_context_is_400(guarded):
    room = 12
    ids = [42] * (MAX_MODEL_LEN - room)
    fits = _post(guarded, "completions", {"prompt": ids, "max_tokens": room, "ignore_eos": True, "temperature": 0})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == room, fits.text
    _assert_400(_post(guarded, "completions", {"prompt": ids, "max_tokens": room + 1}), "max_tokens", "max_model_len")
    _assert_400(_post(guarded, "completions", _completion(max_tokens=MAX_MODEL_LEN)), "max_tokens")
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    _assert_400(_post(guarded, "chat/completions", {**chat, "max_tokens": MAX_MODEL_LEN}), "max_tokens")
    _assert_400(_post(guarded, "chat/completions", {**chat, "max_completion_tokens": MAX_MODEL_LEN}),
                "max_completion_tokens", "max_completion_tokens")


SURROGATES = [
    ("completions", rb'{"prompt": "caf\ud800e", "max_tokens": 2}', "prompt"),
    ("completions", rb'{"prompt": ["ok", "\udfff"], "max_tokens": 2}', "prompt[1]"),
    ("completions", rb'{"prompt": "Hi", "max_tokens": 2, "stop": "a\ud800"}', "stop"),
    ("completions", rb'{"prompt": "Hi", "max_tokens": 2, "stop": ["ok", "\ud800"]}', "stop[1]"),
    ("chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}',
     "messages[0].content"),
    ("chat/completions", rb'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stop": "\udc00"}',
     "stop"),
]


@pytest.mark.parametrize("endpoint,raw,param", SURROGATES, ids=[p for *_, p in SURROGATES])
def test_lone_surrogate_is_400_naming_the_field(guarded, engine, endpoint, raw, param):
    _assert_400(_post(guarded, endpoint, raw), param, "Unicode")
    assert not engine.is_dead and _post(guarded, "completions", _completion()).status_code == 200


# ---------------------------------------------------------------- the event loop keeps serving


def _health_latencies_while(server: ServerThread, work: Callable[[], Any]) -> tuple[Any, float, list[float]]:
    """Run `work` while another client polls GET /health every 50 ms: (its result, its seconds, latencies)."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.http_url, timeout=60) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - start)
                done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.2)  # the poller is connected and polling
    start = time.monotonic()
    try:
        result = work()
    finally:
        elapsed = time.monotonic() - start
        done.set()
        poller.join(timeout=60)
    return result, elapsed, latencies


def _http_huge_prompt(server: ServerThread) -> Any:
    response = httpx.post(server.http_url + "/v1/completions", timeout=300,
                          content=json.dumps({"prompt": HUGE_TEXT, "max_tokens": 2}).encode(),
                          headers={"Content-Type": "application/json"})
    _assert_400(response, "prompt", "tokens long", "max_model_len")


def _grpc_huge_generate(server: ServerThread) -> Any:
    with Client(server.grpc_target, timeout=300) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate(HUGE_TEXT, max_tokens=2)
    assert info.value.details.startswith("text is") and "max_model_len" in info.value.details, info.value.details


def _grpc_huge_tokenize(server: ServerThread) -> Any:
    with Client(server.grpc_target, timeout=300) as client:
        result = client.tokenize(HUGE_TEXT)
    assert len(result.token_ids) == len(result.tokens) > 100 * MAX_MODEL_LEN


@pytest.mark.parametrize("work", [_http_huge_prompt, _grpc_huge_generate, _grpc_huge_tokenize],
                         ids=["http-completion", "grpc-generate", "grpc-tokenize"])
def test_huge_prompt_does_not_block_the_event_loop(roomy, work):
    """While a multi-MiB prompt is tokenized, /health (same event loop) keeps answering: its worst latency
    stays far below the time the big request took (a blocked loop would make them about equal)."""
    _, elapsed, latencies = _health_latencies_while(roomy, lambda: work(roomy))
    worst = max(latencies)
    figures = f"{work.__name__}: big request {elapsed:.2f} s, {len(latencies)} /health polls, worst {worst:.3f} s"
    logger.info(figures)
    assert len(latencies) >= 5, figures
    assert worst < 1.0 and worst < elapsed / 3, figures


# ---------------------------------------------------------------- draining (last: it is permanent)


def test_draining_is_503_with_retry_after(guarded, roomy, engine):
    """Once the engine drains, new requests get 503 engine_draining with Retry-After, and /health 503."""
    assert httpx.get(roomy.http_url + "/health", timeout=30).status_code == 200
    asyncio.run_coroutine_threadsafe(engine.drain(0.1), roomy.loop).result(timeout=30)
    assert engine.is_draining
    for server, headers in ((roomy, {}), (guarded, AUTH)):
        for endpoint, body in (("completions", _completion()),
                               ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})):
            response = httpx.post(f"{server.http_url}/v1/{endpoint}", json=body, headers=headers, timeout=30)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "engine_draining" and response.headers["retry-after"] == "1"
        health = httpx.get(server.http_url + "/health", timeout=30)
        assert health.status_code == 503 and health.headers["retry-after"] == "1"
        assert health.json()["error"]["code"] == "engine_draining"
