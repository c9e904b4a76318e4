"""Worker: one rank. Owns a model shard, its KV cache and its process groups."""
from __future__ import annotations

import logging
import os

import torch

from distinfer.config import DistInferConfig
from distinfer.distributed import parallel_state
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.model.llama import head_dim_of
from distinfer.worker.kv_transfer import KVLayout, export_blocks, import_blocks
from distinfer.worker.kv_link import KVLinks
from distinfer.worker.model_runner import ModelRunner, StepTimings

logger = logging.getLogger(__name__)


def cuda_device(device: torch.device) -> torch.device:
    """The GPU this process uses: "cuda:N" as given, "cuda" -> the current GPU (index 0 of the GPUs this
    process sees; under Ray, CUDA_VISIBLE_DEVICES holds the one its bundle was given)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for, but this process sees no CUDA GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device cuda:{index}: this process sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


class Worker:
    def __init__(self, config: DistInferConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = torch.device(config.model.device)
        self.runner: ModelRunner | None = None
        self.kv_links = KVLinks()

    def init_distributed(self, init_method: str, timeout_s: float = 120.0) -> None:
        """Join the instance's torch.distributed world (gloo on CPU, nccl on CUDA) and build TP/PP groups."""
        parallel = self.config.parallel
        backend = parallel_state.default_backend(self.device)
        parallel_state.init_distributed_environment(
            parallel.world_size, self.rank, init_method, backend, timeout_s=timeout_s
        )
        parallel_state.initialize_model_parallel(
            parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.sequence_parallel_size, backend,
            pp_layer_partition=parallel.pipeline_layer_partition,
        )

    def output_rank(self) -> int:
        """Global rank whose ModelRunnerOutput the executor returns: last PP stage, first TP/SP rank."""
        parallel = self.config.parallel
        return (parallel.pipeline_parallel_size - 1) * parallel.sequence_parallel_size * parallel.tensor_parallel_size

    def init_device(self) -> None:
        if self.device.type == "cuda":
            self.device = cuda_device(self.device)
            torch.cuda.set_device(self.device)
            logger.info("rank %d on %s (%s)", self.rank, self.device, torch.cuda.get_device_name(self.device))
        torch.manual_seed(self.config.model.seed)
        self.runner = ModelRunner(self.config, self.device)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one KV block on this rank (its layers and heads)."""
        return self.runner.model.kv_cache_bytes_per_block(self.runner.block_size)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def determine_num_host_blocks(self, kv_offloading_bytes: int) -> int:
        return self.runner.determine_num_host_blocks(kv_offloading_bytes)

    def initialize_host_cache(self, num_host_blocks: int) -> None:
        self.runner.initialize_host_cache(num_host_blocks)

    # ---- moving a request between instances (between steps; the executor orders these with the steps)

    def export_kv_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        return export_blocks(self.runner.kv_caches, block_ids)

    def import_kv_blocks(self, block_ids: list[int], layers: list[torch.Tensor]) -> None:
        import_blocks(self.runner.kv_caches, block_ids, layers)

    def kv_layout(self) -> KVLayout:
        """Which global layers and KV heads this rank's cache holds (what an export of it carries). Heads as
        the q/k/v projection splits them: rank t of tp holds KV shard t // replicas (replicas = tp / KV heads
        when tp exceeds them, else 1)."""
        model, block_size = self.runner.model, self.runner.block_size
        stage, hf_config = model.model, model.config
        first_head = num_heads = 0
        if stage.end_layer > stage.start_layer:
            qkv = stage.layers[stage.start_layer].self_attn.qkv_proj
            num_heads = qkv.num_kv_heads
            first_head = qkv.tp_rank // qkv.kv_replicas * num_heads
        return KVLayout(stage.start_layer, stage.end_layer - stage.start_layer, first_head, num_heads,
                        hf_config.num_hidden_layers, hf_config.num_key_value_heads, head_dim_of(hf_config),
                        block_size, model.dtype)

    # ---- the "p2p" migration transport: a gloo link per (this rank, the peer instance's same rank)

    def kv_link_listen(self, link_id: str) -> tuple[str, int]:
        return self.kv_links.listen(link_id)

    def kv_link_connect(self, link_id: str, address: tuple[str, int] | None) -> None:
        self.kv_links.connect(link_id, *(address or (None, None)))

    def kv_link_send(self, link_id: str, block_ids: list[int]) -> None:
        self.kv_links.send(link_id, self.runner.kv_caches, block_ids)

    def kv_link_receive(self, link_id: str, block_ids: list[int]) -> None:
        self.kv_links.receive(link_id, self.runner.kv_caches, block_ids)

    def sampler_state(self, req_id: str) -> bytes | None:
        """The request's sampler generator state on the rank that samples (None elsewhere, or unseeded)."""
        state = self.runner.batch.states.get(req_id)
        if not self.runner.samples or state is None or state.generator is None:
            return None
        return state.generator.get_state().numpy().tobytes()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def last_step_timings(self) -> StepTimings:
        return self.runner.timings

    def check_health(self) -> bool:
        return self.runner is not None and self.runner.model is not None
