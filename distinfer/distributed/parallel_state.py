"""Tensor / pipeline / sequence parallel process groups.

Without `initialize_model_parallel` every getter answers for a single-process world (rank 0,
size 1, no torch.distributed needed), so the model runs unchanged on one device.

Rank layout (tp fastest, like Megatron/vLLM): global rank = (pp_rank * sp + sp_rank) * tp + tp_rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupCoordinator:
    """One process group as seen from this process."""

    name: str
    ranks: tuple[int, ...]  # global ranks in the group, in group-rank order
    rank_in_group: int
    group: dist.ProcessGroup | None  # None for a single-process group

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    @property
    def last_rank(self) -> int:
        return self.ranks[-1]

    def global_rank_of(self, rank_in_group: int) -> int:
        return self.ranks[rank_in_group % self.world_size]


def _single(name: str) -> GroupCoordinator:
    return GroupCoordinator(name=name, ranks=(0,), rank_in_group=0, group=None)


_TP: GroupCoordinator = _single("tp")
_PP: GroupCoordinator = _single("pp")
_SP: GroupCoordinator = _single("sp")
_SP_RING: GroupCoordinator = _single("sp_ring")  # the same ranks as _SP: ring attention's send/recv only
_PP_LAYER_PARTITION: tuple[int, ...] | None = None  # layers per stage; None: even split
_INITIALIZED = False


def default_backend(device: str | torch.device | None = None) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        return "nccl"
    return "gloo"


def init_distributed_environment(
    world_size: int,
    rank: int,
    init_method: str = "env://",
    backend: str | None = None,
    local_rank: int = 0,
    timeout_s: float = 120.0,
) -> None:
    """Initialize the default torch.distributed group if it is not already up. `timeout_s` bounds
    every collective, so a dead peer ends in an error instead of a hang."""
    if dist.is_initialized():
        return
    backend = backend or default_backend("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    logger.info("init torch.distributed: backend=%s rank=%d/%d", backend, rank, world_size)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s))


def _make_groups(name: str, all_ranks: list[list[int]], backend: str | None) -> GroupCoordinator:
    """Create every group of one kind (all processes must call this in the same order)."""
    me = dist.get_rank()
    mine: GroupCoordinator | None = None
    for ranks in all_ranks:
        group = dist.new_group(ranks=ranks, backend=backend) if len(ranks) > 1 else None
        if me in ranks:
            mine = GroupCoordinator(name, tuple(ranks), ranks.index(me), group)
    assert mine is not None, f"rank {me} is in no {name} group"
    return mine


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    backend: str | None = None,
    pp_layer_partition: tuple[int, ...] | None = None,
) -> None:
    """Build the TP/PP/SP groups over the already initialized default group."""
    global _TP, _PP, _SP, _SP_RING, _INITIALIZED, _PP_LAYER_PARTITION
    _PP_LAYER_PARTITION = tuple(pp_layer_partition) if pp_layer_partition else None
    tp, pp, sp = tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel_size
    total = tp * pp * sp
    if not dist.is_initialized():
        if total != 1:
            raise RuntimeError(f"tp*pp*sp = {total} > 1 needs torch.distributed to be initialized first")
        _TP, _PP, _SP, _SP_RING = _single("tp"), _single("pp"), _single("sp"), _single("sp_ring")
        _INITIALIZED = True
        return
    if dist.get_world_size() != total:
        raise ValueError(f"world size {dist.get_world_size()} != tp({tp}) * pp({pp}) * sp({sp})")
    backend = backend or dist.get_backend()

    def rank(p: int, s: int, t: int) -> int:
        return (p * sp + s) * tp + t

    _TP = _make_groups("tp", [[rank(p, s, t) for t in range(tp)] for p in range(pp) for s in range(sp)], backend)
    sp_groups = [[rank(p, s, t) for s in range(sp)] for p in range(pp) for t in range(tp)]
    _SP = _make_groups("sp", sp_groups, backend)
    _SP_RING = _make_groups("sp_ring", sp_groups, backend)  # p2p in flight never interleaves with _SP's collectives
    _PP = _make_groups("pp", [[rank(p, s, t) for p in range(pp)] for s in range(sp) for t in range(tp)], backend)
    _INITIALIZED = True
    logger.info("model parallel: rank %d -> tp %d/%d, pp %d/%d, sp %d/%d", dist.get_rank(),
                _TP.rank_in_group, tp, _PP.rank_in_group, pp, _SP.rank_in_group, sp)


def model_parallel_is_initialized() -> bool:
    return _INITIALIZED


def destroy_model_parallel() -> None:
    """Forget the groups (back to the single-process world); the default group stays up."""
    global _TP, _PP, _SP, _SP_RING, _INITIALIZED, _PP_LAYER_PARTITION
    _PP_LAYER_PARTITION = None
    for coord in (_TP, _PP, _SP, _SP_RING):
        if coord.group is not None:
            dist.destroy_process_group(coord.group)
    _TP, _PP, _SP, _SP_RING = _single("tp"), _single("pp"), _single("sp"), _single("sp_ring")
    _INITIALIZED = False


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_tp_rank() -> int:
    return _TP.rank_in_group


def get_tp_world_size() -> int:
    return _TP.world_size


def get_pp_group() -> GroupCoordinator:
    return _PP


def get_pp_rank() -> int:
    return _PP.rank_in_group


def get_pp_world_size() -> int:
    return _PP.world_size


def get_pp_layer_partition() -> tuple[int, ...] | None:
    """Layers per pipeline stage when configured; None for the even split."""
    return _PP_LAYER_PARTITION


def get_sp_group() -> GroupCoordinator:
    return _SP


def get_sp_rank() -> int:
    return _SP.rank_in_group


def get_sp_world_size() -> int:
    return _SP.world_size


def get_sp_ring_group() -> GroupCoordinator:
    return _SP_RING
