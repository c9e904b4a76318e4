"""Collectives over the model-parallel groups; no-ops for a single-process group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from distinfer.distributed.parallel_state import GroupCoordinator, get_pp_group, get_tp_group


def all_reduce(x: torch.Tensor, coord: GroupCoordinator) -> torch.Tensor:
    """Sum `x` over the group, in place; returns `x`."""
    if coord.world_size == 1:
        return x
    dist.all_reduce(x, group=coord.group)
    return x


def all_gather(x: torch.Tensor, coord: GroupCoordinator, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    if coord.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(coord.world_size)]
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
    dist.broadcast(x, src=coord.global_rank_of(src_in_group), group=coord.group)
    return x


def pp_send(x: torch.Tensor) -> None:
    """Send `x` to the next pipeline stage."""
    coord = get_pp_group()
    dist.send(x.contiguous(), dst=coord.global_rank_of(coord.rank_in_group + 1), group=coord.group)


def pp_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Receive a tensor of known shape from the previous pipeline stage."""
    coord = get_pp_group()
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=coord.global_rank_of(coord.rank_in_group - 1), group=coord.group)
    return out
