"""The Ray Serve application: deploy/serve_config.yaml validated with Ray's own schema classes, the
placement bundles the builder asks for, and (slow) the app served for real on a local Ray: one request
through Serve's HTTP proxy (the openai client) and one through its gRPC proxy."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from distinfer.serving.ray_serve import DEPLOYMENT_NAME, ServeAppArgs, app_builder, placement_bundles

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"


def _resolve(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_config_validates_with_ray_schemas():
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    # A RayService's serveConfigV2 holds the same applications list.
    ServeApplicationSchema.model_validate(raw["applications"][0])
    assert callable(_resolve(app.import_path))
    for function in config.grpc_options.grpc_servicer_functions:
        assert callable(_resolve(function))
    ServeAppArgs.model_validate(app.args)
    (deployment,) = app.deployments
    assert deployment.name == DEPLOYMENT_NAME
    autoscaling = deployment.autoscaling_config
    assert autoscaling["min_replicas"] >= 1 and autoscaling["max_replicas"] >= autoscaling["min_replicas"]
    assert config.http_options.port and config.grpc_options.port


def test_app_args_are_checked():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ServeAppArgs.model_validate({"tensor_parallel_size": 0})
    with pytest.raises(ValueError, match="tensor_parallel"):
        ServeAppArgs.model_validate({"tensor_parallel": 2})  # a typo is an error, not ignored


@pytest.mark.parametrize("args,bundles,strategy,replica_gpus", [
    ({}, None, None, 0),  # "auto" on this GPU-less machine: the CPU
    ({"device": "cuda"}, None, None, 1),  # the model runs inside the replica: it reserves the GPU
    ({"tensor_parallel_size": 3}, [{"CPU": 1.0}] * 4, "STRICT_PACK", 0),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, [{"CPU": 1.0}] * 5, "PACK", 0),
    ({"pipeline_parallel_size": 2, "device": "cuda"}, [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 2, "PACK", 0),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "device": "cuda"},
     [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4, "PACK", 0),
    # sequence parallel ranks count in the world size: tp 2 x sp 2 on one node
    ({"tensor_parallel_size": 2, "sequence_parallel_size": 2, "device": "cuda"},
     [{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 4, "STRICT_PACK", 0),
    ({"sequence_parallel_size": 2, "pipeline_parallel_size": 2}, [{"CPU": 1.0}] * 5, "PACK", 0),
])
def test_placement_group_bundles_sized_for_workers(args, bundles, strategy, replica_gpus):
    assert placement_bundles(ServeAppArgs.model_validate(args)) == bundles
    replica = app_builder(args)._bound_deployment._replica_config
    assert replica.placement_group_bundles == bundles
    assert replica.placement_group_strategy == strategy
    assert replica.ray_actor_options.get("num_gpus", 0) == replica_gpus


def test_sequence_parallel_size_reaches_the_engine_kwargs():
    from distinfer.cli import build_parser, engine_kwargs

    built = ServeAppArgs.model_validate(app_builder({"sequence_parallel_size": 3})._bound_deployment.init_args[0])
    assert built.engine_args["sequence_parallel_size"] == 3  # what the replica passes to make_engine
    from distinfer.engine.llm import build_config

    assert build_config(None, **built.engine_args).parallel.world_size == built.world_size == 3
    with pytest.raises(ValueError, match="sequence_parallel_size"):
        ServeAppArgs.model_validate({"sequence_parallel_size": 0})
    args = build_parser().parse_args(["serve", "-sp", "2", "-tp", "2"])
    assert (engine_kwargs(args)["sequence_parallel_size"], engine_kwargs(args)["tensor_parallel_size"]) == (2, 2)
    assert engine_kwargs(build_parser().parse_args(["serve"]))["sequence_parallel_size"] == 1


def test_serve_device_is_resolved_once_and_checked():
    assert app_builder({})._bound_deployment.init_args[0]["device"] == "cpu"  # no GPU here
    with pytest.raises(ValueError, match="device"):
        ServeAppArgs.model_validate({"device": "cuda:1"})  # Ray picks each rank's GPU


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_app_answers_http_and_grpc():
    import grpc
    import openai
    import ray
    from ray import serve

    from distinfer.executor.ray import ensure_ray
    from distinfer.serving.server import free_port
    from distinfer.v1 import inference_pb2 as pb
    from distinfer.v1 import inference_pb2_grpc as pb_grpc

    owns_ray = not ray.is_initialized()
    ensure_ray(1)
    http_port, grpc_port = free_port(), free_port()
    servicers = yaml.safe_load(CONFIG.read_text())["grpc_options"]["grpc_servicer_functions"]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicers})
        serve.run(app_builder({"served_model_name": "smol", "engine_kwargs": {"max_model_len": 2048, "num_kv_blocks": 256}}),
                  name="distinfer", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens <= 6
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            # grpc.health.v1 through Serve's gRPC proxy (the Health servicer function in the YAML)
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="distinfer.v1.InferenceService"), timeout=60)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(text="The capital of France is",
                                         sampling_params=pb.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            responses = list(stub.Generate(request, timeout=120))
            assert sum(len(r.token_ids) for r in responses) == 4
            assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(text="", sampling_params=pb.SamplingParams(max_tokens=2)), timeout=60))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in info.value.details()
    finally:
        serve.shutdown()
        if owns_ray:
            ray.shutdown()
