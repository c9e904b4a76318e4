"""Shutdown of `distinfer serve` as a real subprocess on loopback (the default model).

SIGTERM drains within --drain-timeout: health and new requests on both APIs say "draining, retry"
(503 + Retry-After, UNAVAILABLE retryable with grpc-retry-pushback-ms), live streams are cut with an
in-band error (SSE: error event then [DONE]; gRPC: retryable UNAVAILABLE) after tokens that are exactly
the oracle's, and the process exits 0 inside the budget. A second signal exits at once with 128+15.
The API-key options (--require-api-key, --api-key-file, $DISTINFER_API_KEY) and the warning for a
public interface without a key are checked on the same few server processes. Bounded: every wait has
a deadline.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import torch

from distinfer.client._common import build_generate_request
from distinfer.serving.server import DEFAULT_MODEL_NAME, free_port
from distinfer.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import hf_greedy
from tests.serve_process import ServeProcess, StreamLog, read_grpc, read_sse, start_reader

pytestmark = pytest.mark.timeout(300)
logger = logging.getLogger(__name__)

DRAIN_S = 6.0
EXIT_MARGIN_S = 4.0
DRAIN_PHASE_S = DRAIN_S - min(3.0, DRAIN_S / 3)  # what the server gives the engine before cutting (server.py)
PROMPT = "Once upon a time, in a small village by the sea, there lived"
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
ENV_KEY = "env-k3y"


class Serve(ServeProcess):
    @classmethod
    def start(cls, tmp, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> "Serve":
        return super().start(tmp, "--max-model-len", "2048", *args, env=env, host=host)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any API key variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTINFER_API_KEY")}
    env.update(extra)
    return env


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def grpc_auth(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def sse_reader(url: str, key: str | None, prompt_ids: list[int]) -> StreamLog:
    body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt_ids, "stream": True, **LONG}
    return start_reader(read_sse, url, body, auth(key))


def grpc_reader(target: str, key: str | None, prompt_ids: list[int]) -> StreamLog:
    request = build_generate_request(prompt_ids, None, 0, DEFAULT_MODEL_NAME, dict(LONG))
    return start_reader(read_grpc, target, request, grpc_auth(key))


def grpc_generate_error(target: str, key: str | None) -> grpc.RpcError:
    """The error a new small Generate gets (the call must fail)."""
    with grpc.insecure_channel(target) as channel:
        request = build_generate_request("Hello", None, 0, DEFAULT_MODEL_NAME, {"max_tokens": 4})
        try:
            list(pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=10, metadata=grpc_auth(key)))
        except grpc.RpcError as exc:
            return exc
    raise AssertionError("Generate succeeded; it had to fail")


def assert_retryable_unavailable(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    trailing = dict(error.trailing_metadata() or ())
    assert trailing.get("distinfer-retryable") == "true", trailing
    assert int(trailing["grpc-retry-pushback-ms"]) > 0, trailing


def greedy_oracle(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """hf_greedy on one thread: on a loaded 2-core machine OpenMP's spinning makes two threads ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return hf_greedy(hf_model, prompt_ids, n)
    finally:
        torch.set_num_threads(threads)


def wait_health_503(url: str, deadline_s: float) -> httpx.Response:
    """/health once the server has taken the signal (bounded)."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = httpx.get(url + "/health", timeout=5)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def test_drain_cuts_live_streams_on_both_apis(tmp_path, hf_model, tokenizer):
    """SIGTERM with a live SSE stream and a live gRPC stream (key from $DISTINFER_API_KEY): health and
    new requests on both APIs are refused as draining with a retry hint; after the drain time both
    streams end with an in-band draining error (SSE: error event, then [DONE]); their tokens are the
    oracle's, none lost or repeated; the process exits 0 within the drain budget + a margin."""
    prompt_ids = tokenizer.encode(PROMPT)
    serve = Serve.start(tmp_path, "--drain-timeout", str(DRAIN_S), env=clean_env(DISTINFER_API_KEY=ENV_KEY))
    try:
        assert httpx.get(serve.http_url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(serve.http_url + "/v1/models", headers=auth("wrong"), timeout=10).status_code == 401
        assert httpx.get(serve.http_url + "/v1/models", headers=auth(ENV_KEY), timeout=10).status_code == 200
        sse = sse_reader(serve.http_url, ENV_KEY, prompt_ids)
        rpc = grpc_reader(serve.grpc_target, ENV_KEY, prompt_ids)
        assert sse.started.wait(120) and rpc.started.wait(120)
        assert sse.error is None and rpc.error is None, (sse.error, rpc.error)
        signalled = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)

        health = wait_health_503(serve.http_url, DRAIN_PHASE_S)
        assert health.status_code == 503 and health.headers.get("Retry-After") == "1", health.text
        assert health.json()["error"]["code"] == "engine_draining"
        refused = httpx.post(serve.http_url + "/v1/completions", headers=auth(ENV_KEY), timeout=10,
                             json={"model": DEFAULT_MODEL_NAME, "prompt": "Hello", "max_tokens": 4})
        assert refused.status_code == 503 and refused.headers.get("Retry-After") == "1", refused.text
        assert refused.json()["error"]["code"] == "engine_draining"
        assert_retryable_unavailable(grpc_generate_error(serve.grpc_target, ENV_KEY))
        checked_s = time.monotonic() - signalled
        assert checked_s < DRAIN_PHASE_S, f"the refusals were checked {checked_s:.1f} s after SIGTERM: too late"
        assert not sse.done.is_set() and not rpc.done.is_set(), "a live stream ended before the drain time ran out"

        code = serve.wait_exit(DRAIN_S + EXIT_MARGIN_S + 1)
        shutdown_s = time.monotonic() - signalled
        logger.info("SIGTERM -> exit %s in %.2f s (drain budget %.0f s)", code, shutdown_s, DRAIN_S)
    finally:
        serve.kill()
    assert code == 0, serve.stderr()[-3000:]
    assert shutdown_s <= DRAIN_S + EXIT_MARGIN_S, f"shutdown took {shutdown_s:.1f} s"
    assert sse.done.wait(10) and rpc.done.wait(10)

    # SSE: the stream was cut in-band: an error event (draining), then [DONE], nothing after.
    assert sse.error is None, repr(sse.error)
    assert sse.events[-1] == "[DONE]", sse.events[-3:]
    cut = json.loads(sse.events[-2])
    assert cut["error"]["code"] == "engine_draining", cut
    assert all("error" not in json.loads(e) for e in sse.events[:-2])
    # gRPC: the stream ended with a retryable UNAVAILABLE.
    assert isinstance(rpc.error, grpc.RpcError)
    assert_retryable_unavailable(rpc.error)

    # Exactness: both streams are a prefix of the oracle's greedy continuation (no token lost or repeated).
    text = "".join(sse.pieces)
    n = max(len(rpc.pieces), len(tokenizer.encode(text))) + 8
    expected = greedy_oracle(hf_model, prompt_ids, n)
    assert rpc.pieces == expected[: len(rpc.pieces)]
    assert tokenizer.decode(expected).startswith(text)
    assert len(rpc.pieces) > 3 and len(text) > 3, "the streams went on while the engine drained"
    logger.info("streamed before the cut: gRPC %d tokens, SSE %d chars", len(rpc.pieces), len(text))


