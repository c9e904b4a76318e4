"""The RayService's serveConfigV2 is a valid Serve config (Ray's own schema classes), the same
application as deploy/serve_config.yaml, and its args build the distinfer application (no Ray started)."""
from __future__ import annotations

import pytest
import yaml

from distinfer.serving.ray_serve import ServeAppArgs, app_builder
from tests.k8s.conftest import CI_VALUES, REPO, ci_values, one, render

RAY_VALUES = [v for v in CI_VALUES if "plain" not in v.name]


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
    if "sequence_parallel_size" not in ServeAppArgs.model_fields:
        pytest.skip("ServeAppArgs has no sequence_parallel_size yet (issue 12 adds it); the chart already sends it")
    assert ServeAppArgs.model_validate(args).sequence_parallel_size == 2
