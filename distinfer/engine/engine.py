"""LLMEngine: one model replica's step loop.

schedule() -> SchedulerOutput -> executor -> ModelRunnerOutput -> update() -> OutputProcessor -> RequestOutputs
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from collections import deque
from typing import Callable, Iterable

from distinfer.config import DistInferConfig
from distinfer.engine.migration import RequestMover
from distinfer.engine.input_processor import InputProcessor, ModelLimits, PromptType
from distinfer.engine.output_processor import OutputProcessor, RequestOutputKind
from distinfer.engine.request import Request
from distinfer.engine.scheduler import Scheduler
from distinfer.executor.base import Executor
from distinfer.messages import (
    EngineRequest,
    EngineStats,
    FinishReason,
    ModelRunnerOutput,
    RequestOutput,
    SchedulerOutput,
)
from distinfer.model.loader import load_hf_config, load_tokenizer
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Wall time of the last step, split for benchmarks (seconds). `launch` covers scheduling and
    starting steps (in-process executors run the model there); `wait` the wait for the oldest one."""

    launch: float = 0.0
    wait: float = 0.0
    update: float = 0.0
    num_tokens: int = 0


def _eos_token_ids(tokenizer, hf_config) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def resolve_max_model_len(config: DistInferConfig, hf_config) -> int:
    model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
    wanted = config.model.max_model_len
    if wanted is not None and wanted > model_max:
        raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {model_max}")
    return wanted or model_max


class LLMEngine:
    def __init__(self, config: DistInferConfig, executor_backend: str | None = None) -> None:
        self.config = config
        hf_config = load_hf_config(config.model)
        self.hf_config = hf_config
        self.tokenizer = load_tokenizer(config.model)
        self.max_model_len = resolve_max_model_len(config, hf_config)
        limits = ModelLimits(hf_config.vocab_size, self.max_model_len, _eos_token_ids(self.tokenizer, hf_config))
        self.input_processor = InputProcessor(self.tokenizer, limits)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.executor = Executor.create(config, executor_backend)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_kv_cache(num_blocks)
            num_host_blocks = self._init_host_tier()
            block_bytes = sum(self.executor.collective_rpc("kv_cache_bytes_per_block"))
            self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, self.max_model_len,
                                       self.executor.max_concurrent_batches, num_host_blocks, block_bytes,
                                       config.parallel.sequence_parallel_size)
        except BaseException:  # e.g. a KV budget too small for max_model_len: release the workers
            self.executor.shutdown()
            raise
        self.mover = RequestMover(self)  # both ends of moving requests to/from other instances
        self.last_step = StepStats()
        self._in_flight: deque[tuple[SchedulerOutput, Callable[[], ModelRunnerOutput]]] = deque()
        logger.info("engine ready: %d KV blocks, max_model_len %d", num_blocks, self.max_model_len)

    def _init_host_tier(self) -> int:
        """Host KV blocks every rank holds (the least any rank can; 0 when kv_offloading_size is 0)."""
        nbytes = int(self.config.cache.kv_offloading_size * (1 << 30))
        if nbytes <= 0:
            return 0
        num_host_blocks = min(self.executor.collective_rpc("determine_num_host_blocks", nbytes))
        self.executor.collective_rpc("initialize_host_cache", num_host_blocks, timeout=600)
        logger.info("host KV tier: %d blocks (%.2f GiB over %d rank(s))", num_host_blocks,
                    self.config.cache.kv_offloading_size, self.config.parallel.world_size)
        return num_host_blocks

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
    ) -> EngineRequest:
        request = self.input_processor.process(request_id, prompt, params, arrival_time, priority)
        self.add_processed_request(request, output_kind)
        return request

    def add_processed_request(self, request: EngineRequest, output_kind: RequestOutputKind) -> None:
        """Queue a processed request, all of it or (on any error, which is raised) nothing."""
        if request.sampling_params.max_tokens is None:
            request.sampling_params.max_tokens = self.max_model_len - len(request.prompt_token_ids)
        children = self.output_processor.add_request(request, output_kind)
        group_id = request.request_id if len(children) > 1 else None
        try:
            for child in children:
                self.scheduler.add_request(Request.from_engine_request(child, group_id=group_id))
        except BaseException:
            self.abort_request(request.request_id)
            raise

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        internal_ids = self.output_processor.abort_requests(ids)
        self.scheduler.finish_requests(internal_ids, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self._in_flight)
                or self.output_processor.get_num_unfinished_requests() > self.scheduler.num_paused)

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def get_stats(self) -> EngineStats:
        return replace(self.scheduler.get_stats(), num_migrated_in=self.mover.num_in, num_migrated_out=self.mover.num_out)

    # ------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Keep up to `max_concurrent_batches` steps in flight (pipeline stages), finish the oldest."""
        t0 = time.perf_counter()
        self.mover.expire_reservations()
        self._fill_pipeline()
        t1 = time.perf_counter()
        scheduler_output, wait = self._in_flight.popleft()
        runner_output = wait()
        t2 = time.perf_counter()
        core_outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_abort:
            # Stop strings end requests the scheduler still thinks are running.
            self.scheduler.finish_requests(processed.reqs_to_abort, FinishReason.STOP)
        if processed.reqs_to_fail:
            self.scheduler.finish_requests(processed.reqs_to_fail, FinishReason.ERROR)
        self.last_step = StepStats(t1 - t0, t2 - t1, time.perf_counter() - t2, scheduler_output.total_num_scheduled_tokens)
        return processed.request_outputs

    def _fill_pipeline(self) -> None:
        while len(self._in_flight) < self.executor.max_concurrent_batches:
            scheduler_output = self.scheduler.schedule()
            if self._in_flight and not scheduler_output.has_work and not scheduler_output.finished_req_ids:
                return  # nothing new to start; the workers need no empty step (KV copies are work)
            self._in_flight.append((scheduler_output, self.executor.submit(scheduler_output)))
            if scheduler_output.is_empty:
                return

    def shutdown(self) -> None:
        self.executor.shutdown()
