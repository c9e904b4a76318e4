"""grpc.health.v1 states (NOT_SERVING while loading, SERVING, NOT_SERVING on drain and on a dead
engine) and the client's retries while the server is unreachable or loading."""
from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distinfer import AsyncLLM
from distinfer.client import Client, RetryPolicy, UnavailableError
from distinfer.serving.grpc_server import GrpcServerThread

SERVICE = "distinfer.v1.InferenceService"


class SignallingRetry(RetryPolicy):
    """Patient but bounded (< 40 s) retries that tell the test when a call has been refused once."""

    def __init__(self) -> None:
        super().__init__(max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.2)
        object.__setattr__(self, "refused", threading.Event())

    def backoff_s(self, attempt: int, error=None) -> float:
        self.refused.set()
        return super().backoff_s(attempt, error)

NO_RETRY = RetryPolicy(max_attempts=1)
ENGINE_KWARGS = dict(dtype="float32", max_model_len=512, num_kv_blocks=64)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(**ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def test_not_serving_until_the_model_is_loaded(engine):
    gate = threading.Event()

    async def load() -> AsyncLLM:  # stands in for `asyncio.to_thread(AsyncLLM, ...)`
        await asyncio.to_thread(gate.wait, 60)
        return engine

    with GrpcServerThread(load(), model_name="smollm2") as server:
        with Client(server.target, timeout=60, retry=NO_RETRY) as client:
            assert client.health() == "NOT_SERVING" and client.health(SERVICE) == "NOT_SERVING"
            with pytest.raises(UnavailableError, match="loading"):
                client.generate("Hi", max_tokens=2)
        results: list[object] = []
        retry = SignallingRetry()
        with Client(server.target, timeout=60, retry=retry) as patient:
            caller = threading.Thread(target=lambda: results.append(patient.generate("Hi", max_tokens=2)))
            caller.start()
            assert retry.refused.wait(30), "the client was refused while loading"
            gate.set()  # the model finishes loading while the client retries
            caller.join(60)
            assert len(results) == 1 and len(results[0].token_ids) == 2
            assert patient.health() == "SERVING" and patient.health(SERVICE) == "SERVING"


def test_client_retries_until_the_server_listens(engine):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results: list[object] = []
    retry = SignallingRetry()
    with Client(f"127.0.0.1:{port}", timeout=60, retry=retry) as client:
        caller = threading.Thread(target=lambda: results.append(client.model_info()))
        caller.start()
        assert retry.refused.wait(30), "the first attempt found nothing listening"
        with GrpcServerThread(engine, port=port, model_name="smollm2"):
            caller.join(60)
    assert len(results) == 1 and results[0].model_name == "smollm2"
    with Client(f"127.0.0.1:{port}", timeout=10, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)) as client:
        with pytest.raises(UnavailableError):
            client.model_info()  # bounded: gives up once nothing listens


def test_drain_turns_health_not_serving(engine):
    with GrpcServerThread(engine, model_name="smollm2") as server, grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with Client(server.target, timeout=60) as client:
            assert len(client.generate("Hi", max_tokens=2).token_ids) == 2
            server.call(engine.drain(timeout_s=10))
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # pushed to watchers
            watch.cancel()
            assert client.health() == "NOT_SERVING" and client.server_info().draining
            with pytest.raises(UnavailableError, match="draining"):
                client.generate("Hi", max_tokens=2)  # final: refused at once, not retried


def test_dead_engine_turns_health_not_serving():
    engine = AsyncLLM(**ENGINE_KWARGS)
    try:
        with GrpcServerThread(engine, model_name="smollm2") as server, Client(server.target, timeout=60) as client:
            assert client.health() == "SERVING"

            def boom() -> None:
                raise RuntimeError("injected step failure")

            engine.engine.step = boom  # the next step kills the loop
            with pytest.raises(UnavailableError, match="engine is dead.*injected step failure"):
                client.generate("Hi", max_tokens=2)
            assert client.health() == "NOT_SERVING" and client.server_info().dead
            with pytest.raises(UnavailableError, match="engine is dead"):
                client.generate("Hi", max_tokens=2)
            assert client.model_info().model_name == "smollm2", "read-only calls still answer"
    finally:
        engine.shutdown()
