"""The OpenAI-compatible HTTP API on the real model over loopback, driven by the official `openai`
client and raw HTTP: exact greedy output vs LLM, streaming (SSE ending in [DONE], usage), n, logprobs,
stop, a table of bad inputs (400 naming the field, server keeps serving), 404, 429, abort on disconnect."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from distinfer import LLM, AsyncLLM, SamplingParams
from distinfer.serving.server import ServeOptions, ServerThread

MODEL = "smollm2-test"
ENGINE_KWARGS = dict(dtype="float32", max_model_len=2048, num_kv_blocks=512)
PROMPTS = ["The capital of France is", "def add(a, b):", "Emoji test: 🚀🚀 and 東京"]
CHATS = ["What is the capital of France?", "Write a haiku about GPUs."]


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(**ENGINE_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServeOptions(served_model_name=MODEL, http_port=0, grpc_port=None)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    """The reference: LLM.generate / LLM.chat, greedy."""
    llm = LLM(**ENGINE_KWARGS)
    params = SamplingParams(temperature=0, max_tokens=20)
    completions = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    chats = [llm.chat([{"role": "user", "content": c}], params, use_tqdm=False)[0].outputs[0] for c in CHATS]
    llm.shutdown()
    return completions, [c.text for c in chats], [len(c.token_ids) for c in chats]


def wait_idle(engine: AsyncLLM, free_blocks: int) -> None:
    """Bounded wait until nothing is pending and every KV block is free again."""
    for _ in range(500):
        stats = engine.get_stats()
        if engine.num_pending_requests == 0 and stats.num_running == 0 and stats.num_free_blocks == free_blocks:
            return
        time.sleep(0.02)
    stats = engine.get_stats()
    assert (engine.num_pending_requests, stats.num_running, stats.num_free_blocks) == (0, 0, free_blocks)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.http_url + "/health").status_code == 200


def test_completions_equal_offline_greedy(client, offline):
    for prompt, expected in zip(PROMPTS, offline[0]):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert response.choices[0].text == expected
        assert response.usage.completion_tokens == 20 or response.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        chunks = [c.choices[0].text for c in streamed if c.choices]
        assert "".join(chunks) == expected
        assert len(chunks) > 1


def test_chat_equal_offline_greedy(client, offline):
    _, chats, lengths = offline
    for content, expected, length in zip(CHATS, chats, lengths):
        messages = [{"role": "user", "content": content}]
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
        assert response.choices[0].message.content == expected
        assert response.choices[0].message.role == "assistant"
        assert response.usage.completion_tokens == length
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == length
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.http_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_n_seed_logprobs_stop_and_penalties(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0.9, n=3, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices], "seeded sampling is reproducible"
    assert first.usage.completion_tokens == sum(8 for _ in first.choices)

    lp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=3)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == lp.choices[0].text
    assert all(len(top) == 3 and max(top.values()) <= 0 for top in logprobs.top_logprobs)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)

    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text
    extra = dict(top_k=5, min_p=0.05, repetition_penalty=1.2, min_tokens=3, ignore_eos=True, stop_token_ids=[2])
    penalised = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0.5, seed=1,
                                          presence_penalty=0.5, frequency_penalty=0.5, extra_body=extra)
    assert penalised.usage.completion_tokens == 6


def test_batch_prompts(client, offline):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=20, temperature=0)
    assert [c.index for c in response.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in response.choices] == offline[0]


BAD_INPUTS = [
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": "x" * 20000}, "prompt"),  # longer than the context
    ("completions", {"prompt": [49152]}, "prompt"),  # outside the vocabulary
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "n": 10**9}, "n"),
    ("completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "x", "stop": ["s"] * 100}, "stop"),
    ("completions", {"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ("completions", {"prompt": "x", "echo": True}, "echo"),
    ("completions", {}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_INPUTS, ids=[f"{e}-{p}-{i}" for i, (e, _, p) in enumerate(BAD_INPUTS)])
def test_bad_input_is_400_naming_the_field(server, endpoint, body, param):
    response = httpx.post(f"{server.http_url}/v1/{endpoint}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split(".")[0] in error["message"]
    ok = httpx.post(f"{server.http_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, "the server keeps serving after a bad request"


@pytest.mark.parametrize("payload", [b'{"prompt": "\xff\xfe"}', b"{not json", b"[1, 2]"])
def test_undecodable_body_is_400(server, payload):
    response = httpx.post(f"{server.http_url}/v1/completions", content=payload,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_nan_temperature_is_400(server):
    response = httpx.post(f"{server.http_url}/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_queue_full_is_429(client, engine):
    saved = engine.max_pending_requests
    engine.max_pending_requests = 0
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    finally:
        engine.max_pending_requests = saved
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket (so the test decides when the client goes away)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(server, engine, stream):
    baseline = engine.get_stats().num_free_blocks
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    sock = _raw_post(server.http_url, "/v1/completions", body)
    try:
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers go out after the first token
        for _ in range(1000):  # bounded: until the request is generating
            if engine.num_pending_requests and engine.get_stats().num_running:
                break
            time.sleep(0.01)
        assert engine.num_pending_requests == 1
    finally:
        sock.close()
    wait_idle(engine, baseline)


def test_drain_finishes_in_flight_and_refuses_new(server, engine):
    """Shutdown (what SIGTERM does): new requests and /health get 503, the stream in flight completes.
    Runs last in this module: the engine stays draining."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.http_url + "/v1/completions", json=body, timeout=120) as response:
        lines = (line for line in response.iter_lines() if line)
        next(lines)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        for _ in range(500):
            if engine.is_draining:
                break
            time.sleep(0.01)
        refused = httpx.post(server.http_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_draining"
        assert httpx.get(server.http_url + "/health").status_code == 503
        rest = list(lines)
    stopper.join(timeout=90)
    assert not stopper.is_alive()
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
