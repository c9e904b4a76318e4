"""Faults inside the engine end what they must and nothing more, on the real model and real servers.

- Non-finite logits (NaN injected into one embedding row, token X) end the one request that meets X,
  over AsyncLLM, HTTP and gRPC, while the requests batched with it give the transformers oracle's
  tokens; every KV block is free afterwards, and the NaN its KV blocks still hold never reaches the
  requests that reuse them.
- A hung step (the executor's forward blocked on an Event) trips the watchdog: the requests in flight
  fail on every API within a bound, the engine is dead, health says so, new requests are refused at once.
- `run_server` (what `distinfer serve` runs) returns 1 when its engine dies, and stops listening.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import torch

from distinfer import AsyncLLM, SamplingParams
from distinfer.client import Client, InternalServerError, RetryPolicy
from distinfer.client._common import build_generate_request
from distinfer.errors import EngineDeadError, RequestFailedError
from distinfer.model.attention.paged import TorchSDPABackend
from distinfer.serving.server import ServeOptions, ServerThread, run_server
from distinfer.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import hf_greedy

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.timeout(240)

ENGINE_KWARGS = dict(dtype="float32", max_model_len=512, num_kv_blocks=32)
MAX_TOKENS = 10
PROMPT_A, PROMPT_B, PROMPT_C = "The capital of France is", "Emoji test: 🚀🚀 and 東京", "Once upon a time"
NON_FINITE = "non-finite logits"
STEP_TIMEOUT_S = 2.0
FAIL_WITHIN_S = 15.0  # a hung step's requests fail within this (step timeout + watchdog poll + margin)
REFUSED_WITHIN_S = 5.0  # a dead engine refuses a new request within this
NO_RETRY = RetryPolicy(max_attempts=1)


def options(**overrides: Any) -> ServeOptions:
    """Loopback, free ports, both APIs, a short drain (nothing is left to drain in these tests)."""
    return ServeOptions(**{"http_port": 0, "grpc_port": 0, "drain_timeout_s": 5.0, **overrides})


def greedy(max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return dict(temperature=0, max_tokens=max_tokens, **extra)


def wait_idle(engine: AsyncLLM) -> None:
    """Bounded wait until nothing is pending or running and every KV block is free."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if engine.num_pending_requests == 0 and stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        time.sleep(0.02)
    stats = engine.get_stats()
    assert (engine.num_pending_requests, stats.num_running, stats.num_free_blocks) == (0, 0, stats.num_total_blocks)


def timed(job: Callable[[], Any]) -> tuple[Any, float]:
    """(the job's result, or the exception it raised; time.monotonic() when it ended)."""
    try:
        value = job()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        value = exc
    return value, time.monotonic()


def run_concurrently(jobs: dict[str, Callable[[], Any]], timeout_s: float = 120,
                     while_running: Callable[[], None] | None = None) -> dict[str, tuple[Any, float]]:
    """Run every job on its own thread at once (and `while_running` on this one meanwhile):
    {name: timed(job)}."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(timed, job) for name, job in jobs.items()}
        if while_running is not None:
            while_running()
        return {name: future.result(timeout=timeout_s) for name, future in futures.items()}


# ---------------------------------------------------------------- clients (each returns what it saw)

def http_complete(url: str, prompt: list[int], **params: Any) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": prompt, **params}, timeout=120)


def http_stream(url: str, prompt: list[int], **params: Any) -> tuple[int, list[str]]:
    """(status, every SSE `data:` payload) of a streamed completion."""
    body = {"prompt": prompt, "stream": True, **params}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        return response.status_code, [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def sse_text(events: list[str]) -> str:
    return "".join(c["text"] for e in events if e != "[DONE]" for c in json.loads(e).get("choices", []))


def assert_in_band_error(status: int, events: list[str], code: str, words: str) -> None:
    """A stream that started (200) and then failed: its last event before [DONE] is the error."""
    assert status == 200, (status, events)
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == code and words in error["message"], error
    assert all("error" not in json.loads(e) for e in events[:-2])


def grpc_generate(target: str, prompt: list[int], **params: Any) -> list[int] | grpc.RpcError:
    """A Generate on a raw stub (its RpcError keeps the trailing metadata): the token ids, or the error."""
    tokens: list[int] = []
    with grpc.insecure_channel(target) as channel:
        try:
            for response in pb_grpc.InferenceServiceStub(channel).Generate(
                    build_generate_request(prompt, None, 0, "", params), timeout=120):
                tokens.extend(response.token_ids)
        except grpc.RpcError as exc:
            return exc
    return tokens


def assert_final_unavailable(error: Any) -> None:
    """A dead engine's answer over gRPC: UNAVAILABLE, marked not retryable, saying why."""
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert "engine is dead" in error.details(), error.details()
    assert dict(error.trailing_metadata() or ()).get("distinfer-retryable") == "false"


