"""ModelRunner: turns a SchedulerOutput diff into tensors, runs the model, samples."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from distinfer.config import DistInferConfig
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.model.attention.paged import AttentionMetadata
from distinfer.model.loader import load_hf_config, load_model
from distinfer.worker.input_batch import InputBatch, StepInputs
from distinfer.worker.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass
class StepTimings:
    """Seconds spent in the last step, for benchmarks."""

    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0


class ModelRunner:
    def __init__(self, config: DistInferConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.block_size = config.cache.block_size
        self.hf_config = load_hf_config(config.model)
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.batch = InputBatch()
        self.sampler = Sampler(seed=config.model.seed)
        self.timings = StepTimings()

    def load_model(self) -> None:
        started = time.perf_counter()
        self.model = load_model(self.config.model, self.hf_config)
        logger.info("model loaded in %.1f s", time.perf_counter() - started)

    def determine_num_blocks(self) -> int:
        """KV blocks this rank can hold: the explicit count, else the byte budget / bytes per block."""
        if self.config.cache.num_kv_blocks is not None:
            return self.config.cache.num_kv_blocks
        per_block = self.model.kv_cache_bytes_per_block(self.block_size)
        return max(1, self.config.cache.kv_cache_bytes // per_block)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = self.model.make_kv_caches(num_blocks, self.block_size, self.device)
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, self.block_size)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.batch.update(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        t0 = time.perf_counter()
        inputs = self.batch.prepare(scheduler_output)
        input_ids, positions, attn_metadata = self._to_tensors(inputs)
        t1 = time.perf_counter()
        hidden = self.model(input_ids, positions, self.kv_caches, attn_metadata)
        t2 = time.perf_counter()
        output = self._sample(inputs, hidden)
        self.timings = StepTimings(prepare=t1 - t0, forward=t2 - t1, sample=time.perf_counter() - t2)
        return output

    def _to_tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(inputs.positions, dtype=torch.long, device=self.device)
        attn_metadata = AttentionMetadata.build(
            inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, self.device
        )
        return input_ids, positions, attn_metadata

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor) -> ModelRunnerOutput:
        sampled: list[list[int]] = [[] for _ in inputs.req_ids]
        logprobs: list = [None] * len(inputs.req_ids)
        if inputs.sample_rows:
            ends = torch.tensor(inputs.query_lens, device=self.device).cumsum(0) - 1
            last_token_index = ends[torch.tensor(inputs.sample_rows, device=self.device)]
            logits = self.model.compute_logits(hidden[last_token_index])
            rows = [self.batch.states[inputs.req_ids[i]].sampling_row() for i in inputs.sample_rows]
            token_ids, row_logprobs = self.sampler(logits, rows)
            for batch_index, token_id, lp in zip(inputs.sample_rows, token_ids, row_logprobs):
                sampled[batch_index] = [token_id]
                logprobs[batch_index] = None if lp is None else [lp]
        has_logprobs = any(lp is not None for lp in logprobs)
        return ModelRunnerOutput(inputs.req_ids, sampled, logprobs if has_logprobs else None)
