"""Worker: one rank. Owns a model shard, its KV cache and its process groups."""
from __future__ import annotations

import logging

import torch

from distinfer.config import DistInferConfig
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.worker.model_runner import ModelRunner, StepTimings

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: DistInferConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = torch.device(config.model.device)
        self.runner: ModelRunner | None = None

    def init_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(self.config.model.seed)
        self.runner = ModelRunner(self.config, self.device)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def last_step_timings(self) -> StepTimings:
        return self.runner.timings

    def check_health(self) -> bool:
        return self.runner is not None and self.runner.model is not None