async def generate_ids(engine: AsyncLLM, prompt: list[int], request_id: str, **params: Any) -> list[int]:
    ids: list[int] = []
    async for out in engine.generate(prompt, SamplingParams(**(params or greedy())), request_id):
        ids += out.outputs[0].token_ids
    return ids


# ---------------------------------------------------------------- injected faults

@contextlib.contextmanager
def poisoned(engine: AsyncLLM, token_id: int) -> Iterator[None]:
    """The embedding row of `token_id` is NaN (a copy of the table; the tied LM head keeps the real
    weights, so X's logit stays finite): a request whose input holds X gets NaN logits."""
    embedding = engine.engine.executor.worker.runner.model.model.embed_tokens
    original = embedding.weight
    table = torch.nn.Parameter(original.detach().clone(), requires_grad=False)
    table[token_id] = float("nan")
    embedding.weight = table
    try:
        yield
    finally:
        embedding.weight = original


@contextlib.contextmanager
def plain_torch_attention(engine: AsyncLLM) -> Iterator[None]:
    """Every layer attends with TorchSDPABackend: the path CUDA (and any dtype the CPU kernels do not
    take) runs, whose batched decode reads padded slots under a -inf mask."""
    attentions = [layer.self_attn for layer in engine.engine.executor.worker.runner.model.model.layers]
    saved = [a.backend for a in attentions]
    for attention in attentions:
        attention.backend = TorchSDPABackend()
    try:
        yield
    finally:
        for attention, backend in zip(attentions, saved):
            attention.backend = backend


class Hang:
    """Wraps the local executor's execute_model: once `armed`, the next step blocks (a hung forward)
    until `release`, then fails."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.armed, self.release, self.hung = threading.Event(), threading.Event(), threading.Event()
        executor = engine.engine.executor
        self._execute = executor.execute_model
        executor.execute_model = self._call

    def _call(self, scheduler_output: Any) -> Any:
        if self.armed.is_set():
            self.hung.set()
            self.release.wait(300)
            raise RuntimeError("injected hang released")
        return self._execute(scheduler_output)


# ---------------------------------------------------------------- non-finite logits

@dataclass(frozen=True)
class Case:
    """Prompts A, B, C (token ids), the poisoned token X (B's first greedy token: a prompt B + [X]
    meets it at once, B alone after one token) and the oracle's greedy continuations of A and C."""

    a: list[int]
    b: list[int]
    c: list[int]
    x: int
    a_out: list[int]
    c_out: list[int]


@pytest.fixture(scope="module")
def case(hf_model, tokenizer) -> Case:
    a, b, c = (tokenizer.encode(p) for p in (PROMPT_A, PROMPT_B, PROMPT_C))
    x = hf_greedy(hf_model, b, 1)[0]
    a_out, c_out = hf_greedy(hf_model, a, MAX_TOKENS), hf_greedy(hf_model, c, MAX_TOKENS)
    assert x not in {*a, *c, *a_out, *c_out}, "X must be a token that only B meets"
    return Case(a, b, c, x, a_out, c_out)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(**ENGINE_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, options()) as server:
        yield server


async def test_non_finite_logits_end_one_request(engine, case):
    """B (its prompt holds X) fails alone with RequestFailedError naming non-finite logits; A and C,
    batched with it, give exactly the oracle's tokens; all blocks are free; the engine still serves."""
    with poisoned(engine, case.x):
        a, b, c = await asyncio.gather(generate_ids(engine, case.a, "a"), generate_ids(engine, [*case.b, case.x], "b"),
                                       generate_ids(engine, case.c, "c"), return_exceptions=True)
    assert isinstance(b, RequestFailedError) and NON_FINITE in str(b), repr(b)
    assert (a, c) == (case.a_out, case.c_out)
    wait_idle(engine)
    assert not engine.is_dead
    assert await generate_ids(engine, case.c, "c-after") == case.c_out


