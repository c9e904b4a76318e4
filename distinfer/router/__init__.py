"""Several engine instances behind one router: EngineInstance actors, the Router actor, dispatch
policies and load reports, and RouterEngine (AsyncLLM's interface over them, for the serving process).

`policies` and `stats` are plain data (no Ray); the rest is imported on first use, so validating a
policy name does not start or import Ray.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from distinfer.router.policies import (
    DEFAULT_DISPATCH_POLICY,
    dispatch_policy_names,
    make_dispatch_policy,
)
from distinfer.router.stats import InstanceLoad

_LAZY = {
    "RouterEngine": "distinfer.router.client",
    "Router": "distinfer.router.router",
    "RouterConfig": "distinfer.router.router",
    "EngineInstance": "distinfer.router.instance",
}

__all__ = ["DEFAULT_DISPATCH_POLICY", "EngineInstance", "InstanceLoad", "Router", "RouterConfig", "RouterEngine",
           "dispatch_policy_names", "make_dispatch_policy"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distinfer.router' has no attribute {name!r}")