def test_second_signal_exits_at_once_and_public_host_warns(tmp_path):
    """On 0.0.0.0 without a key the server warns; a SIGTERM starts a 60 s drain (health 503) with a live
    stream, and a second SIGTERM ends the process at once with status 128 + SIGTERM."""
    serve = Serve.start(tmp_path, "--drain-timeout", "60", env=clean_env(), host="0.0.0.0")
    try:
        assert "serving on 0.0.0.0 without an API key" in serve.stderr()
        sse = sse_reader(serve.http_url, None, [1, 2, 3, 4])
        assert sse.started.wait(120) and sse.error is None, sse.error
        serve.proc.send_signal(signal.SIGTERM)
        health = wait_health_503(serve.http_url, 10)
        assert health.status_code == 503, "the first signal did not start a drain"
        time.sleep(0.5)
        assert serve.proc.poll() is None and not sse.done.is_set(), "the first signal did not wait for the stream"
        second = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.wait_exit(5)
        exit_s = time.monotonic() - second
    finally:
        serve.kill()
    logger.info("second SIGTERM -> exit %s in %.2f s", code, exit_s)
    assert code == 128 + signal.SIGTERM, serve.stderr()[-3000:]
    assert "second SIGTERM: exiting now" in serve.stderr()
    assert sse.done.wait(10) and "[DONE]" not in sse.events, "the forced exit did not finish the stream"


def test_api_key_from_file_and_required(tmp_path):
    """--require-api-key without any key exits 2 before loading the model, naming the ways to give one;
    with --api-key-file the key is required on both APIs (401 / UNAUTHENTICATED without it or with
    another, 200 with it), it is not on the command line, and SIGTERM on an idle server exits 0."""
    no_key = subprocess.Popen([sys.executable, "-m", "distinfer.cli", "serve", "--require-api-key", "--http-port",
                               str(free_port()), "--grpc-port", "-1"], env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # runs while the keyed server below loads
    key_file = tmp_path / "api.key"
    key_file.write_text("file-k3y\n")
    serve = Serve.start(tmp_path, "--require-api-key", "--api-key-file", str(key_file), env=clean_env())
    try:
        out, err = no_key.communicate(timeout=120)
        assert no_key.returncode == 2, err
        assert "--require-api-key" in err and "--api-key-file" in err and "DISTINFER_API_KEY" in err
        assert "serving" not in out, "the server without a key started"
        models = serve.http_url + "/v1/models"
        assert httpx.get(models, timeout=10).status_code == 401
        assert httpx.get(models, headers=auth(ENV_KEY), timeout=10).status_code == 401
        assert httpx.get(models, headers=auth("file-k3y"), timeout=10).status_code == 200
        assert grpc_generate_error(serve.grpc_target, None).code() == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_generate_error(serve.grpc_target, "wrong").code() == grpc.StatusCode.UNAUTHENTICATED
        assert "file-k3y" not in " ".join(serve.proc.args), "the key must not be on the command line"
        serve.proc.send_signal(signal.SIGTERM)
        code = serve.wait_exit(30)
    finally:
        serve.kill()
        if no_key.poll() is None:
            no_key.kill()
            no_key.wait(timeout=30)
    assert code == 0, serve.stderr()[-3000:]