def test_non_finite_logits_over_http(engine, server, case, tokenizer):
    """Over HTTP: B fails with 500 request_failed (non-stream) or, once its stream has started, with an
    in-band error event then [DONE]; A and C (batched with them) are the oracle's text."""
    url = server.http_url
    with poisoned(engine, case.x):
        results = run_concurrently({
            "a": lambda: http_complete(url, case.a, **greedy()),
            "b": lambda: http_complete(url, [*case.b, case.x], **greedy()),
            "b_stream": lambda: http_stream(url, case.b, **greedy()),
            "c_stream": lambda: http_stream(url, case.c, **greedy()),
        })
    a, b = results["a"][0], results["b"][0]
    assert a.status_code == 200 and a.json()["choices"][0]["text"] == tokenizer.decode(case.a_out), a.text
    assert b.status_code == 500, b.text
    error = b.json()["error"]
    assert error["code"] == "request_failed" and NON_FINITE in error["message"] and "Traceback" not in b.text, error
    assert_in_band_error(*results["b_stream"][0], code="request_failed", words=NON_FINITE)
    status, events = results["c_stream"][0]
    assert status == 200 and events[-1] == "[DONE]" and sse_text(events) == tokenizer.decode(case.c_out), events[-3:]
    wait_idle(engine)


def test_non_finite_logits_over_grpc(engine, server, case):
    """Over gRPC: B fails with INTERNAL whose details give the reason (not a traceback); A and C,
    batched with it, are the oracle's token ids."""
    with poisoned(engine, case.x), Client(server.grpc_target, timeout=120, retry=NO_RETRY) as client:
        results = run_concurrently({name: (lambda ids=ids: client.generate(ids, **greedy())) for name, ids in
                                    (("a", case.a), ("b", [*case.b, case.x]), ("b_late", case.b), ("c", case.c))})
    for name in ("b", "b_late"):
        error = results[name][0]
        assert isinstance(error, InternalServerError) and error.code == grpc.StatusCode.INTERNAL, repr(error)
        assert NON_FINITE in error.details and "Traceback" not in error.details, error.details
    assert (results["a"][0].token_ids, results["c"][0].token_ids) == (case.a_out, case.c_out)
    wait_idle(engine)


async def test_failed_requests_blocks_do_not_poison_their_next_users(engine, case):
    """A request that fails on NaN leaves NaN in its KV blocks when they are freed. Here it fills the
    whole block pool, so the next requests necessarily reuse its blocks: with the plain-torch attention
    (CUDA's path; its batched decode reads a row's unwritten slots under a -inf mask) they must still
    give the oracle's tokens, and the engine must not be left poisoned."""
    filler = nan_filler(case, engine.engine.max_model_len - 1)
    runner = engine.engine.executor.worker.runner
    with plain_torch_attention(engine):
        with poisoned(engine, case.x), pytest.raises(RequestFailedError, match=NON_FINITE):
            await generate_ids(engine, filler, "filler", **greedy(1))
        wait_idle(engine)
        assert any(not bool(cache.isfinite().all()) for cache in runner.kv_caches), \
            "precondition: the failed request's freed blocks hold NaN"
        a, c = await asyncio.gather(generate_ids(engine, case.a, "a-reuse"), generate_ids(engine, case.c, "c-reuse"),
                                    return_exceptions=True)
    assert (a, c) == (case.a_out, case.c_out)
    wait_idle(engine)


def nan_filler(case: Case, length: int) -> list[int]:
    """X first (every later position's KV turns NaN), then B's and C's ids repeated to `length`."""
    body = (case.b + case.c) * (length // len(case.b + case.c) + 1)
    return [case.x, *body[: length - 1]]


# ---------------------------------------------------------------- a hung step: the watchdog

LONG = dict(temperature=0, max_tokens=300, ignore_eos=True)


def direct_generate(engine: AsyncLLM, prompt: list[int]) -> list[int]:
    """AsyncLLM.generate from a thread with its own event loop."""
    return asyncio.run(generate_ids(engine, prompt, f"direct-{time.monotonic_ns()}", **LONG))


def wait_streaming(engine: AsyncLLM, count: int, timeout_s: float = 120) -> None:
    """Until `count` requests run together and two more steps have ended (so each has its first token)."""
    steps: list[int] = []
    engine.add_step_callback(lambda outputs, stats, aborted: steps.append(len(outputs)))
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        if seen is None and engine.num_pending_requests == count and engine.get_stats().num_running == count:
            seen = len(steps)
        if seen is not None and len(steps) >= seen + 2:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} requests never streamed together: {engine.get_stats()}")


