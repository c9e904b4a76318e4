"""k8s/distinfer: helm lint --strict and kubernetes-validate --strict on every ci/ values file, and the
rendered objects themselves (GPU counts, probes, ports, the secrets they reference, CRD-gated objects)."""
from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tests.k8s.conftest import CHART, CI_VALUES, REPO, by_kind, ci_values, one, render, run_helm, template

RAY_CRDS = {"RayService", "ServiceMonitor", "GRPCRoute"}


def _ids(paths):
    return [p.name.removesuffix("-values.yaml") for p in paths]


@pytest.mark.parametrize("values", CI_VALUES, ids=_ids(CI_VALUES))
def test_helm_lint_strict(helm, values):
    result = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def _pod_templates(ray_service: dict) -> list[dict]:
    cluster = ray_service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("values", CI_VALUES, ids=_ids(CI_VALUES))
def test_rendered_manifests_validate_strict(helm, values):
    """helm template | kubernetes-validate --strict: built-in kinds must pass; CRDs are reported (no schema
    offline) but not failed. The pods and Service inside the RayService are validated as core objects."""
    rendered = template(helm, values)
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-"], input=rendered,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for obj in objects:
        name = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
        if obj["kind"] in RAY_CRDS:
            assert f"Couldn't find schema for kind {obj['kind']}" in result.stdout
        else:
            assert f"passed for resource {name}" in result.stdout, result.stdout
    version = kubernetes_validate.utils.latest_version()
    for ray_service in by_kind(objects, "RayService"):
        for pod in _pod_templates(ray_service):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": pod}, version, strict=True)
        service = dict(ray_service["spec"]["serveService"], apiVersion="v1", kind="Service")
        kubernetes_validate.validate(service, version, strict=True)


def _resources(container: dict) -> tuple[dict, dict]:
    return container["resources"].get("requests", {}), container["resources"].get("limits", {})


