"""The RayService's serveConfigV2 is a valid Serve config (Ray's own schema classes), the same
application as deploy/serve_config.yaml, and its args build the distinfer application (no Ray started)."""
from __future__ import annotations

import json

import pytest
import yaml

from distinfer.serving.ray_serve import ServeAppArgs, app_builder
from tests.k8s.conftest import CHART, CI_VALUES, REPO, ci_values, one, render, run_helm

RAY_VALUES = [v for v in CI_VALUES if "plain" not in v.name and "multi-model" not in v.name]


def _serve_config(helm, values, sets=()):
    return yaml.safe_load(one(render(helm, values, sets), "RayService")["spec"]["serveConfigV2"])


@pytest.mark.parametrize("values", RAY_VALUES, ids=[v.name for v in RAY_VALUES])
def test_serve_config_validates_and_builds_the_app(helm, values):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    raw = _serve_config(helm, values)
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    ServeApplicationSchema.model_validate(raw["applications"][0])
    reference = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (ref_app,) = reference["applications"]
    assert app.import_path == ref_app["import_path"]
    assert config.grpc_options.grpc_servicer_functions == reference["grpc_options"]["grpc_servicer_functions"]
    args = ServeAppArgs.model_validate(app.args)
    built = app_builder(app.args)._bound_deployment
    (deployment,) = app.deployments
    # The config's deployment options (autoscaling, ongoing requests) attach to the builder's deployment by name.
    assert deployment.name == built.name == ref_app["deployments"][0]["name"]
    # ray_actor_options in the config would replace the builder's (and drop a one-rank replica's GPU)
    assert "ray_actor_options" not in raw["applications"][0]["deployments"][0]
    replica = built._replica_config
    gpus = sum(b.get("GPU", 0) for b in replica.placement_group_bundles or []) + replica.ray_actor_options.get("num_gpus", 0)
    expected = args.world_size if args.device == "cuda" and args.num_instances == 1 else 0
    assert gpus == expected


def test_tp2_replica_reserves_its_gpus_on_the_accelerator(helm):
    raw = _serve_config(helm, ci_values("gpu-tp2"))
    (app,) = raw["applications"]
    assert app["args"]["tensor_parallel_size"] == 2 and app["args"]["accelerator_type"] == "H100"
    assert app["args"]["engine_kwargs"]["gpu_memory_utilization"] == 0.85
    replica = app_builder(app["args"])._bound_deployment._replica_config
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.placement_group_bundles[1:] == [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}] * 2
    autoscaling = app["deployments"][0]["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (1, 3, 48)


def test_router_and_kv_values_reach_the_app_args(helm):
    pd = _serve_config(helm, ci_values("multi-instance-pd"))["applications"][0]["args"]
    args = ServeAppArgs.model_validate(pd)
    assert (args.prefill_instances, args.decode_instances, args.num_instances) == (1, 2, 3)
    assert (args.migration_policy, args.migration_transport) == ("balance", "p2p")
    offload = _serve_config(helm, ci_values("offload"))["applications"][0]["args"]["engine_kwargs"]
    assert offload["kv_offloading_size"] == 32 and offload["max_model_len"] == 32768 and offload["dtype"] == "float16"
    from distinfer.config import CacheConfig, SchedulerConfig  # the names are the engine config's own
    CacheConfig(gpu_memory_utilization=offload["gpu_memory_utilization"], kv_offloading_size=offload["kv_offloading_size"],
                kv_cache_bytes=offload["kv_cache_bytes"], enable_prefix_caching=offload["enable_prefix_caching"])
    SchedulerConfig(max_num_seqs=offload["max_num_seqs"], max_num_batched_tokens=offload["max_num_batched_tokens"])


def test_sequence_parallel_size_reaches_the_app_args(helm):
    raw = _serve_config(helm, ci_values("gpu-tp2"), sets=("engine.sequenceParallelSize=2", "ray.workerGroups[0].gpus=4"))
    args = raw["applications"][0]["args"]
    assert args["sequence_parallel_size"] == 2
    assert ServeAppArgs.model_validate(args).world_size == 4  # tp 2 x sp 2
    replica = app_builder(args)._bound_deployment._replica_config
    assert replica.placement_group_bundles[1:] == [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}] * 4


def test_multi_model_serve_config_builds_one_deployment_per_model(helm):
    """ci/multi-model: the `models` list becomes the app's args; the app builder builds the ingress and a
    deployment per model whose names the config's deployments entries use; each entry's settings arrive."""
    from ray.serve.schema import ServeDeploySchema

    from distinfer.serving.ray_serve_multi import INGRESS_NAME, MultiModelArgs

    raw = _serve_config(helm, ci_values("multi-model"))
    (app,) = ServeDeploySchema.model_validate(raw).applications
    args = MultiModelArgs.model_validate(app.args)
    small, big = args.models
    assert (small.model, small.served_model_name) == ("/models/SmolLM2-1.7B-Instruct", "smollm2-1.7b")
    assert small.num_replicas == 2 and small.autoscaling_config is None and small.engine_kwargs["max_model_len"] == 8192
    assert big.tensor_parallel_size == 2 and big.num_replicas is None and big.autoscaling_config["max_replicas"] == 3
    assert (big.engine_kwargs["dtype"], big.engine_kwargs["gpu_memory_utilization"], big.engine_kwargs["kv_offloading_size"]) \
        == ("float16", 0.85, 16)
    assert small.engine_kwargs["dtype"] == "bfloat16"  # engine.* where the entry says nothing
    ingress = app_builder(app.args)._bound_deployment
    assert ingress.name == INGRESS_NAME
    built = {name: handle._bound_deployment for name, handle in ingress.init_args[0].items()}
    assert list(built) == ["smollm2-1.7b", "qwen2.5-7b"]
    assert [d.name for d in built.values()] == [d.name for d in app.deployments]  # the overrides attach
    assert all("ray_actor_options" not in d for d in raw["applications"][0]["deployments"])
    assert built["smollm2-1.7b"]._replica_config.ray_actor_options["num_gpus"] == 1  # one rank, in the replica
    assert built["qwen2.5-7b"]._replica_config.placement_group_bundles[1:] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert built["smollm2-1.7b"].num_replicas == 2


def test_multi_model_init_containers_prepare_every_model(helm):
    ray_service = one(render(helm, ci_values("multi-model")), "RayService")
    worker = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    models = [{e["name"]: e.get("value") for e in c["env"]}["DISTINFER_MODEL"] for c in worker["initContainers"]]
    assert models == ["/models/SmolLM2-1.7B-Instruct", "/models/qwen2.5-7b-instruct"]
    assert "DISTINFER_MODEL" not in {e["name"] for e in worker["containers"][0]["env"]}  # the args name the models


@pytest.mark.parametrize("models,message", [
    ([{"servedModelName": "a", "path": "x"}, {"servedModelName": "a", "path": "y"}], "servedModelName \"a\" is used twice"),
    ([{"servedModelName": "a", "path": "x", "tensorParallelSize": 4}], "cannot hold a model's tensorParallelSize"),
])
def test_bad_models_fail_the_render(helm, models, message):
    result = run_helm(helm, "template", "rel", str(CHART), "-f", str(ci_values("multi-model")),
                      "--set-json", f"models={json.dumps(models)}")
    assert result.returncode != 0 and message in result.stderr, result.stderr
