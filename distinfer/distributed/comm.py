"""Collectives over the model-parallel groups; no-ops for a single-process group."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from distinfer.distributed.parallel_state import GroupCoordinator, get_pp_group, get_tp_group


class _CollectiveClock:
    """Seconds this process spent inside collectives and point-to-point transfers."""

    seconds: float = 0.0

    @classmethod
    def take(cls) -> float:
        seconds, cls.seconds = cls.seconds, 0.0
        return seconds


@contextmanager
def timed() -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _CollectiveClock.seconds += time.perf_counter() - start


def take_collective_seconds() -> float:
    """Seconds spent in communication since the last call (per-step accounting)."""
    return _CollectiveClock.take()


def all_reduce(x: torch.Tensor, coord: GroupCoordinator) -> torch.Tensor:
    """Sum `x` over the group, in place; returns `x`."""
    if coord.world_size == 1:
        return x
    with timed():
        dist.all_reduce(x, group=coord.group)
    return x


def all_gather(x: torch.Tensor, coord: GroupCoordinator, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    if coord.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(coord.world_size)]
    with timed():
        dist.all_gather(parts, x.contiguous(), group=coord.group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return all_reduce(x, get_tp_group())


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return all_gather(x, get_tp_group(), dim)


def broadcast(x: torch.Tensor, coord: GroupCoordinator, src_in_group: int = 0) -> torch.Tensor:
    """Broadcast `x` in place from the group's `src_in_group` rank."""
    if coord.world_size == 1:
        return x
    with timed():
        dist.broadcast(x, src=coord.global_rank_of(src_in_group), group=coord.group)
    return x


def pp_send(x: torch.Tensor) -> None:
    """Send `x` to the next pipeline stage."""
    coord = get_pp_group()
    with timed():
        dist.send(x.contiguous(), dst=coord.global_rank_of(coord.rank_in_group + 1), group=coord.group)


def pp_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Receive a tensor of known shape from the previous pipeline stage."""
    coord = get_pp_group()
    out = torch.empty(shape, dtype=dtype, device=device)
    with timed():
        dist.recv(out, src=coord.global_rank_of(coord.rank_in_group - 1), group=coord.group)
    return out