def test_gpu_counts(helm):
    tp2 = one(render(helm, ci_values("gpu-tp2")), "RayService")
    (group,) = tp2["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    requests, limits = _resources(worker)
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 2  # a tp=2 replica on one pod
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    head = tp2["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(head["template"])
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    cpu = render(helm, ci_values("cpu-single"))
    assert "nvidia.com/gpu" not in template(helm, ci_values("cpu-single"))
    assert one(cpu, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    plain = one(render(helm, ci_values("plain-deployment")), "Deployment")
    assert _resources(plain["spec"]["template"]["spec"]["containers"][0])[1]["nvidia.com/gpu"] == 1


def test_worker_pods_have_shm_cache_and_model_volumes(helm):
    ray_service = one(render(helm, ci_values("gpu-tp2")), "RayService")
    worker = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "distinfer-cache"
    (init,) = worker["initContainers"]
    assert init["command"][-1] == "prepare-model"
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["DISTINFER_MODEL"] == "/models/Llama-3.1-8B-Instruct"
    assert env["DISTINFER_CACHE_DIR"] == "/var/cache/distinfer"
    mounts = {m["name"]: m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm" and mounts["model"] == "/models" and mounts["cache"] == env["DISTINFER_CACHE_DIR"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert worker["priorityClassName"] == "inference-high"
    host = one(render(helm, ci_values("multi-instance-pd")), "RayService")
    host_volumes = {v["name"]: v for v in host["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]}
    assert host_volumes["model"]["hostPath"]["path"] == "/mnt/models"


def test_ports_and_probes(helm):
    ray_service = one(render(helm, ci_values("gpu-tp2")), "RayService")
    ports = {p["name"]: p["port"] for p in ray_service["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    serve_config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    assert (serve_config["http_options"]["port"], serve_config["grpc_options"]["port"]) == (8000, 50051)
    worker = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert {p["containerPort"] for p in worker["ports"]} == {8000, 50051, 8080}

    plain = render(helm, ci_values("plain-deployment"), sets=("tls.secretName=",))
    container = one(plain, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    grpc_probe = {"port": 50051, "service": "distinfer.v1.InferenceService"}  # native grpc.health.v1
    assert container["livenessProbe"]["grpc"] == container["startupProbe"]["grpc"] == grpc_probe
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    service = one(plain, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 50051}
    # kubelet's gRPC probe cannot speak TLS: with TLS the port is checked with a TCP connect.
    tls = one(render(helm, ci_values("plain-deployment")), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert tls["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert tls["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def _volume_secrets(pod_spec: dict) -> dict[str, str]:
    return {v["name"]: v["secret"]["secretName"] for v in pod_spec.get("volumes", []) if "secret" in v}


def test_api_key_and_tls_secrets_are_referenced(helm):
    generated = render(helm, ci_values("cpu-single"))
    (secret,) = by_kind(generated, "Secret")
    assert secret["metadata"]["name"] == "rel-distinfer-api-key" and len(secret["data"]["api-key"]) > 40
    worker = one(generated, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert _volume_secrets(worker)["api-key"] == "rel-distinfer-api-key"
    env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
    assert env["DISTINFER_API_KEY_FILE"] == "/etc/distinfer/api-key/api-key"
    assert "api_key" not in one(generated, "RayService")["spec"]["serveConfigV2"]  # never in the CR

    existing = render(helm, ci_values("gpu-tp2"))
    assert not by_kind(existing, "Secret")  # apiKey.existingSecret: the chart makes none
    worker = one(existing, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert _volume_secrets(worker)["api-key"] == "distinfer-api-key"
    assert {e["name"]: e["value"] for e in worker["containers"][0]["env"]}["DISTINFER_API_KEY_FILE"].endswith("/key")
    assert one(existing, "Ingress")["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "distinfer-tls"}]
    for pod in by_kind(existing, "Pod"):  # helm test pods authenticate with the same key
        assert _volume_secrets(pod["spec"])["api-key"] == "distinfer-api-key"

    plain = one(render(helm, ci_values("plain-deployment")), "Deployment")["spec"]["template"]["spec"]
    assert _volume_secrets(plain) == {"api-key": "rel-distinfer-api-key", "tls": "distinfer-tls"}
    args = plain["containers"][0]["args"]
    assert "--tls-cert=/etc/distinfer/tls/tls.crt" in args and "--require-api-key" in args
    assert plain["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_plain_deployment_command_is_a_valid_distinfer_serve(helm):
    from distinfer.cli import build_parser

    container = one(render(helm, ci_values("plain-deployment")), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "serve" and args.model_path == "/models/SmolLM2-1.7B-Instruct.Q8_0.gguf"
    assert (args.host, args.http_port, args.grpc_port) == ("0.0.0.0", 8000, 50051)
    assert args.served_model_name == "smollm2-1.7b" and args.device == "cuda" and args.drain_timeout == 55
    assert args.tls_cert and args.tls_key and args.require_api_key
    from distinfer.cli import engine_kwargs

    sp = one(render(helm, ci_values("plain-deployment"), sets=("engine.sequenceParallelSize=2", "deployment.gpus=2")),
             "Deployment")["spec"]["template"]["spec"]["containers"][0]
    kwargs = engine_kwargs(build_parser().parse_args(sp["command"][1:] + sp["args"]))
    assert (kwargs["sequence_parallel_size"], kwargs["tensor_parallel_size"]) == (2, 1)  # -sp reaches the engine


def test_security_context_is_non_root_everywhere(helm):
    for values in CI_VALUES:
        for obj in render(helm, values):
            pods = []
            if obj["kind"] == "RayService":
                pods = [t["spec"] for t in _pod_templates(obj)]
            elif obj["kind"] == "Deployment":
                pods = [obj["spec"]["template"]["spec"]]
            elif obj["kind"] == "Pod":
                pods = [obj["spec"]]
            for pod in pods:
                assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
                assert pod["automountServiceAccountToken"] is False
                for container in pod["containers"] + pod.get("initContainers", []):
                    context = container["securityContext"]
                    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}


def test_helm_test_pods_send_one_http_and_one_grpc_request(helm):
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        from entrypoint import build_parser
    finally:
        sys.path.pop(0)
    pods = by_kind(render(helm, ci_values("cpu-single")), "Pod")
    assert sorted(p["metadata"]["name"] for p in pods) == ["rel-distinfer-test-grpc", "rel-distinfer-test-http"]
    targets = {}
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        command = pod["spec"]["containers"][0]["command"]
        assert command[:2] == ["python", "/opt/distinfer/deploy/entrypoint.py"]
        args = build_parser().parse_args(command[2:])
        targets[args.protocol] = args.target
    assert targets == {"http": "http://rel-distinfer.ml.svc:8000", "grpc": "rel-distinfer.ml.svc:50051"}


def test_service_monitor_only_when_the_crd_exists(helm):
    with_crd = render(helm, ci_values("multi-instance-pd"))
    monitor = one(with_crd, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"  # Ray's metrics port on every Ray pod
    metrics = [s for s in by_kind(with_crd, "Service") if s["metadata"]["name"].endswith("-ray-metrics")]
    assert metrics and metrics[0]["spec"]["clusterIP"] == "None"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics[0]["metadata"]["labels"].items()
    assert not by_kind(render(helm, ci_values("multi-instance-pd"), api_versions=()), "ServiceMonitor")


def test_gateway_route_pdb_and_network_policy(helm):
    objects = render(helm, ci_values("gpu-tp2"))
    route = one(objects, "GRPCRoute")
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "rel-distinfer", "port": 50051}]
    assert route["spec"]["parentRefs"][0]["name"] == "shared-gateway"
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    policy = one(render(helm, ci_values("multi-instance-pd")), "NetworkPolicy")
    api_rule = policy["spec"]["ingress"][1]
    assert {p["port"] for p in api_rule["ports"]} == {8000, 50051, 8080}
    assert api_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "apps"}
