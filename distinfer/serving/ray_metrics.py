"""distinfer's Prometheus metrics exported through Ray's metrics system, for Ray Serve replicas.

Behind Serve's HTTP proxy, `GET /metrics` reaches one replica per scrape. Each replica therefore
mirrors its EngineMetrics registry into `ray.util.metrics` gauges every few seconds; Ray's metrics
agent on every node serves them (with the replica's WorkerId/NodeAddress tags) on the node's metrics
export port, which the chart's ServiceMonitor scrapes on every Ray pod. Prometheus then sums across
replicas: `sum(rate(ray_distinfer_generation_tokens_total[1m]))` is the whole application's rate.

Every sample becomes a gauge of the same name with `:` as `_` (Ray refuses `:`), e.g.
`distinfer:generation_tokens_total` -> `distinfer_generation_tokens_total`; a histogram's `_bucket`
samples keep their `le` tag, so counters and histograms keep their values; Ray's exporter adds its
`ray_` prefix.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

GaugeFactory = Callable[[str, str, tuple[str, ...]], Any]


def ray_metric_name(prometheus_name: str) -> str:
    return prometheus_name.replace(":", "_")


def ray_gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


@dataclass
class RayMetricsBridge:
    """Copies `registry` into Ray gauges: `export_once()` now, `start()` every `interval_s` on a thread."""

    registry: CollectorRegistry
    interval_s: float = 5.0
    make_gauge: GaugeFactory = ray_gauge
    _gauges: dict[str, tuple[Any, tuple[str, ...]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def export_once(self) -> int:
        """Sets one gauge per sample; returns how many samples were exported."""
        exported = 0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps: not a value to sum
                    continue
                name = ray_metric_name(sample.name)
                keys = tuple(sorted(sample.labels))
                gauge, gauge_keys = self._gauges.get(name, (None, keys))
                if gauge is None:
                    gauge = self.make_gauge(name, family.documentation, keys)
                    self._gauges[name] = (gauge, keys)
                elif gauge_keys != keys:  # a sample name's tag keys are fixed once registered
                    logger.debug("metric %s: tags %s differ from %s; skipped", sample.name, keys, gauge_keys)
                    continue
                gauge.set(float(sample.value), tags={k: str(v) for k, v in sample.labels.items()})
                exported += 1
        return exported

    def start(self) -> "RayMetricsBridge":
        self._thread = threading.Thread(target=self._run, name="distinfer-ray-metrics", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.export_once()
            except Exception:  # metrics must never take the replica down
                logger.exception("exporting metrics to Ray failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self._thread = None
