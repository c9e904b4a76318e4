"""`distinfer serve -tp 2` (Ray executor, one local Ray started by the server) as a real subprocess:
how the process ends when a worker hangs, and when it is told to stop.

- A worker process frozen with SIGSTOP (a hung collective, as the other rank sees it): the step times
  out after --step-timeout, the live gRPC stream fails with a final (non-retryable) UNAVAILABLE,
  /health says 503 engine_dead while the server shuts down, and the process exits 1 so that its
  supervisor restarts it.
- SIGTERM with a live stream: the drain runs to its end (the stream is cut in-band with an error event
  and [DONE]) and the process exits 0. Regression: Ray's C++ core installs abseil's failure-signal
  handler over the server's SIGTERM handler, which aborted the process (SIGABRT, 134) 3 s into the drain.

Every process of the server's tree (Ray's GCS, raylet, agents, workers) is gone or killed afterwards.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from distinfer.client._common import build_generate_request
from tests.serve_process import ServeProcess, StreamLog, read_grpc, read_sse, start_reader

pytestmark = pytest.mark.timeout(400)
logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = 6.0
RAY_TEARDOWN_S = 10.0  # Ray's own teardown at exit (~0.5 s measured; its task-event and metrics exporters are off)
DRAIN_S = 6.0
LONG = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}  # max_model_len 512
MODEL = "tiny"
# Ray's per-node agents outlive their raylet by a minute or two (Ray's own behaviour, also after a
# clean ray.shutdown); they are killed here but not counted as leaks of the server.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_title(proc: psutil.Process) -> str:
    """Ray renames its processes (ray::RayWorker, ray::RayWorker.execute_model, ...); comm is cut at 15."""
    try:
        cmdline = proc.cmdline()
        return cmdline[0] if cmdline and cmdline[0].startswith("ray::") else proc.name()
    except psutil.Error:
        return "?"


@dataclass
class RayServe(ServeProcess):
    """`distinfer serve MODEL -tp 2` with its own local Ray."""

    tree: list[psutil.Process] = field(default_factory=list)  # every descendant seen while it served

    @classmethod
    def start(cls, tmp: Path, model_dir: str, *args: str) -> "RayServe":
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never ours
        return super().start(tmp, model_dir, "--served-model-name", MODEL, "-tp", "2", "--step-timeout",
                             str(STEP_TIMEOUT_S), "--max-model-len", "512", "--num-kv-blocks", "128", *args, env=env)

    def on_poll(self) -> None:
        self.snapshot()

    def snapshot(self) -> list[psutil.Process]:
        """Remember every descendant now alive (they are reparented once the server exits)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # the server is gone
            return self.tree
        known = {p.pid for p in self.tree}
        self.tree += [p for p in children if p.pid not in known]
        return self.tree

    def workers(self) -> list[psutil.Process]:
        workers = [p for p in self.snapshot() if process_title(p).startswith("ray::RayWorker")]
        return sorted(workers, key=lambda p: p.pid)

    def reap(self, timeout_s: float = 30.0) -> list[str]:
        """Kill the server if it still runs; wait (bounded) for its tree to end, then kill what is left.
        Returns the titles of the processes that had to be killed, Ray's agents excepted."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for proc in self.tree:
            try:
                proc.resume()  # a stopped process cannot act on its raylet's death
            except psutil.Error:
                pass
        agents = [p for p in self.tree if process_title(p).startswith(RAY_AGENTS)]
        _, alive = psutil.wait_procs([p for p in self.tree if p not in agents], timeout=timeout_s)
        leaked = [f"{p.pid} {process_title(p)}" for p in alive]
        alive += [p for p in agents if p.is_running()]
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        return leaked



def grpc_reader(target: str) -> StreamLog:
    request = build_generate_request("Once upon a time", None, 0, MODEL, dict(LONG))
    log = start_reader(read_grpc, target, request, ())
    assert log.started.wait(120) and log.error is None, log.error
    return log


def sse_reader(url: str) -> StreamLog:
    log = start_reader(read_sse, url, {"model": MODEL, "prompt": "Once upon a time", "stream": True, **LONG}, {})
    assert log.started.wait(120) and log.error is None, log.error
    return log


def poll_health(serve: RayServe, deadline_s: float) -> list[tuple[float, int | None, str]]:
    """(time, status or None when refused, error code) of /health every ~10 ms until the process exits."""
    seen: list[tuple[float, int | None, str]] = []
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=2) as client:
        while serve.proc.poll() is None and time.monotonic() < deadline:
            if len(seen) % 50 == 0:
                serve.snapshot()
            try:
                response = client.get(serve.http_url + "/health")
                code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
                seen.append((time.monotonic(), response.status_code, code))
            except httpx.HTTPError:
                seen.append((time.monotonic(), None, ""))
            time.sleep(0.01)
    return seen


def test_hung_worker_fails_the_stream_and_the_server_exits_1(tmp_path, tiny_model_dir):
    """SIGSTOP of one Ray worker mid-stream: within the step timeout (+ slack) the gRPC stream ends with
    UNAVAILABLE marked non-retryable (engine dead), /health answers 503 engine_dead and never 200 again,
    and the server exits with status 1; nothing of its process tree is left running."""
    serve = RayServe.start(tmp_path, tiny_model_dir)
    try:
        workers = serve.workers()
        assert len(workers) == 2, [process_title(p) for p in serve.tree]
        stream = grpc_reader(serve.grpc_target)
        hung = workers[-1]
        hung.suspend()
        injected = time.monotonic()
        health = poll_health(serve, STEP_TIMEOUT_S + 30 + RAY_TEARDOWN_S)
        code = serve.wait_exit(STEP_TIMEOUT_S + 30 + RAY_TEARDOWN_S)
        exit_s = time.monotonic() - injected
        assert stream.done.wait(10)
    finally:
        leaked = serve.reap()
    logger.info("hung worker: stream failed after %.1f s, server exited %s after %.1f s", stream.ended_at - injected,
                code, exit_s)
    assert code == 1, serve.stderr()[-3000:]
    assert "the engine is dead" in serve.stderr()
    assert not leaked, f"processes of the server's tree left running: {leaked}"

    assert isinstance(stream.error, grpc.RpcError), stream.error
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE, stream.error
    assert "engine is dead" in stream.error.details()
    assert dict(stream.error.trailing_metadata() or ()).get("distinfer-retryable") == "false"
    assert STEP_TIMEOUT_S - 1 <= stream.ended_at - injected <= STEP_TIMEOUT_S + 30
    assert len(stream.pieces) < LONG["max_tokens"]

    statuses = [status for _, status, _ in health]
    dead = [i for i, (_, status, code_) in enumerate(health) if status == 503 and code_ == "engine_dead"]
    assert dead, f"/health never said 503 engine_dead while the server shut down: {sorted(set(statuses), key=str)}"
    assert 200 not in statuses[dead[0]:], "/health said 200 after the engine died"


def test_sigterm_drains_and_exits_0(tmp_path, tiny_model_dir):
    """SIGTERM with a live SSE stream on the Ray executor: the drain runs to its end (3 s after the signal
    the process is still up), the stream is cut in-band (engine_draining error event, then [DONE]), and
    the process exits 0; its tree ends with it."""
    serve = RayServe.start(tmp_path, tiny_model_dir, "--drain-timeout", str(DRAIN_S))
    try:
        assert len(serve.workers()) == 2
        stream = sse_reader(serve.http_url)
        serve.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = serve.wait_exit(DRAIN_S + RAY_TEARDOWN_S)
        exit_s = time.monotonic() - signalled
        assert stream.done.wait(10)
    finally:
        leaked = serve.reap()
    logger.info("SIGTERM: stream cut after %.1f s, exit %s after %.1f s (drain budget %.0f s)",
                stream.ended_at - signalled, code, exit_s, DRAIN_S)
    assert code == 0, serve.stderr()[-3000:]
    assert not leaked, f"processes of the server's tree left running: {leaked}"
    assert stream.error is None, repr(stream.error)
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    assert json.loads(stream.events[-2])["error"]["code"] == "engine_draining", stream.events[-2]
    assert stream.ended_at - signalled <= DRAIN_S + 2, "the stream was not cut within the drain time"
