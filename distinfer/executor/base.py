"""Executor: runs SchedulerOutputs on every rank of one engine instance."""
from __future__ import annotations

from abc import ABC, abstractmethod
from importlib import import_module
from typing import Any, Callable, Sequence

from distinfer.config import DistInferConfig
from distinfer.errors import EngineDeadError, EngineDrainingError  # noqa: F401 (re-exported)
from distinfer.messages import ModelRunnerOutput, SchedulerOutput


_BACKEND_MODULES = {"uni": "distinfer.executor.local", "ray": "distinfer.executor.ray"}


class Executor(ABC):
    name: str = ""
    _registry: dict[str, type["Executor"]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Executor._registry[cls.name] = cls

    def __init__(self, config: DistInferConfig) -> None:
        self.config = config

    @classmethod
    def create(cls, config: DistInferConfig, backend: str | None = None) -> "Executor":
        """`uni` runs in-process for world size 1; `ray` otherwise."""
        backend = backend or ("uni" if config.parallel.world_size == 1 else "ray")
        if backend in _BACKEND_MODULES:
            import_module(_BACKEND_MODULES[backend])  # registers the class; keeps Ray out of `uni` runs
        if backend not in cls._registry:
            raise ValueError(f"distributed_executor_backend must be one of {sorted(cls._registry)}, got {backend!r}")
        return cls._registry[backend](config)

    @abstractmethod
    def determine_num_blocks(self) -> int: ...

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any, timeout: float | None = None,
                       rank_args: Sequence[tuple] | None = None) -> list[Any]:
        """Call the Worker method `method(*args, *rank_args[rank])` on every rank; the results in rank order.
        A failing rank fails the instance as a step would (Ray: EngineDeadError)."""

    @abstractmethod
    def shutdown(self) -> None: ...

    @property
    def max_concurrent_batches(self) -> int:
        """Steps the engine may keep in flight (pipeline stages)."""
        return 1

    def submit(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Start a step; the returned callable waits for its output. In-process: runs it now."""
        output = self.execute_model(scheduler_output)
        return lambda: output

    def check_health(self) -> None:
        """Raise EngineDeadError when a rank is gone."""
