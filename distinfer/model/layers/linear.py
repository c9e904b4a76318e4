"""Megatron-style tensor-parallel linear layers.

Column layers split the output dimension over the TP group (no communication in forward);
row layers split the input dimension and all-reduce their output. Every parameter carries a
`weight_loader(param, loaded_weight, shard_id=None)` that copies only this rank's slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distinfer.distributed.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from distinfer.distributed.parallel_state import get_tp_rank, get_tp_world_size
from distinfer.model.kernels import cpu
from distinfer.model.layers.weight_utils import (
    Loaded,
    copy_into,
    default_weight_loader,
    narrow_checked,
    set_weight_loader,
    shard_range,
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the CPU bfloat16 small-batch kernel where it applies (decode steps)."""
    if cpu.small_batch_linear_applies(x, weight):
        return cpu.linear_bf16(x, weight, bias)
    return F.linear(x, weight, bias)


def _param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    # Uninitialized: the loader (or dummy init) fills it; no double allocation.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows: each rank computes a slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = self._partition_size()
        self.gather_output = gather_output
        self.weight = set_weight_loader(_param(self.output_size_per_partition, input_size, dtype=dtype),
                                        self.weight_loader)
        self.bias = None
        if bias:
            self.bias = set_weight_loader(_param(self.output_size_per_partition, dtype=dtype), self.weight_loader)

    def _partition_size(self) -> int:
        return shard_range(self.output_size, self.tp_rank, self.tp_size)[1]

    def weight_loader(self, param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
        size = param.shape[0]
        copy_into(param, narrow_checked(loaded, 0, self.output_size, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return tensor_model_parallel_all_gather(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, bias={self.bias is not None}"


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices fused along the output (e.g. gate_proj + up_proj).

    Each rank holds [its slice of shard 0, its slice of shard 1, ...]."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype)

    def _partition_size(self) -> int:
        return sum(shard_range(s, self.tp_rank, self.tp_size)[1] for s in self.output_sizes)

    def weight_loader(self, param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor: split it by the full sizes
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, narrow_checked(loaded, 0, self.output_size, offset, size), i)
                offset += size
            return
        idx = int(shard_id)  # type: ignore[call-overload]
        start, size = shard_range(self.output_sizes[idx], self.tp_rank, self.tp_size)
        offset = sum(s // self.tp_size for s in self.output_sizes[:idx])
        copy_into(param.data.narrow(0, offset, size), narrow_checked(loaded, 0, self.output_sizes[idx], start, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads are split over TP ranks; KV heads are split when
    tp divides them and replicated (each rank keeps one) when tp > num_kv_heads."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        tp = get_tp_world_size()
        if total_num_heads % tp:
            raise ValueError(f"num_attention_heads {total_num_heads} not divisible by tp {tp}")
        if tp >= total_num_kv_heads:
            if tp % total_num_kv_heads:
                raise ValueError(f"tp {tp} not divisible by num_key_value_heads {total_num_kv_heads}")
            self.num_kv_heads, self.kv_replicas = 1, tp // total_num_kv_heads
        else:
            if total_num_kv_heads % tp:
                raise ValueError(f"num_key_value_heads {total_num_kv_heads} not divisible by tp {tp}")
            self.num_kv_heads, self.kv_replicas = total_num_kv_heads // tp, 1
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = total_num_heads // tp
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        out = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, out, bias=bias, dtype=dtype)

    def _partition_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def weight_loader(self, param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
        if shard_id is None:  # fused checkpoint tensor [q; k; v] with full head counts
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            for sid, off, size in (("q", 0, q_total), ("k", q_total, kv_total), ("v", q_total + kv_total, kv_total)):
                self.weight_loader(param, narrow_checked(loaded, 0, self.output_size, off, size), sid)
            return
        if shard_id == "q":
            dst_off, size, src_start = 0, self.q_size, self.tp_rank * self.q_size
            full = self.total_num_heads * self.head_size
        elif shard_id in ("k", "v"):
            kv_rank = self.tp_rank // self.kv_replicas
            dst_off = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, src_start = self.kv_size, kv_rank * self.kv_size
            full = self.total_num_kv_heads * self.head_size
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        copy_into(param.data.narrow(0, dst_off, size), narrow_checked(loaded, 0, full, src_start, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 reduce_results: bool = True, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = shard_range(input_size, self.tp_rank, self.tp_size)[1]
        self.reduce_results = reduce_results
        self.weight = set_weight_loader(_param(output_size, self.input_size_per_partition, dtype=dtype),
                                        self.weight_loader)
        self.bias = None
        if bias:  # replicated; added once, after the reduction
            self.bias = set_weight_loader(_param(output_size, dtype=dtype), default_weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
        size = param.shape[1]
        copy_into(param, narrow_checked(loaded, 1, self.input_size, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, bias={self.bias is not None}"
