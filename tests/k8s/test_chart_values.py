"""values.yaml and values.schema.json: every value reaches a rendered object, and the schema rejects
unknown keys, wrong types, bad enums and numbers below their minimum (helm fails with the schema error)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.k8s.conftest import CHART, RenderError, ci_values, render, run_helm

# Leaf -> (other value, settings it needs to render); leaves not listed: booleans flip, numbers + 1.
DEPLOY = ("mode=deployment",)
GROUP = "ray.workerGroups[0]"
OTHER: dict[str, tuple[object, tuple[str, ...]]] = {
    "mode": ("deployment", ()),
    "nameOverride": ("other", ()), "fullnameOverride": ("other", ()),
    "image.repository": ("registry.example.com/distinfer", ()), "image.tag": ("9.9.9", ()),
    "image.pullPolicy": ("Always", ()), "imagePullSecrets": (["creds"], ()),
    "model.source": ("hostPath", ("model.hostPath.path=/mnt",)),
    "model.path": ("/opt/model", ()), "model.servedModelName": ("m", ()),
    "model.mountPath": ("/mnt/m", ("model.source=pvc", "model.pvc.claimName=c")),
    "model.pvc.claimName": ("c2", ("model.source=pvc", "model.pvc.claimName=c")),
    "model.hostPath.path": ("/b", ("model.source=hostPath", "model.hostPath.path=/a")),
    "model.cache.claimName": ("cache", ()), "model.cache.sizeLimit": ("1Gi", ()),
    "models": ([{"servedModelName": "m", "path": "/opt/m"}], ()),
    "engine.device": ("cpu", ()), "engine.dtype": ("float16", ()),
    "engine.tensorParallelSize": (2, (f"{GROUP}.gpus=2",)),
    "engine.sequenceParallelSize": (2, (f"{GROUP}.gpus=2",)),
    "engine.gpuMemoryUtilization": (0.5, ()),
    "router.dispatchPolicy": ("round_robin", ("router.instances=2",)),
    "router.prefillInstances": (2, ("router.prefillInstances=1", "router.decodeInstances=1")),
    "router.decodeInstances": (2, ("router.prefillInstances=1", "router.decodeInstances=1")),
    "router.migrationPolicy": ("balance", ("router.instances=2",)),
    "router.migrationTransport": ("p2p", ()),
    "serve.applicationName": ("other", ()), "serve.acceleratorType": ("A100", ()),
    "serve.numReplicas": (2, ("serve.autoscaling.enabled=false",)), "serve.logLevel": ("DEBUG", ()),
    "ray.version": ("2.61.0", ()), "ray.autoscaler.upscalingMode": ("Aggressive", ()),
    "ray.head.resources.requests.cpu": ("3", ()), "ray.head.resources.requests.memory": ("9Gi", ()),
    "ray.head.resources.limits.cpu": ("3", ()), "ray.head.resources.limits.memory": ("9Gi", ()),
    f"{GROUP}.name": ("g2", ()), f"{GROUP}.cpus": ("9", ()), f"{GROUP}.memory": ("33Gi", ()),
    f"{GROUP}.nodeSelector": ({"a": "b"}, ()), f"{GROUP}.tolerations": ([{"key": "k", "operator": "Exists"}], ()),
    "deployment.gpus": (2, DEPLOY), "deployment.cpus": ("5", DEPLOY), "deployment.memory": ("17Gi", DEPLOY),
    "deployment.drainTimeoutS": (26, DEPLOY), "deployment.terminationGracePeriodSeconds": (31, DEPLOY),
    "deployment.startupFailureThreshold": (61, DEPLOY),
    "shm.sizeLimit": ("2Gi", ()), "apiKey.existingSecret": ("s", ()), "apiKey.secretKey": ("k", ()),
    "tls.secretName": ("t", DEPLOY),
    "service.type": ("LoadBalancer", ()), "service.annotations": ({"a": "b"}, ()),
    "ingress.className": ("nginx", ("ingress.enabled=true",)), "ingress.host": ("h.example.com", ("ingress.enabled=true",)),
    "ingress.annotations": ({"a": "b"}, ("ingress.enabled=true",)),
    "grpcRoute.enabled": (True, ('grpcRoute.parentRefs=[{"name": "g"}]',)),
    "grpcRoute.hostnames": (["h"], ("grpcRoute.enabled=true", 'grpcRoute.parentRefs=[{"name": "g"}]')),
    "grpcRoute.parentRefs": ([{"name": "g2"}], ("grpcRoute.enabled=true", 'grpcRoute.parentRefs=[{"name": "g"}]')),
    "serviceMonitor.interval": ("60s", ()), "serviceMonitor.labels": ({"a": "b"}, ()),
    "networkPolicy.apiFrom": ([{"podSelector": {"matchLabels": {"a": "b"}}}], ()),
    "networkPolicy.dashboardFrom": ([{"podSelector": {"matchLabels": {"a": "b"}}}], ()),
    "scheduling.nodeSelector": ({"a": "b"}, ()),
    "scheduling.tolerations": ([{"key": "k", "operator": "Exists"}], ()),
    "scheduling.affinity": ({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}, ()),
    "scheduling.topologySpreadConstraints": ([{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}], ()),
    "scheduling.priorityClassName": ("p", ()), "podAnnotations": ({"a": "b"}, ()),
    "helmTest.prompt": ("Hi", ()),
}


def _leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(node, list) and node and isinstance(node[0], dict):
        return _leaves(node[0], f"{prefix}[0]")
    return [(prefix, node)]


DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
LEAVES = _leaves(DEFAULTS)


def _other(path: str, value: object) -> tuple[object, tuple[str, ...]]:
    if path in OTHER:
        return OTHER[path]
    if isinstance(value, bool):
        return not value, ()
    if isinstance(value, (int, float)):
        return value + 1, ()
    raise AssertionError(f"values.yaml {path}: add another value for it to OTHER in {__file__}")


def _normalized(helm: str, sets: tuple[str, ...]) -> list[dict]:
    objects = render(helm, sets=sets, set_flag="--set-json")
    for obj in objects:
        if obj["kind"] == "Secret":  # the generated API key is random on every render
            obj["data"] = sorted(obj["data"])
    return objects


def test_every_value_reaches_a_rendered_object(helm):
    """Changing any single value in values.yaml changes what the chart renders: no value is ignored."""
    def check(leaf: tuple[str, object]) -> str | None:
        path, value = leaf
        other, needs = _other(path, value)
        base = [_parse(s) for s in needs]
        try:
            before = _normalized(helm, _json_sets(base))
            after = _normalized(helm, _json_sets(base + [(path, other)]))
        except RenderError as exc:
            return f"{path}: {exc}"
        return None if before != after else f"{path}: {value!r} -> {other!r} renders the same objects"

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(check, LEAVES) if p]
    assert not problems, "\n".join(problems)


def _parse(setting: str) -> tuple[str, object]:
    """'a.b=x' -> ("a.b", x), x read as JSON when it is JSON (numbers, booleans, lists, objects)."""
    path, _, raw = setting.partition("=")
    try:
        return path, json.loads(raw)
    except ValueError:
        return path, raw


def _json_sets(settings: list[tuple[str, object]]) -> tuple[str, ...]:
    """--set-json settings; a worker group's fields are set as the whole group (helm --set on a list index
    replaces the item)."""
    group = dict(DEFAULTS["ray"]["workerGroups"][0])
    out = []
    for path, value in settings:
        if path.startswith(GROUP + "."):
            group[path.removeprefix(GROUP + ".")] = value
        else:
            out.append(f"{path}={json.dumps(value)}")
    if group != DEFAULTS["ray"]["workerGroups"][0]:
        out.append(f"ray.workerGroups={json.dumps([group])}")
    return tuple(out)


@pytest.mark.parametrize("setting,message", [
    ('ray.workerGroups=[{"name": "g", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": -1, "cpus": "1", '
     '"memory": "1Gi"}]', "at '/ray/workerGroups/0/gpus': minimum: got -1, want 0"),
    ("deployment.gpus=-2", "at '/deployment/gpus': minimum: got -2, want 0"),
    ("engine.bogus=1", "additional properties 'bogus' not allowed"),
    ("ray.head.resources.requests.gpu=1", "additional properties 'gpu' not allowed"),
    ('engine.dtype="fp8"', "value must be one of"),
    ('models=[{"servedModelName": "a", "path": "a", "replicas": 2}]', "additional properties 'replicas' not allowed"),
    ('models=[{"servedModelName": "a"}]', "missing property 'path'"),
    ('models=[{"servedModelName": "a", "path": "a", "numReplicas": 0}]', "minimum: got 0, want 1"),
    ('router.dispatchPolicy="random"', "value must be one of"),
    ('engine.tensorParallelSize="two"', "got string, want integer"),
    ("engine.gpuMemoryUtilization=1.5", "maximum"),
])
def test_schema_rejects_bad_values(helm, setting, message):
    result = run_helm(helm, "template", "rel", str(CHART), "--set-json", setting)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and message in result.stderr, result.stderr


@pytest.mark.parametrize("sets,message", [
    (("engine.tensorParallelSize=4",), "cannot hold tensorParallelSize x sequenceParallelSize"),
    (("model.pvc.claimName=",), "model.pvc.claimName"),
    (("tls.secretName=t", "ingress.enabled=false"), "set ingress.enabled"),
    (("router.dispatchPolicy=round_robin",), "need more than one instance"),
    (("router.prefillInstances=1",), "decodeInstances >= 1"),
    (("serve.acceleratorType=A100", "engine.device=cpu"), "acceleratorType needs engine.device=cuda"),
    (("mode=deployment", 'models=[{"servedModelName": "a", "path": "/m/a"}]'), "models (several models in one application) needs mode: rayservice"),
    (('models=[{"servedModelName": "a", "path": "a"}]',), "describe the single model"),  # gpu-tp2 sets model.path
])
def test_inconsistent_settings_fail_with_a_message(helm, sets, message):
    args = ["template", "rel", str(CHART), "-f", str(ci_values("gpu-tp2"))]
    for s in sets:
        args += ["--set-json" if s.startswith("models=") else "--set", s]
    result = run_helm(helm, *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
