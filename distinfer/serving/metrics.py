"""Prometheus metrics with vLLM-like names under `distinfer:`, recorded from the engine side.

`EngineMetrics.attach(engine, model_name)` registers a step callback on the AsyncLLM, so every
request counts whatever API it came through (HTTP, gRPC, Ray Serve). Scheduler and cache state
(running/waiting requests, KV usage, prefix cache and preemption counters) are exposed from the
stats snapshot the step loop hands over after each step. Each EngineMetrics owns its registry.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from distinfer.messages import EngineStats, RequestOutput

if TYPE_CHECKING:
    from distinfer.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# No `*_created` series (as vLLM): they double the exposition and no dashboard reads them.
prometheus_client.disable_created_metrics()

PREFIX = "distinfer:"
# vLLM's buckets, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

_attached: "weakref.WeakKeyDictionary[AsyncLLM, EngineMetrics]" = weakref.WeakKeyDictionary()


@dataclass
class _Tracked:
    """What was already recorded for one live request."""

    generation_tokens: int = 0
    last_token_time: float | None = None
    first_token_seen: bool = False


class _StatsCollector(Collector):
    """Gauges and cumulative counters read from the latest EngineStats snapshot."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: EngineStats | None = None
        self.is_dead: Callable[[], bool] = lambda: False

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            metric = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric(labels, value)
            return metric

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            metric = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric(labels, value)
            return metric

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled (incl. preempted).", stats.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", stats.kv_cache_usage)
        yield gauge("num_kv_cache_blocks", "KV cache blocks in the pool.", stats.num_total_blocks)
        yield gauge("engine_dead", "1 when the engine step loop has died.", 1.0 if self.is_dead() else 0.0)
        yield counter("prefix_cache_queries", "Prefix cache lookups (as the KV manager counts them).", stats.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prefix cache hits (same unit as queries).", stats.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted (swapped out or recomputed) since start.",
                      stats.num_preemptions)
        yield counter("num_swapped_preemptions", "Preemptions that swapped the request to the host KV tier.",
                      stats.num_swapped_preemptions)
        yield counter("num_recomputed_tokens", "Computed tokens given up by recompute preemptions.",
                      stats.num_recomputed_tokens)
        yield gauge("host_kv_cache_usage_perc", "Fraction of host KV tier blocks in use (1 = full).",
                    stats.host_kv_cache_usage)
        yield gauge("num_host_kv_cache_blocks", "Blocks in the host KV tier (0: none).", stats.num_host_blocks)
        yield counter("host_prefix_cache_hits", "Prefix cache hit tokens copied back from the host tier.",
                      stats.host_prefix_cache_hits)
        migrations = CounterMetricFamily(PREFIX + "num_migrated_requests",
                                         "Requests moved between engine instances (live migration, prefill/decode "
                                         "hand-off, failover), by direction as each instance counts them.",
                                         labels=["model_name", "direction"])
        migrations.add_metric(labels + ["in"], stats.num_migrated_in)
        migrations.add_metric(labels + ["out"], stats.num_migrated_out)
        yield migrations
        transfer = CounterMetricFamily(PREFIX + "kv_transfer_bytes", "KV bytes copied between the tiers.",
                                       labels=["model_name", "direction"])
        transfer.add_metric(labels + ["to_host"], stats.kv_bytes_to_host)
        transfer.add_metric(labels + ["to_device"], stats.kv_bytes_to_device)
        yield transfer


class EngineMetrics:
    """Per-engine Prometheus metrics; `observe` is the AsyncLLM step callback."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        self._live: dict[str, _Tracked] = {}
        self._stats = _StatsCollector(model_name)
        self.registry.register(self._stats)
        names = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, names, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, names, registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive token deliveries of a request.", ITL_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first, per request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish, per finished request.", E2E_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Generated tokens of finished requests.", TOKEN_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled (counted at the first token).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(PREFIX + "request_success", "Requests ended, by finish reason (stop/length/abort).",
                                ["model_name", "finished_reason"], registry=self.registry)

    @classmethod
    def attach(cls, engine: "AsyncLLM", model_name: str) -> "EngineMetrics":
        """The engine's metrics, created and registered as its step callback on first use."""
        metrics = _attached.get(engine)
        if metrics is None:
            metrics = cls(model_name)
            metrics._stats.stats = engine.get_stats()
            engine_ref = weakref.ref(engine)
            metrics._stats.is_dead = lambda: bool(getattr(engine_ref(), "is_dead", True))
            engine.add_step_callback(metrics.observe)
            _attached[engine] = metrics
        return metrics

    # ------------------------------------------------------------ step-loop thread

    def observe(self, outputs: list[RequestOutput], stats: EngineStats, aborted: list[str]) -> None:
        self._stats.stats = stats
        for output in outputs:
            self._observe_output(output)
        for request_id in aborted:
            if self._live.pop(request_id, None) is not None:
                self._success.labels(self.model_name, "abort").inc()

    def _observe_output(self, output: RequestOutput) -> None:
        m = output.metrics
        if m is None:
            return
        tracked = self._live.setdefault(output.request_id, _Tracked())
        if m.first_token_time is not None and not tracked.first_token_seen:
            tracked.first_token_seen = True
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            self.prompt_tokens.inc(m.num_prompt_tokens)
        new_tokens = m.num_generation_tokens - tracked.generation_tokens
        if new_tokens > 0:
            self.generation_tokens.inc(new_tokens)
            tracked.generation_tokens = m.num_generation_tokens
        if m.last_token_time is not None and m.last_token_time != tracked.last_token_time:
            if tracked.last_token_time is not None:
                self.itl.observe(max(0.0, m.last_token_time - tracked.last_token_time))
            tracked.last_token_time = m.last_token_time
        if output.finished:
            self._live.pop(output.request_id, None)
            self._observe_finished(output)

    def _observe_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        assert m is not None
        if m.finished_time is not None:
            self.e2e.observe(max(0.0, m.finished_time - m.arrival_time))
        if m.num_generation_tokens > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.tpot.observe(max(0.0, m.last_token_time - m.first_token_time) / (m.num_generation_tokens - 1))
        self.request_prompt_tokens.observe(m.num_prompt_tokens)
        self.request_generation_tokens.observe(m.num_generation_tokens)
        reasons = [o.finish_reason for o in output.outputs if o.finish_reason]
        self._success.labels(self.model_name, reasons[-1] if reasons else "stop").inc()

    # ------------------------------------------------------------ scrape side

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
