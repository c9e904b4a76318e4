"""Decode steps as CUDA graphs: the whole model forward captured once per padded batch size at start-up,
replayed with persistent input buffers that one host-to-device copy fills per step.

A pure-decode batch of n rows runs in the graph of the smallest captured size >= n; rows n.. are padding
(slot -1: no KV write, context length 0: attention outputs zeros) and their outputs are dropped. Every
tensor the captured forward reads lives in `DecodeInputs.device` (token ids, positions, slots, context
lengths, block tables), so a replay sees the step's values; the metadata's grid bounds are the capture
bounds (max_model_len), which the Triton kernels take as upper limits.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from distinfer.model.attention.paged import AttentionMetadata

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
_PADDING_SLOT = -1


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (itself included), as vLLM pads."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


@dataclass
class DecodeRows:
    """One pure-decode step in plain lists (row i: its token, position, KV slot, context length, blocks)."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]


class DecodeInputs:
    """Pinned host staging buffer and its device twin: [ids | positions | slots | lens | tables] as int64."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks
        size = 4 * max_rows + max_rows * max_blocks
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.device = torch.zeros(size, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slots, lens [max_rows] each, tables [max_rows, max_blocks]) of `buffer`."""
        r = self.max_rows
        ids, positions, slots, lens, tables = buffer.split([r, r, r, r, r * self.max_blocks])
        return ids, positions, slots, lens, tables.view(r, self.max_blocks)

    def fill(self, rows: DecodeRows, padded: int) -> None:
        """Write the step (rows .. padded are padding) into the host buffer and copy it to the device."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        n = len(rows.token_ids)
        ids, positions, slots, lens, tables = self.views(self.host)
        if n:
            ids[:n] = torch.tensor(rows.token_ids)
            positions[:n] = torch.tensor(rows.positions)
            slots[:n] = torch.tensor(rows.slots)
            lens[:n] = torch.tensor(rows.seq_lens)
            width = max(len(t) for t in rows.block_tables)  # a row's blocks past its length are never read
            tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in rows.block_tables])
        ids[n:padded], positions[n:padded], lens[n:padded] = 0, 0, 0
        slots[n:padded] = _PADDING_SLOT
        self.device.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()


class DecodeGraphs:
    """Captured decode forwards by padded batch size. `use_graphs=False` runs the same padded,
    persistent-buffer forward eagerly (the CPU tests check the padding and buffers that way)."""

    def __init__(self, forward: Forward, block_size: int, max_num_seqs: int, max_model_len: int,
                 device: torch.device, use_graphs: bool = True) -> None:
        self.forward, self.block_size, self.device = forward, block_size, device
        self.max_model_len, self.use_graphs = max_model_len, use_graphs
        self.sizes = capture_sizes(max_num_seqs)
        self.inputs = DecodeInputs(self.sizes[-1], -(-max_model_len // block_size), device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps_run = 0  # decode steps served (a replay each when use_graphs)

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def padded_size(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def metadata(self, rows: int) -> AttentionMetadata:
        """Decode metadata over the first `rows` rows of the device buffers, bounded by max_model_len."""
        ids, positions, slots, lens, tables = self.inputs.views(self.inputs.device)
        return AttentionMetadata(
            num_tokens=rows, block_size=self.block_size, query_lens=[1] * rows, seq_lens=[self.max_model_len] * rows,
            slot_mapping=slots[:rows], block_tables=tables[:rows], seq_lens_tensor=lens[:rows],
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=self.device),
            max_query_len=1, max_seq_len=self.max_model_len, num_decodes=rows, device=self.device)

    def capture(self) -> None:
        """Capture every size, largest first (smaller graphs reuse the largest one's memory pool)."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.inputs.fill(DecodeRows([], [], [], [], []), self.max_rows)  # every row padding
        for size in reversed(self.sizes):
            md = self.metadata(size)
            ids, positions = self.inputs.views(self.inputs.device)[:2]
            self.forward(ids[:size], positions[:size], md)  # warm-up: Triton compiles, cuBLAS picks
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(ids[:size], positions[:size], md)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - started)

    def run(self, rows: DecodeRows) -> torch.Tensor:
        """Hidden states [len(rows), hidden] of a pure-decode step of at most max_rows rows."""
        n = len(rows.token_ids)
        size = self.padded_size(n)
        self.inputs.fill(rows, size)
        self.steps_run += 1
        if self.use_graphs:
            graph, out = self.graphs[size]
            graph.replay()
            return out[:n]
        ids, positions = self.inputs.views(self.inputs.device)[:2]
        return self.forward(ids[:size], positions[:size], self.metadata(size))[:n]
