"""Helpers for weight loaders: narrow a checkpoint tensor (or a lazy safetensors slice) to this
rank's part, then materialize only that part."""
from __future__ import annotations

from typing import Any, Protocol, Union

import torch


class LazySlice(Protocol):
    """What `safe_open(...).get_slice(name)` returns."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


Loaded = Union[torch.Tensor, LazySlice]


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow(loaded: Loaded, dim: int, start: int, length: int) -> Loaded:
    """`loaded.narrow(dim, start, length)`; a lazy slice reads just that part from disk."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    ndim = len(loaded.get_shape())
    dim = dim % ndim
    index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(ndim))
    return loaded[index]


def narrow_checked(loaded: Loaded, dim: int, full: int, start: int, length: int) -> Loaded:
    """`narrow`, after checking the checkpoint tensor has the full (unsharded) size `full` on `dim`."""
    shape = loaded_shape(loaded)
    if shape[dim] != full:
        raise ValueError(f"checkpoint tensor of shape {shape} has {shape[dim]} on dim {dim}, expected {full}")
    return narrow(loaded, dim, start, length)


def materialize(loaded: Loaded) -> torch.Tensor:
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded[...]


def copy_into(param: torch.Tensor, loaded: Loaded) -> None:
    """Copy a (narrowed) checkpoint tensor into `param`, converting dtype/device."""
    src = materialize(loaded)
    if tuple(src.shape) != tuple(param.shape):
        raise ValueError(f"weight shape {tuple(src.shape)} does not fit parameter shape {tuple(param.shape)}")
    param.data.copy_(src)


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Even split of `total` over `world` ranks: (start, size) of `rank`'s part."""
    if total % world:
        raise ValueError(f"{total} is not divisible by tensor parallel size {world}")
    size = total // world
    return rank * size, size


def default_weight_loader(param: torch.Tensor, loaded: Loaded, shard_id: Any = None) -> None:
    """Replicated parameter: copy the whole tensor."""
    copy_into(param, loaded)


def set_weight_loader(param: torch.nn.Parameter, loader: Any) -> torch.nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param
