from distinfer.executor.base import EngineDeadError, Executor
from distinfer.executor.local import LocalExecutor

__all__ = ["EngineDeadError", "Executor", "LocalExecutor"]
