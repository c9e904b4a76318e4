"""LocalExecutor: the single-device path, one Worker in this process, no Ray."""
from __future__ import annotations

from typing import Any, Sequence

from distinfer.config import DistInferConfig
from distinfer.executor.base import Executor
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.worker.model_runner import StepTimings
from distinfer.worker.worker import Worker


class LocalExecutor(Executor):
    name = "uni"

    def __init__(self, config: DistInferConfig) -> None:
        super().__init__(config)
        if config.parallel.world_size != 1:
            raise ValueError("the 'uni' executor runs world size 1; use 'ray' for tensor/pipeline parallel")
        self.worker = Worker(config, rank=0)
        self.worker.init_device()
        self.worker.load_model()

    @property
    def hf_config(self):
        return self.worker.runner.hf_config

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None,
                       rank_args: Sequence[tuple] | None = None) -> list[Any]:
        """In-process: `timeout` does not apply."""
        return [getattr(self.worker, method)(*args, *(rank_args[0] if rank_args else ()))]

    def last_step_timings(self) -> StepTimings:
        return self.worker.last_step_timings()

    def shutdown(self) -> None:
        self.worker = None
