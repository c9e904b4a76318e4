"""/metrics on the real model: vLLM-like `distinfer:` names, counts that move with requests sent over
HTTP and over gRPC (recorded on the engine side), prefix-cache hits, and aborts counted once."""
from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distinfer import AsyncLLM
from distinfer.serving.server import ServeOptions, ServerThread

MODEL = "smollm2-metrics"
REQUIRED = [
    "distinfer:num_requests_running", "distinfer:num_requests_waiting", "distinfer:kv_cache_usage_perc",
    "distinfer:time_to_first_token_seconds", "distinfer:inter_token_latency_seconds",
    "distinfer:time_per_output_token_seconds", "distinfer:e2e_request_latency_seconds",
    "distinfer:prompt_tokens", "distinfer:generation_tokens", "distinfer:prefix_cache_queries",
    "distinfer:prefix_cache_hits", "distinfer:num_preemptions", "distinfer:request_success",
]


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(dtype="float32", max_model_len=2048, num_kv_blocks=512)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, ServeOptions(served_model_name=MODEL, http_port=0, grpc_port=0)) as server:
        yield server


def scrape(server) -> dict[str, float]:
    """{sample name + sorted labels: value} from the exposition text."""
    text = httpx.get(server.http_url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def families(server) -> set[str]:
    return {f.name for f in text_string_to_metric_families(httpx.get(server.http_url + "/metrics").text)}


def complete(server, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(server.http_url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_names_exposed_with_model_label(server):
    text = httpx.get(server.http_url + "/metrics").text
    assert f'model_name="{MODEL}"' in text
    assert set(REQUIRED) <= families(server)


def test_http_requests_move_counters(server):
    before = scrape(server)
    shared = "You are a meticulous assistant. " * 8  # > 2 KV blocks of shared prefix
    for i in range(3):
        usage = complete(server, shared + f"Question {i}: what is {i} + {i}?", 6)["usage"]
    after = scrape(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("distinfer:request_success_total{finished_reason=length}") == 3
    assert delta("distinfer:generation_tokens_total") == 18
    assert delta("distinfer:prompt_tokens_total") >= 3 * usage["prompt_tokens"] - 6
    assert delta("distinfer:time_to_first_token_seconds_count") == 3
    assert delta("distinfer:e2e_request_latency_seconds_count") == 3
    assert delta("distinfer:time_per_output_token_seconds_count") == 3
    assert delta("distinfer:inter_token_latency_seconds_count") >= 3 * 5
    assert delta("distinfer:prefix_cache_queries_total") > 0
    assert delta("distinfer:prefix_cache_hits_total") > 0, "requests 2 and 3 reuse the shared prefix"
    assert after["distinfer:num_requests_running"] == 0 and after["distinfer:kv_cache_usage_perc"] >= 0
    assert after["distinfer:num_preemptions_total"] >= 0


def test_grpc_requests_count_too(server):
    from distinfer.client import Client

    before = scrape(server)
    with Client(server.grpc_target, timeout=120) as client:
        result = client.generate("Hello over gRPC", max_tokens=5, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 5
    after = scrape(server)
    assert after["distinfer:request_success_total{finished_reason=length}"] - before.get("distinfer:request_success_total{finished_reason=length}", 0) == 1
    assert after["distinfer:generation_tokens_total"] - before["distinfer:generation_tokens_total"] == 5


def test_abort_counted_once(server, engine):
    before = scrape(server).get("distinfer:request_success_total{finished_reason=abort}", 0.0)
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.http_url + "/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line)  # generating; leave
    for _ in range(500):  # bounded wait for the abort to reach the engine loop
        if scrape(server).get("distinfer:request_success_total{finished_reason=abort}", 0.0) > before:
            break
        time.sleep(0.02)
    assert scrape(server)["distinfer:request_success_total{finished_reason=abort}"] == before + 1
    assert engine.num_pending_requests == 0
