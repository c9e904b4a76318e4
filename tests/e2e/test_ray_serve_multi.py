"""Several models in one Ray Serve application (distinfer/serving/ray_serve_multi.py): the `models` args
are checked before anything starts, each model gets its own deployment and replica settings, and (slow)
two tiny models served for real on a local Ray answer HTTP and gRPC requests by their `model` field,
behind one API key, with streams that stay streams and a client that leaves a stream aborting its request."""
from __future__ import annotations

import itertools
import logging
import time

import pytest
from pydantic import ValidationError

from distinfer.serving.ray_serve import app_builder
from distinfer.serving.ray_serve_multi import (
    INGRESS_NAME,
    MultiModelArgs,
    deployment_name,
    merge_metrics,
    requested_model,
)
from tests.conftest import save_tiny_llama

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
ENGINE = {"dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 8}
API_KEY = "multi-model-test-key"
logger = logging.getLogger(__name__)


@pytest.mark.parametrize("args,problem", [
    ({"models": []}, "at least 1"),
    ({"models": [{"served_model_name": "a"}, {"model": "/m/a", "served_model_name": "a"}]}, "two models are served as 'a'"),
    ({"models": [{"model": "/x/m"}, {"model": "/y/m/"}]}, "two models are served as 'm'"),  # names from the paths
    ({"models": [{"served_model_name": "a b"}, {"served_model_name": "a/b"}]}, "same deployment name"),
    ({"models": [{"served_model_name": "a", "api_key": "k"}]}, "api_key is set once"),
    ({"models": [{"served_model_name": "a", "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}]}, "not both"),
    ({"models": [{"served_model_name": "a", "tensor_parallel": 2}]}, "tensor_parallel"),  # a typo
    ({"models": [{"served_model_name": "a", "sequence_parallel_size": 0}]}, "sequence_parallel_size"),
    ({"models": [{"served_model_name": "a"}], "model": "/m"}, "model"),  # not both forms at once
])
def test_models_args_are_checked_before_anything_starts(args, problem):
    with pytest.raises(ValidationError, match=problem):
        app_builder(args)


def test_one_deployment_per_model_behind_the_ingress():
    app = app_builder({"api_key": API_KEY, "models": [
        {"served_model_name": "small", "num_replicas": 2, "max_ongoing_requests": 64},
        {"served_model_name": "big/v2", "tensor_parallel_size": 2, "sequence_parallel_size": 2,
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}, "engine_kwargs": {"max_model_len": 128}},
    ]})
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME
    models, api_key = ingress.init_args
    assert list(models) == ["small", "big/v2"] and api_key == API_KEY
    small, big = (models[name]._bound_deployment for name in models)
    assert (small.name, big.name) == ("DistInfer-small", "DistInfer-big-v2") == tuple(map(deployment_name, models))
    assert small.num_replicas == 2 and small.max_ongoing_requests == 64
    assert big._deployment_config.autoscaling_config.max_replicas == 3
    # tp x sp = 4 worker ranks: the replica's bundle and one per rank, on one node
    assert big._replica_config.placement_group_bundles == [{"CPU": 1.0}] * 5
    assert big._replica_config.placement_group_strategy == "STRICT_PACK"
    assert small._replica_config.placement_group_bundles is None
    # each model deployment gets plain ServeAppArgs (no key of its own: the ingress checks it)
    assert big.init_args[0]["engine_kwargs"] == {"max_model_len": 128} and big.init_args[0]["api_key"] is None
    assert "num_replicas" not in small.init_args[0]
    MultiModelArgs.model_validate({"models": [{"served_model_name": "x"}]})


@pytest.mark.parametrize("body,model", [
    (b'{"model": "a", "prompt": "x"}', "a"),
    (b'{"prompt": "x"}', None),  # the first model answers
    (b'{"model": "", "prompt": "x"}', None),
    (b'{"model": 5}', None),  # the first model's validation reports the type
    (b'["model"]', None),
    (b"not json", None),
    (b'{"model": "\\ud800"}', None),  # a lone surrogate is never echoed in a 404
])
def test_requested_model_from_the_body(body, model):
    assert requested_model(body) == model


def test_metrics_of_several_models_merge_into_one_exposition():
    from prometheus_client.parser import text_string_to_metric_families

    def text(model: str, value: int) -> str:
        return (f"# HELP distinfer:num_requests_running Running requests.\n# TYPE distinfer:num_requests_running gauge\n"
                f'distinfer:num_requests_running{{model_name="{model}"}} {value}\n')

    merged = merge_metrics([text("a", 1), text("b", 2), text("b", 2)]).decode()
    (family,) = text_string_to_metric_families(merged)
    assert sorted((s.labels["model_name"], s.value) for s in family.samples) == [("a", 1.0), ("b", 2.0)]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, default_model_dir) -> dict[str, str]:
    return {name: save_tiny_llama(str(tmp_path_factory.mktemp(f"tiny-{name}")), default_model_dir, **TINY)
            for name in ("alpha", "beta")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_models_in_one_app_routed_by_model_field(two_models):
    import grpc
    import openai
    import ray
    import requests
    from ray import serve

    from distinfer.executor.ray import ensure_ray
    from distinfer.serving.server import free_port

    owns_ray = not ray.is_initialized()
    ensure_ray(4)  # two model replicas and the ingress
    http_port, grpc_port = free_port(), free_port()
    servicers = ["distinfer.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server",
                 "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
    models = [{"model": two_models["alpha"], "served_model_name": "alpha", "device": "cpu",
               "engine_kwargs": dict(ENGINE, max_model_len=256)},
              {"model": two_models["beta"], "served_model_name": "beta", "device": "cpu",
               "engine_kwargs": dict(ENGINE, max_model_len=384)}]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicers})
        serve.run(app_builder({"api_key": API_KEY, "models": models}), name="distinfer", route_prefix="/")
        base = f"http://127.0.0.1:{http_port}"
        _check_http(openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120), base, requests)
        _check_disconnect_aborts(base, requests)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            _check_grpc(channel, grpc)
    finally:
        serve.shutdown()
        if owns_ray:
            ray.shutdown()


def _check_http(client, base: str, requests) -> None:
    import openai

    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"alpha", "beta"}
    assert (cards["alpha"].max_model_len, cards["beta"].max_model_len) == (256, 384)  # each from its own engine
    reply = client.completions.create(model="alpha", prompt="Hello", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.model == "alpha" and reply.usage.completion_tokens == 3
    chunks = list(client.completions.create(model="beta", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert {c.model for c in chunks} == {"beta"} and len([c for c in chunks if c.choices]) == 5  # one per token
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gamma", prompt="Hello", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    # the model's own validation, after routing
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="Hello", max_tokens=10_000)
    refused = requests.post(f"{base}/v1/completions", json={"model": "gamma", "prompt": "x"}, timeout=60)
    assert refused.status_code == 401  # the key before anything else
    assert requests.get(f"{base}/health", timeout=60).json() == {"status": "ok"}
    metrics = requests.get(f"{base}/metrics", timeout=60).text
    assert 'model_name="alpha"' in metrics and 'model_name="beta"' in metrics


def _finished(base: str, requests, model: str, reason: str) -> float:
    """The model's `distinfer:request_success_total` of one finish reason, from the ingress's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=60).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "distinfer:request_success_total"
               and sample.labels == {"model_name": model, "finished_reason": reason})


def _check_disconnect_aborts(base: str, requests) -> None:
    """A client that leaves a stream mid-way aborts the request on the model's deployment: the relay through
    the ingress carries the disconnect, and the model's engine counts an abort, not a finished request."""
    aborted, finished = _finished(base, requests, "beta", "abort"), _finished(base, requests, "beta", "length")
    body = {"model": "beta", "prompt": "Hello", "max_tokens": 370, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with requests.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200
        chunks = itertools.islice((line for line in response.iter_lines() if line.startswith(b"data: {")), 3)
        assert len(list(chunks)) == 3
    left = time.monotonic()  # leaving the block closed the connection with the stream unfinished
    deadline = left + 60
    while _finished(base, requests, "beta", "abort") == aborted and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.info("3 chunks after %.2fs; abort counted %.2fs after the disconnect", left - started, time.monotonic() - left)
    assert _finished(base, requests, "beta", "abort") == aborted + 1
    assert _finished(base, requests, "beta", "length") == finished  # it did not run to max_tokens


def _check_grpc(channel, grpc) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from distinfer.v1 import inference_pb2 as pb
    from distinfer.v1 import inference_pb2_grpc as pb_grpc

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub, key = pb_grpc.InferenceServiceStub(channel), (("authorization", f"Bearer {API_KEY}"),)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(model="beta"), metadata=key, timeout=60).max_model_len == 384
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=key, timeout=60).model_name == "alpha"  # the first
    request = pb.GenerateRequest(text="Hello", model="beta",
                                 sampling_params=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    responses = list(stub.Generate(request, metadata=key, timeout=120))
    assert sum(len(r.token_ids) for r in responses) == 4 and len(responses) >= 2  # streamed, not one answer
    assert stub.Tokenize(pb.TokenizeRequest(text="Hello", model="alpha"), metadata=key, timeout=60).token_ids
    for call, code in ((lambda: stub.Tokenize(pb.TokenizeRequest(text="x", model="gamma"), metadata=key, timeout=60),
                        grpc.StatusCode.NOT_FOUND),
                       (lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model="alpha"), timeout=60),
                        grpc.StatusCode.UNAUTHENTICATED),
                       (lambda: list(stub.Generate(pb.GenerateRequest(text="", model="beta"), metadata=key, timeout=60)),
                        grpc.StatusCode.INVALID_ARGUMENT)):  # the model's own validation, relayed
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, info.value.details()
    assert not stub.Abort(pb.AbortRequest(request_id="nothing-running"), metadata=key, timeout=60).found
