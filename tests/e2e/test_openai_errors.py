"""HTTP status mapping without a model: a stand-in engine raises what AsyncLLM raises (dead, draining,
queue full) so 401/429/503 and /health states are checked in milliseconds."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from distinfer.engine.scheduler import QueueFullError
from distinfer.executor.base import EngineDeadError, EngineDrainingError
from distinfer.messages import EngineStats
from distinfer.serving.openai_http import build_app


class FakeEngine:
    """The parts of AsyncLLM the HTTP app touches; generate() raises `error`."""

    def __init__(self) -> None:
        self.engine = SimpleNamespace(hf_config=SimpleNamespace(vocab_size=100), max_model_len=64)
        self.tokenizer = SimpleNamespace(chat_template=None, get_vocab=lambda: {"tok": 0})
        self.error: BaseException | None = None
        self.dead_error: EngineDeadError | None = None
        self.callbacks: list = []

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    is_draining = False

    def add_step_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def get_stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 10, 10, 0, 0, 0)

    async def generate(self, prompt, params, request_id, priority=0):
        raise self.error
        yield  # an async generator, like AsyncLLM.generate


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def _post(client: TestClient, **headers: str):
    return client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, headers=headers)


@pytest.mark.parametrize("error,status,code", [
    (EngineDeadError("engine is dead: worker 1 died"), 503, "engine_dead"),
    (EngineDrainingError("engine is draining"), 503, "engine_draining"),
    (QueueFullError("too many requests in flight"), 429, "queue_full"),
    (RuntimeError("boom"), 500, "internal_error"),
])
def test_engine_errors_map_to_status(engine, error, status, code):
    engine.error = error
    client = TestClient(build_app(engine, "m"), raise_server_exceptions=False)
    for stream in (False, True):
        response = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "stream": stream})
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        if status == 500:  # no exception text for the client: an id to find the details in the log
            message = response.json()["error"]["message"]
            assert "boom" not in message and "request id cmpl-" in message, message
        if code in ("engine_draining", "queue_full"):
            assert response.headers["retry-after"] == "1"


def test_health_reflects_draining_and_dead_engine(engine):
    client = TestClient(build_app(engine, "m"))
    assert client.get("/health").status_code == 200
    engine.is_draining = True
    assert client.get("/health").json()["error"]["code"] == "engine_draining"
    engine.is_draining = False
    engine.dead_error = EngineDeadError("engine is dead: rank 0 exited")
    response = client.get("/health")
    assert response.status_code == 503 and "rank 0" in response.json()["error"]["message"]
    assert 'distinfer:engine_dead{model_name="m"} 1.0' in client.get("/metrics").text


def test_api_key_required_on_v1_only(engine):
    engine.error = QueueFullError("full")
    client = TestClient(build_app(engine, "m", api_key="sekret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = _post(client, **headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert _post(client, Authorization="Bearer sekret").status_code == 429  # past auth, into the engine
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]["id"] == "m"
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_unknown_route_is_openai_shaped(engine):
    response = TestClient(build_app(engine, "m")).get("/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_chat_without_template_is_400(engine):
    response = TestClient(build_app(engine, "m")).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
