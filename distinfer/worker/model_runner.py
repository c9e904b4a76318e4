"""ModelRunner: turns a SchedulerOutput diff into tensors, runs the model, samples."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from distinfer.config import DistInferConfig
from distinfer.distributed.comm import all_gather, pp_recv, pp_send, take_collective_seconds
from distinfer.distributed.parallel_state import get_pp_group, get_sp_group, get_tp_group, get_tp_rank
from distinfer.messages import KVBlockCopy, ModelRunnerOutput, SchedulerOutput
from distinfer.model.attention.paged import AttentionMetadata, resolve_attention_backend
from distinfer.model.attention.ring import RingStats
from distinfer.model.attention.sp_plan import SPMetadata, build_sp_metadata
from distinfer.model.loader import load_hf_config, load_model
from distinfer.worker.cuda_graphs import DecodeGraphs, DecodeRows
from distinfer.worker.gpu_memory import kv_cache_budget, profile_batch
from distinfer.worker.input_batch import InputBatch, StepInputs
from distinfer.worker.kv_offload import HostKVCache, check_host_memory
from distinfer.worker.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass
class StepTimings:
    """Seconds spent in the last step, for benchmarks."""

    prepare: float = 0.0
    forward: float = 0.0  # includes collective below
    sample: float = 0.0
    collective: float = 0.0  # all-reduce/all-gather/send/recv inside this step
    # sequence parallel: ring transfers' seconds in flight, the part of it spent waiting, bytes sent
    ring_in_flight: float = 0.0
    ring_exposed: float = 0.0
    ring_bytes: int = 0


class ModelRunner:
    def __init__(self, config: DistInferConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.block_size = config.cache.block_size
        self.hf_config = load_hf_config(config.model)
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.host_cache: HostKVCache | None = None  # the KV host tier, when kv_offloading_size > 0
        self.batch = InputBatch()
        self.sampler = Sampler(seed=config.model.seed)
        self.timings = StepTimings()
        pp, self.sp = get_pp_group(), get_sp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        # the rank whose output is returned: last stage, first TP rank, first SP rank (it samples every request
        # of the step, from the last rows' hidden states all-gathered over the SP group)
        self.samples = self.is_last_stage and get_tp_rank() == 0 and self.sp.is_first_rank
        self.num_blocks = 0  # KV blocks of this rank (under SP, block ids of rank r start at r * num_blocks)
        self.max_model_len = config.model.max_model_len or self.hf_config.max_position_embeddings
        self.graphs: DecodeGraphs | None = None

    def load_model(self) -> None:
        started = time.perf_counter()
        self.model = load_model(self.config.model, self.hf_config, self.device)
        logger.info("model loaded on %s (%s) in %.1f s", self.device, self.config.model.torch_dtype,
                    time.perf_counter() - started)

    def determine_num_blocks(self) -> int:
        """KV blocks this rank can hold: the explicit count, else the budget (CUDA: what gpu_memory_utilization
        leaves after a profiling forward; CPU: kv_cache_bytes) / bytes per block."""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        per_block = self.model.kv_cache_bytes_per_block(self.block_size)
        if self.device.type == "cuda":
            budget = kv_cache_budget(self.device, cache.gpu_memory_utilization, self._profile_run)
        else:
            budget = cache.kv_cache_bytes
        return max(1, budget // per_block)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """A forward of the largest step the scheduler can form (on scratch KV blocks) and its logits."""
        sched = self.config.scheduler
        batch = profile_batch(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_model_len, self.block_size)
        caches = self.model.make_kv_caches(batch.num_blocks, self.block_size, self.device)
        md = AttentionMetadata.build(batch.query_lens, batch.query_lens, batch.block_tables, self.block_size, self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in batch.query_lens])
        hidden = self._forward_stage(torch.zeros_like(positions), positions, md, caches)
        if hidden is not None:
            self.model.compute_logits(hidden[: len(batch.query_lens)]).softmax(dim=-1)
        del caches

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self.model.make_kv_caches(num_blocks, self.block_size, self.device)
        per_block = self.model.kv_cache_bytes_per_block(self.block_size)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * per_block / (1 << 30))
        if self._graphs_usable():
            sched = self.config.scheduler
            self.graphs = DecodeGraphs(self._decode_forward, self.block_size, sched.max_num_seqs,
                                       self.max_model_len, self.device)
            self.graphs.capture()

    def determine_num_host_blocks(self, kv_offloading_bytes: int) -> int:
        """Host KV blocks for this rank: its share of the instance's bytes / this rank's bytes per block."""
        per_block = self.model.kv_cache_bytes_per_block(self.block_size)
        share = kv_offloading_bytes // self.config.parallel.world_size
        check_host_memory(share)
        return share // per_block

    def initialize_host_cache(self, num_host_blocks: int) -> None:
        """The host tier, shaped like the device cache (so after initialize_kv_cache); 0 blocks: none."""
        if not self.kv_caches:
            raise RuntimeError("initialize_host_cache needs the device KV cache (initialize_kv_cache) first")
        self.host_cache = None
        if num_host_blocks > 0:
            self.host_cache = HostKVCache.like(self.kv_caches, num_host_blocks, pin=self.device.type == "cuda")

    def _run_kv_ops(self, ops: list[KVBlockCopy]) -> None:
        if self.host_cache is None:
            raise RuntimeError(f"the step has {len(ops)} KV copies but this rank has no host KV cache")
        self.host_cache.run(ops, self.kv_caches)

    def _graphs_usable(self) -> bool:
        """CUDA graphs for decode: on CUDA, unless enforce_eager, with the Triton backend (its kernels read
        only tensors), one pipeline stage, and NCCL (capturable) collectives when tensor parallel."""
        model_config = self.config.model
        if self.device.type != "cuda" or model_config.enforce_eager:
            return False
        reasons = []
        if resolve_attention_backend(model_config.attention_backend, self.device) != "triton":
            reasons.append("the attention backend is not triton")
        if self.config.parallel.pipeline_parallel_size > 1:
            reasons.append("pipeline parallel")
        if self.sp.world_size > 1:
            reasons.append("sequence parallel (ring attention)")
        tp = get_tp_group()
        if tp.world_size > 1 and torch.distributed.get_backend(tp.group) != "nccl":
            reasons.append("tensor-parallel collectives are not NCCL")
        if reasons:
            logger.info("decode runs eagerly (no CUDA graphs): %s", "; ".join(reasons))
        return not reasons

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, md)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        self.batch.update(scheduler_output)
        if scheduler_output.kv_ops:  # swaps first: the forward reads swapped-in blocks
            self._run_kv_ops(scheduler_output.kv_ops)
        if scheduler_output.is_empty:
            self.timings = StepTimings(prepare=time.perf_counter() - t0)
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        inputs = self.batch.prepare(scheduler_output)
        graphed = self.graphs is not None and inputs.is_pure_decode and len(inputs.req_ids) <= self.graphs.max_rows
        attn_metadata = None
        if not graphed:
            input_ids, positions, attn_metadata = self._to_tensors(inputs)
        t1 = time.perf_counter()
        take_collective_seconds()
        RingStats.take()
        if graphed:
            hidden = self.graphs.run(self._decode_rows(inputs))
        else:
            hidden = self._forward_stage(input_ids, positions, attn_metadata, self.kv_caches)
        t2 = time.perf_counter()
        output = self._sample(inputs, hidden, attn_metadata) if self.is_last_stage else self._empty_output(inputs)
        self.timings = StepTimings(t1 - t0, t2 - t1, time.perf_counter() - t2, take_collective_seconds(),
                                   *RingStats.take())
        return output

    def _decode_rows(self, inputs: StepInputs) -> DecodeRows:
        """A pure-decode step's rows for the graph buffers: each row's KV slot and its blocks in use."""
        bs = self.block_size
        tables = [table[: -(-n // bs)] for table, n in zip(inputs.block_tables, inputs.seq_lens)]
        slots = [table[p // bs] * bs + p % bs for table, p in zip(tables, inputs.positions)]
        return DecodeRows(inputs.input_ids, inputs.positions, slots, inputs.seq_lens, tables)

    def _forward_stage(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                       kv_caches: list[torch.Tensor]):
        """This pipeline stage's layers: receive the previous stage's tensors, send ours on."""
        intermediate = None
        if not self.is_first_stage:
            shape = (input_ids.shape[0], self.hf_config.hidden_size)
            dtype = self.config.model.torch_dtype
            intermediate = {name: pp_recv(shape, dtype, self.device) for name in ("hidden_states", "residual")}
        result = self.model(input_ids, positions, kv_caches, attn_metadata, intermediate)
        if not self.is_last_stage:
            for name in ("hidden_states", "residual"):
                pp_send(result[name])
            return None
        return result

    def _to_tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata | SPMetadata]:
        """The step's token ids, positions and attention plan; under SP only the rows this rank computes."""
        input_ids = torch.tensor(inputs.input_ids, dtype=torch.long)
        positions = torch.tensor(inputs.positions, dtype=torch.long)
        if self.sp.world_size > 1:
            md = build_sp_metadata(inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size,
                                   self.sp.world_size, self.sp.rank_in_group, self.num_blocks, inputs.sample_rows,
                                   self.device)
            rows = md.local_rows.cpu()
            return input_ids[rows].to(self.device), positions[rows].to(self.device), md
        attn_metadata = AttentionMetadata.build(
            inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size, self.device
        )
        return input_ids.to(self.device), positions.to(self.device), attn_metadata

    def _last_hidden(self, inputs: StepInputs, hidden: torch.Tensor,
                     md: AttentionMetadata | SPMetadata | None) -> torch.Tensor:
        """The hidden state of each sampling row's last token (one index copy; none for a decode batch). Under
        SP each rank has its own rows': they are all-gathered over the SP group, in batch order."""
        if isinstance(md, SPMetadata):
            mine = hidden.new_zeros((md.max_samples, hidden.shape[1]))
            mine[:len(md.sample_local)] = hidden.index_select(0, md.sample_local)
            return all_gather(mine, self.sp, dim=0).index_select(0, md.sample_order)
        if inputs.is_pure_decode and len(inputs.sample_rows) == len(inputs.req_ids):
            return hidden
        ends = list(itertools.accumulate(inputs.query_lens))
        index = torch.tensor([ends[i] - 1 for i in inputs.sample_rows]).to(self.device, non_blocking=True)
        return hidden.index_select(0, index)

    @staticmethod
    def _empty_output(inputs: StepInputs) -> ModelRunnerOutput:
        return ModelRunnerOutput(req_ids=inputs.req_ids, sampled_token_ids=[[] for _ in inputs.req_ids])

    def _sample(self, inputs: StepInputs, hidden: torch.Tensor,
                md: AttentionMetadata | SPMetadata | None) -> ModelRunnerOutput:
        """Logits on every last-stage rank of the first SP rank (the vocab all-gather is a TP collective); only
        the output rank samples, since workers learn tokens from the scheduler, not from themselves."""
        if not inputs.sample_rows:
            return self._empty_output(inputs)
        last = self._last_hidden(inputs, hidden, md)  # under SP a collective of every SP rank
        if not self.sp.is_first_rank:
            return self._empty_output(inputs)
        logits = self.model.compute_logits(last)
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
