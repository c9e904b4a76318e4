"""RayExecutor: a placement group with one bundle per rank and one Worker actor per rank.

Every step the same SchedulerOutput diff goes to every rank; the output comes back from the
rank that samples (last pipeline stage, tensor-parallel rank 0). Worker death is detected by
waiting on every rank's reply, so a dead actor surfaces within seconds as EngineDeadError
instead of a hang on a collective.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distinfer.config import DistInferConfig, ParallelConfig
from distinfer.errors import EngineDeadError
from distinfer.executor.base import Executor
from distinfer.executor.ray_worker import RayWorker
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.model.loader import load_hf_config
from distinfer.worker.model_runner import StepTimings

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0
INIT_TIMEOUT_S = 600.0
# The private local Ray (no dashboard, nobody to read its task events or metrics) skips the exporters
# whose flush timeouts would add ~15 s to every shutdown, past a Kubernetes grace period.
PRIVATE_RAY_SYSTEM_CONFIG = {"task_events_report_interval_ms": 0, "enable_metrics_collection": False}
FAILURE_GRACE_S = 5.0  # how long a peer's communication error waits for the root cause to surface
_PEER_ERROR_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport",
                       "NCCL error", "ProcessGroupNCCL")


@dataclass
class ControlTimings:
    """Driver-side view of the last step (seconds). `worker_compute` is the compute on the critical
    path: per pipeline stage its slowest rank's own work, summed over the stages (a batch crosses
    them one after the other). `worker_collective` is the rest of the busiest rank's step: all-reduce,
    all-gather, send/recv, and waiting for peers there. `control_overhead` is what remains of the
    wall time: pickling the diff, Ray's calls to every rank and back, and the driver's wait."""

    wall: float = 0.0
    worker_compute: float = 0.0
    worker_collective: float = 0.0
    per_rank: list[StepTimings] = field(default_factory=list)

    @property
    def control_overhead(self) -> float:
        return max(0.0, self.wall - self.worker_compute - self.worker_collective)

    @classmethod
    def from_ranks(cls, wall: float, timings: list[StepTimings], ranks_per_stage: int) -> "ControlTimings":
        busy = [t.prepare + t.forward + t.sample for t in timings]
        own = [b - t.collective for b, t in zip(busy, timings)]
        compute = sum(max(own[s:s + ranks_per_stage]) for s in range(0, len(own), ranks_per_stage))
        compute = min(compute, max(busy))  # several batches in flight overlap the stages
        return cls(wall, compute, max(busy) - compute, timings)


def ensure_ray(world_size: int, address: str | None = None) -> None:
    """Connect to a running cluster (`address`/RAY_ADDRESS, e.g. "auto") or start a local Ray with
    a logical CPU per rank."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = max(os.cpu_count() or 1, world_size + 1)
    with _loopback_only():
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1", _system_config=PRIVATE_RAY_SYSTEM_CONFIG)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Keep a private local Ray on 127.0.0.1. On Linux Ray turns a loopback node address into the
    host's routable one (and its servers then listen on every interface) unless multi-node support
    is off, as on macOS; a local instance started here never takes other nodes."""
    constants = getattr(ray, "_private").ray_constants
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # another Ray version: keep its default behaviour
        yield
        return
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def check_parallel_shapes(hf_config: Any, parallel: ParallelConfig) -> None:
    """The model splits over tp x pp: query heads divide by tp, KV heads divide tp or by it
    (replicated when tp > num_kv_heads), and every pipeline stage gets at least one layer."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's num_attention_heads {heads}")
    if (kv_heads % tp) if tp < kv_heads else (tp % kv_heads):
        raise ValueError(f"tensor_parallel_size {tp} and the model's num_key_value_heads {kv_heads} must divide "
                         "one another")
    if pp > hf_config.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {hf_config.num_hidden_layers} layers")
    partition = parallel.pipeline_layer_partition
    if partition is not None and sum(partition) != hf_config.num_hidden_layers:
        raise ValueError(f"pipeline_layer_partition {','.join(map(str, partition))} sums to {sum(partition)}, "
                         f"not the model's {hf_config.num_hidden_layers} layers")


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, config: DistInferConfig, ray_address: str | None = None) -> None:
        super().__init__(config)
        self.world_size = config.parallel.world_size
        self.last_control = ControlTimings()
        self._dead: EngineDeadError | None = None
        check_parallel_shapes(load_hf_config(config.model), config.parallel)  # before any actor starts
        ensure_ray(self.world_size, ray_address)
        self.placement_group = self._create_placement_group()
        self.workers = self._create_workers()
        try:
            self._init_workers()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------ start-up

    def _bundle(self) -> dict[str, float]:
        return {"GPU": 1.0, "CPU": 1.0} if self.config.model.device.startswith("cuda") else {"CPU": 1.0}

    def _create_placement_group(self):
        self._bundle_offset, self._owns_placement_group = 0, True
        current = get_current_placement_group()
        if current is not None:  # e.g. a Ray Serve replica that reserved bundles for its workers
            return self._use_current_placement_group(current)
        pg = placement_group([self._bundle() for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except Exception as exc:
            remove_placement_group(pg)
            raise RuntimeError(f"could not place {self.world_size} workers ({self._bundle()} each) within "
                               f"{PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.available_resources()} free") from exc
        return pg

    def _use_current_placement_group(self, pg):
        """Place the ranks in the last world_size bundles of the group this actor runs in (bundle 0
        and any others before them belong to the caller), instead of reserving a second group."""
        bundles = pg.bundle_specs
        offset = len(bundles) - self.world_size
        need = self._bundle()
        if offset < 0 or any(b.get(k, 0.0) < v for b in bundles[offset:] for k, v in need.items()):
            raise RuntimeError(f"the current placement group {bundles} lacks {self.world_size} trailing bundles of {need} for the workers")
        self._bundle_offset, self._owns_placement_group = offset, False
        logger.info("placing %d workers in bundles %d..%d of the current placement group", self.world_size, offset, len(bundles) - 1)
        return pg

    def _create_workers(self) -> list[Any]:
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        actor_cls = ray.remote(RayWorker)
        workers = []
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.placement_group, placement_group_bundle_index=self._bundle_offset + rank)
            # One call at a time, in submission order: every rank must see steps in the same order.
            options = dict(scheduling_strategy=strategy, num_cpus=1, max_concurrency=1)
            if "GPU" in self._bundle():
                options["num_gpus"] = 1
            workers.append(actor_cls.options(**options).remote(self.config, rank, threads))
        return workers

    def _init_workers(self) -> None:
        host, port = ray.get(self.workers[0].free_address.remote(), timeout=INIT_TIMEOUT_S)
        init_method = f"tcp://{host}:{port}"
        self._call_all("init_distributed", init_method, timeout=INIT_TIMEOUT_S)
        self._call_all("load_model", timeout=INIT_TIMEOUT_S)
        self.output_rank = ray.get(self.workers[0].output_rank.remote())

    # ------------------------------------------------------------ calls

    def _call_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Call `method` on every rank; raise EngineDeadError as soon as any rank fails or dies."""
        return self._wait_all(self._launch(method, *args), method, timeout or self.config.scheduler.step_timeout_s)

    def _launch(self, method: str, *args: Any) -> list[Any]:
        if self._dead is not None:
            raise self._dead
        return [getattr(w, method).remote(*args) for w in self.workers]

    def _wait_all(self, refs: list[Any], method: str, timeout: float) -> list[Any]:
        results: dict[Any, Any] = {}
        deadline = time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._mark_dead(f"{method} timed out after {timeout:.0f} s")
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except Exception as exc:  # actor died or raised: the instance cannot continue
                    self._mark_dead(_failure_reason(refs, {refs.index(ref): exc}, pending, method))
        return [results[r] for r in refs]

    def _mark_dead(self, reason: str) -> None:
        """Fail this and every later call, and release the other ranks at once: they may be blocked
        in a collective with the dead one, and their bundles are needed by a replacement instance."""
        self._dead = EngineDeadError(f"engine is dead: {reason}")
        logger.error("%s; releasing the instance's workers", reason)
        self._release()
        raise self._dead

    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks", timeout=INIT_TIMEOUT_S))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_kv_cache", num_blocks, timeout=INIT_TIMEOUT_S)

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None,
                       rank_args: Sequence[tuple] | None = None) -> list[Any]:
        """`timeout` defaults to step_timeout_s, like a step."""
        if rank_args is None:
            return self._call_all("execute_method", method, *args, timeout=timeout)
        if len(rank_args) != len(self.workers):
            raise ValueError(f"rank_args has {len(rank_args)} entries for {len(self.workers)} ranks")
        if self._dead is not None:
            raise self._dead
        refs = [w.execute_method.remote(method, *args, *extra) for w, extra in zip(self.workers, rank_args)]
        return self._wait_all(refs, method, timeout or self.config.scheduler.step_timeout_s)

    @property
    def max_concurrent_batches(self) -> int:
        return self.config.parallel.pipeline_parallel_size

    def submit(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Send the step to every rank now; the returned callable waits for all of them."""
        start = time.perf_counter()
        refs = self._launch("execute_model", scheduler_output)
        return lambda: self._collect(refs, start)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.submit(scheduler_output)()

    def _collect(self, refs: list[Any], start: float) -> ModelRunnerOutput:
        replies = self._wait_all(refs, "execute_model", self.config.scheduler.step_timeout_s)
        parallel = self.config.parallel
        self.last_control = ControlTimings.from_ranks(time.perf_counter() - start, [t for _, t in replies],
                                                      parallel.tensor_parallel_size * parallel.sequence_parallel_size)
        return replies[self.output_rank][0]

    def check_health(self) -> None:
        self._call_all("ping", timeout=10.0)

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = EngineDeadError("engine is dead: the executor was shut down")
        self._release()

    def _release(self) -> None:
        """Kill every worker actor and remove the placement group (idempotent, never raises)."""
        workers, self.workers = getattr(self, "workers", []), []
        for worker in workers:
            try:
                ray.kill(worker)
            except Exception as exc:  # already dead
                logger.debug("ray.kill of a worker failed: %s", exc)
        pg, self.placement_group = getattr(self, "placement_group", None), None
        if pg is not None and getattr(self, "_owns_placement_group", True):  # a borrowed group stays
            try:
                remove_placement_group(pg)
            except Exception:  # already removed, or Ray is gone
                logger.debug("placement group removal failed", exc_info=True)


def _failure_reason(refs: list[Any], failures: dict[int, BaseException], pending: list[Any], method: str) -> str:
    """Name the rank that caused a failure. When the first error is only a peer's broken connection
    (a collective with a rank that just died), wait briefly for the rank that really failed."""
    if pending and all(_is_peer_error(exc) for exc in failures.values()):
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - collected to find the root cause
                failures[refs.index(ref)] = exc
    rank, exc = min(failures.items(), key=lambda item: (_is_peer_error(item[1]), item[0]))
    others = sorted(set(failures) - {rank})
    also = f" (then rank {', '.join(map(str, others))} failed too)" if others else ""
    return f"worker rank {rank} failed in {method}: {_describe(exc)}{also}"


def _is_peer_error(exc: BaseException) -> bool:
    """A communication error raised on a healthy rank because another rank went away."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return False
    text = str(getattr(exc, "cause", None) or exc)
    return any(marker in text for marker in _PEER_ERROR_MARKERS)


def _describe(exc: BaseException) -> str:
    """One line for a worker failure: the remote exception itself, or why the actor died."""
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the worker's own exception
    if isinstance(cause, BaseException) and not isinstance(exc, ray.exceptions.RayActorError):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = [line.split(". ")[0].rstrip(".") + "." for line in lines if line.startswith("The actor is dead because")]
    return " ".join([f"{type(exc).__name__}: {lines[0] if lines else ''}", *why[:1]])