def test_hung_step_kills_the_engine_on_every_api(case):
    """With step_timeout_s=2, a step that hangs makes the engine dead: the requests in flight fail within
    a bound (AsyncLLM: EngineDeadError; gRPC: UNAVAILABLE, not retryable; HTTP: 503 engine_dead, or an
    in-band engine_dead error on a started stream); /health is 503, gRPC health NOT_SERVING, and new
    requests on every API are refused at once. Released at the end, the stuck step thread finishes."""
    engine = AsyncLLM(**{**ENGINE_KWARGS, "num_kv_blocks": 128}, step_timeout_s=STEP_TIMEOUT_S)
    hang = Hang(engine)
    armed: list[float] = []

    def hang_once_all_run() -> None:
        wait_streaming(engine, 4)
        armed.append(time.monotonic())
        hang.armed.set()

    try:
        with ServerThread(engine, options()) as server:
            url, target = server.http_url, server.grpc_target
            assert grpc_generate(target, case.a, **greedy()) == case.a_out  # steps shorter than the timeout pass
            results = run_concurrently({
                "direct": lambda: direct_generate(engine, case.a),
                "grpc": lambda: grpc_generate(target, case.c, **LONG),
                "http": lambda: http_complete(url, case.a, **LONG),
                "sse": lambda: http_stream(url, case.c, **LONG),
            }, timeout_s=FAIL_WITHIN_S + 60, while_running=hang_once_all_run)
            failed_s = {name: round(ended - armed[0], 1) for name, (_, ended) in results.items()}
            logger.info("in-flight requests failed after the hang began: %s s", failed_s)
            assert hang.hung.is_set() and max(failed_s.values()) < FAIL_WITHIN_S, failed_s
            assert_dead_answers({name: value for name, (value, _) in results.items()})
            assert engine.is_dead and "step timeout" in str(engine.dead_error)
            assert_dead_engine_refuses(engine, url, target, case)
    finally:
        hang.release.set()
        engine.shutdown()
    engine._thread.join(timeout=30)
    assert not engine._thread.is_alive(), "the released step thread ended"


def assert_dead_answers(results: dict[str, Any]) -> None:
    """What each API answered the requests that were in flight when the engine died."""
    assert isinstance(results["direct"], EngineDeadError) and "step timeout" in str(results["direct"]), results["direct"]
    assert_final_unavailable(results["grpc"])
    http = results["http"]
    assert http.status_code == 503 and http.json()["error"]["code"] == "engine_dead", http.text
    assert_in_band_error(*results["sse"], code="engine_dead", words="step timeout")


def assert_dead_engine_refuses(engine: AsyncLLM, url: str, target: str, case: Case) -> None:
    """Health reports the death on both APIs; a new request on each API is refused at once."""
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead", health.text
    with Client(target, timeout=10, retry=NO_RETRY) as client:
        assert client.health() == "NOT_SERVING" and client.server_info().dead
    started = time.monotonic()
    refused = run_concurrently({"http": lambda: http_complete(url, case.a, **greedy()),
                                "grpc": lambda: grpc_generate(target, case.a, **greedy()),
                                "direct": lambda: direct_generate(engine, case.a)})
    assert all(ended - started < REFUSED_WITHIN_S for _, ended in refused.values()), refused
    http = refused["http"][0]
    assert http.status_code == 503 and http.json()["error"]["code"] == "engine_dead", http.text
    assert_final_unavailable(refused["grpc"][0])
    assert isinstance(refused["direct"][0], EngineDeadError), refused["direct"]


# ---------------------------------------------------------------- run_server: a dead engine exits 1

def test_run_server_returns_1_when_its_engine_dies(case):
    """run_server builds its engine (step_timeout_s=2); once a step hangs, it fails the request in flight
    (503 engine_dead), stops, and returns exit status 1 within a bound; the HTTP port stops answering."""
    ready, servers, status = threading.Event(), [], []
    opts = options(engine_kwargs={**ENGINE_KWARGS, "step_timeout_s": STEP_TIMEOUT_S})

    def on_ready(server: Any) -> None:
        servers.append(server)
        ready.set()

    thread = threading.Thread(target=lambda: status.append(asyncio.run(run_server(opts, on_ready, handle_signals=False))),
                              name="run-server", daemon=True)
    thread.start()
    assert ready.wait(180), "run_server did not come up"
    server = servers[0]
    url = f"http://127.0.0.1:{server.http_port}"
    hang = Hang(server.engine)
    try:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        hang.armed.set()
        armed = time.monotonic()
        response = http_complete(url, case.a, **LONG)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead", response.text
        thread.join(timeout=60)
        exited_s = time.monotonic() - armed
    finally:
        hang.release.set()
    logger.info("run_server returned %s %.1f s after the hang began", status, exited_s)
    assert not thread.is_alive() and status == [1], status
    assert exited_s < 30
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)
