"""A `distinfer serve` subprocess for tests, and reader threads that follow one long stream on either API
(every event and the final error kept for the test to inspect). Every wait has a deadline."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from distinfer.serving.server import free_port
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc

STARTUP_S = 240


@dataclass
class ServeProcess:
    """One `distinfer serve` process on loopback ports; stdout/stderr go to files (a full pipe would
    block the server)."""

    proc: subprocess.Popen
    http_url: str
    grpc_target: str
    stderr_path: Path

    @classmethod
    def start(cls, tmp: Path, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1") -> Any:
        http_port, grpc_port = free_port(), free_port()
        command = [sys.executable, "-m", "distinfer.cli", "--log-level", "INFO", "serve", "--host", host,
                   "--http-port", str(http_port), "--grpc-port", str(grpc_port), *args]
        stderr_path = tmp / f"serve-{http_port}.err"
        with open(tmp / f"serve-{http_port}.out", "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        serve = cls(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", stderr_path)
        serve.wait_healthy()
        return serve

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}"
            try:
                if httpx.get(self.http_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)

    def on_poll(self) -> None:
        """Called while waiting for the exit (subclasses note the process tree)."""

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status, or None when the process is still running after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.on_poll()
            time.sleep(0.05)
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class StreamLog:
    """What a reader thread saw of one stream."""

    pieces: list[Any] = field(default_factory=list)  # SSE: text deltas; gRPC: token ids
    events: list[str] = field(default_factory=list)  # SSE: every `data:` payload
    error: BaseException | None = None  # gRPC: the RpcError it ended with; SSE: a transport error
    ended_at: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)  # 3 pieces seen, or the stream ended
    done: threading.Event = field(default_factory=threading.Event)


def read_sse(url: str, body: dict[str, Any], headers: dict[str, str], log: StreamLog) -> None:
    """Thread body: one streamed /v1/completions, every event kept."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=120) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                log.events.append(payload)
                if payload != "[DONE]" and "choices" in json.loads(payload):
                    log.pieces.extend(c["text"] for c in json.loads(payload)["choices"])
                    if len(log.pieces) >= 3:
                        log.started.set()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        log.error = exc
    finally:
        _ended(log)


def read_grpc(target: str, request: pb.GenerateRequest, metadata: tuple[tuple[str, str], ...], log: StreamLog) -> None:
    """Thread body: one Generate stream on a raw stub (the RpcError keeps its trailing metadata)."""
    with grpc.insecure_channel(target) as channel:
        try:
            for response in pb_grpc.InferenceServiceStub(channel).Generate(request, timeout=120, metadata=metadata):
                log.pieces.extend(response.token_ids)
                if len(log.pieces) >= 3:
                    log.started.set()
        except grpc.RpcError as exc:
            log.error = exc
        finally:
            _ended(log)


def _ended(log: StreamLog) -> None:
    log.ended_at = time.monotonic()
    log.started.set()
    log.done.set()


def start_reader(target: Any, *args: Any) -> StreamLog:
    """Run a reader (read_sse / read_grpc) on a daemon thread; its log fills as the stream goes."""
    log = StreamLog()
    threading.Thread(target=target, args=(*args, log), daemon=True).start()
    return log
