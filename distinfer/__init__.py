"""distinfer: distributed LLM inference on Ray (vLLM-compatible names)."""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Lazy so that light imports (messages, sampling params, the client SDK) do not pull in torch.
_EXPORTS = {
    "LLM": "distinfer.engine.llm",
    "AsyncLLM": "distinfer.engine.async_llm",
    "RouterEngine": "distinfer.router.client",
    "SamplingParams": "distinfer.sampling_params",
    "RequestOutput": "distinfer.messages",
    "CompletionOutput": "distinfer.messages",
    "EngineDeadError": "distinfer.executor.base",
    "RequestOutputKind": "distinfer.engine.output_processor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distinfer' has no attribute {name!r}")
