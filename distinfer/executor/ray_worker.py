"""The body of one Ray worker actor: a Worker plus its torch.distributed set-up."""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch

from distinfer.config import DistInferConfig
from distinfer.messages import ModelRunnerOutput, SchedulerOutput
from distinfer.worker.model_runner import StepTimings
from distinfer.worker.worker import Worker

logger = logging.getLogger(__name__)


def _node_ip() -> str:
    import ray

    ip = ray.util.get_node_ip_address()
    return "127.0.0.1" if ip in ("", "0.0.0.0") else ip


class RayWorker:
    def __init__(self, config: DistInferConfig, rank: int, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
        self.config = config
        self.rank = rank
        self.worker = Worker(config, rank=rank)

    def free_address(self) -> tuple[str, int]:
        """An address and a free port on this node for the torch.distributed rendezvous."""
        host = _node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def init_distributed(self, init_method: str) -> None:
        self.worker.init_distributed(init_method)

    def load_model(self) -> None:
        self.worker.init_device()
        self.worker.load_model()

    def output_rank(self) -> int:
        return self.worker.output_rank()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> tuple[ModelRunnerOutput | None, StepTimings]:
        output = self.worker.execute_model(scheduler_output)
        return output, self.worker.last_step_timings()

    def execute_method(self, method: str, *args: Any) -> Any:
        """Executor.collective_rpc: any Worker method, by name."""
        return getattr(self.worker, method)(*args)

    def ping(self) -> bool:
        return True
