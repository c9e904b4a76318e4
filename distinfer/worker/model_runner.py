"""ModelRunner: turns a SchedulerOutput diff into tensors, runs the model, samples."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from distinfer.config import DistInferConfig
from distinfer.distributed.comm import pp_recv, pp_send, take_collective_seconds
from distinfer.distributed.parallel_state import get_pp_group, get_tp_rank
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
    forward: float = 0.0  # includes collective below
    sample: float = 0.0
    collective: float = 0.0  # all-reduce/all-gather/send/recv inside this step


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
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.samples = self.is_last_stage and get_tp_rank() == 0  # the rank whose output is returned

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
        take_collective_seconds()
        hidden = self._forward_stage(input_ids, positions, attn_metadata)
        t2 = time.perf_counter()
        output = self._sample(inputs, hidden) if self.is_last_stage else self._empty_output(inputs)
        self.timings = StepTimings(t1 - t0, t2 - t1, time.perf_counter() - t2, take_collective_seconds())
        return output

    def _forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata):
        """This pipeline stage's layers: receive the previous stage's tensors, send ours on."""
        intermediate = None
        if not self.is_first_stage:
            shape = (input_ids.shape[0], self.hf_config.hidden_size)
            dtype = self.config.model.torch_dtype
            intermediate = {name: pp_recv(shape, dtype, self.device) for name in ("hidden_states", "residual")}
        result = self.model(input_ids, positions, self.kv_caches, attn_metadata, intermediate)
        if not self.is_last_stage:
            for name in ("hidden_states", "residual"):
                pp_send(result[name])
            return None
        return result

    def _to_tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(inputs.positions, dtype=torch.long, device=self.device)
        attn_metadata = AttentionMetadata.build(
            inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, self.device
        )
        return input_ids, positions, attn_metadata

    @staticmethod
    def _empty_output(inputs: StepInputs) -> ModelRunnerOutput:
        return ModelRunnerOutput(req_ids=inputs.req_ids, sampled_token_ids=[[] for _ in inputs.req_ids])

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor) -> ModelRunnerOutput:
        """Logits on every last-stage rank (the vocab all-gather is a collective); only the
        output rank samples, since workers learn tokens from the scheduler, not from themselves."""
        if not inputs.sample_rows:
            return self._empty_output(inputs)
        ends = torch.tensor(inputs.query_lens, device=self.device).cumsum(0) - 1
        last_token_index = ends[torch.tensor(inputs.sample_rows, device=self.device)]
        logits = self.model.compute_logits(hidden[last_token_index])
        if not self.samples:
            return self._empty_output(inputs)
        rows = [self.batch.states[inputs.req_ids[i]].sampling_row() for i in inputs.sample_rows]
        result = self.sampler(logits, rows)
        sampled: list[list[int]] = [[] for _ in inputs.req_ids]
        logprobs: list = [None] * len(inputs.req_ids)
        errors: dict[str, str] = {}
        for row, batch_index in enumerate(inputs.sample_rows):
            if row in result.errors:  # that request ends with an error; no token
                errors[inputs.req_ids[batch_index]] = result.errors[row]
                continue
            sampled[batch_index] = [result.token_ids[row]]
            lp = result.logprobs[row]
            logprobs[batch_index] = None if lp is None else [lp]
        has_logprobs = any(lp is not None for lp in logprobs)
        return ModelRunnerOutput(inputs.req_ids, sampled, logprobs if has_logprobs else None, errors)
