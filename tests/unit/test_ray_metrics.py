"""distinfer/serving/ray_metrics.py: an EngineMetrics registry mirrored into real ray.util.metrics gauges
(recorded as they are set), so that Ray's per-node metrics endpoint carries every replica's metrics."""
from __future__ import annotations

import warnings

from prometheus_client import CollectorRegistry, Counter, Histogram

from distinfer.serving.ray_metrics import RayMetricsBridge, ray_gauge


class _Recorded:
    """A real Ray gauge whose last value per tag set is kept for the test to read."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.gauge = ray_gauge(name, description, tag_keys)  # validates the name and the tag keys
        self.values: dict[tuple, float] = {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.gauge.set(value, tags=tags)  # Ray raises on tags that do not match the declared keys
        self.values[tuple(sorted(tags.items()))] = value


def test_registry_is_mirrored_into_ray_gauges():
    registry = CollectorRegistry()
    tokens = Counter("distinfer:generation_tokens", "Tokens generated.", ["model_name"], registry=registry)
    ttft = Histogram("distinfer:time_to_first_token_seconds", "TTFT.", ["model_name"], buckets=(0.1, 1.0),
                     registry=registry)
    tokens.labels("smol").inc(7)
    ttft.labels("smol").observe(0.5)
    gauges: dict[str, _Recorded] = {}

    def make(name, description, keys):
        gauges[name] = _Recorded(name, description, keys)
        return gauges[name]

    bridge = RayMetricsBridge(registry, make_gauge=make)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray warns (and will refuse) names with ':'
        assert bridge.export_once() == 6  # the counter + 3 buckets, _count and _sum
    assert gauges["distinfer_generation_tokens_total"].values == {(("model_name", "smol"),): 7.0}
    buckets = gauges["distinfer_time_to_first_token_seconds_bucket"].values
    assert buckets == {(("le", "0.1"), ("model_name", "smol")): 0.0, (("le", "1.0"), ("model_name", "smol")): 1.0,
                       (("le", "+Inf"), ("model_name", "smol")): 1.0}
    assert not any(name.endswith("_created") for name in gauges)
    tokens.labels("smol").inc(3)  # later exports update the same gauges
    bridge.export_once()
    assert gauges["distinfer_generation_tokens_total"].values[(("model_name", "smol"),)] == 10.0
    assert len(gauges) == 4


def test_bridge_thread_exports_until_stopped():
    registry = CollectorRegistry()
    Counter("distinfer:prompt_tokens", "Prompt tokens.", ["model_name"], registry=registry).labels("m").inc()
    exported = []
    bridge = RayMetricsBridge(registry, interval_s=0.05,
                              make_gauge=lambda n, d, k: type("G", (), {"set": lambda self, v, tags: exported.append(v)})())
    bridge.start()
    import time
    deadline = time.monotonic() + 10
    while not exported and time.monotonic() < deadline:
        time.sleep(0.02)
    bridge.stop()
    assert exported == [1.0] * len(exported) and exported
    count = len(exported)
    time.sleep(0.2)
    assert len(exported) == count  # stopped
