"""Ring attention: one layer's attention under sequence parallelism (the plan is model/attention/sp_plan.py).

Per layer, on every SP rank:
  1. store the K/V of this rank's own rows that it also owns (a decode row's token included);
  2. the cached part (if any row has earlier tokens): all-gather those rows' queries over the SP group, attend
     each over this rank's cached tokens of its request (the backend's paged/dense ops with LSE), all-gather the
     partials, merge them by log-sum-exp for this rank's rows;
  3. the fresh part (if some request computes more than one token): sp ring steps; at step t this rank holds the
     rows of rank (rank - t) % sp, passes them on with isend/irecv while it stores the ones it owns and attends
     its prefill chunks to them, and merges the result.
Partials merge in float32; the output goes back to the query dtype. Every rank runs the same collectives in the
same order (the plan is the same everywhere), so the group never deadlocks on a mismatched call.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from distinfer.distributed.comm import timed, all_gather
from distinfer.distributed.parallel_state import GroupCoordinator, get_sp_group, get_sp_ring_group
from distinfer.model.attention.paged import (AttentionBackend, AttentionMetadata, gather_kv, merge_partials,
                                            write_kv)
from distinfer.model.attention.sp_plan import SPMetadata


class RingAttentionBackend(AttentionBackend):
    """Wraps a rank's own backend: steps planned for sequence parallelism go around the ring, anything else
    (e.g. the profiling forward, planned for one rank) goes straight to the inner backend."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.name = f"ring({inner.name})"

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata | SPMetadata,
                scale: float) -> torch.Tensor:
        if not isinstance(md, SPMetadata):
            return self.inner.forward(q, kv, kv_cache, md, scale)
        return ring_attention(self.inner, q, kv, kv_cache, md, scale)


def ring_attention(backend: AttentionBackend, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor,
                   md: SPMetadata, scale: float, group: GroupCoordinator | None = None,
                   ring_group: GroupCoordinator | None = None) -> torch.Tensor:
    """q [n, Hq, D], kv [n, 2, Hkv, D] of this rank's rows -> their attention output [n, Hq, D]."""
    group, ring_group = group or get_sp_group(), ring_group or get_sp_ring_group()
    kv = kv.contiguous()
    ring = _Ring(kv, md, ring_group) if md.needs_ring else None  # first transfer in flight during step 2
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    _store(kv_cache, kv, md.writes[md.rank])
    if md.max_cached:
        _cached_part(backend, q, kv_cache, md, scale, out, lse, group)
    if ring is not None:
        for step in range(md.sp):
            source, held = ring.step(step)
            if step:
                _store(kv_cache, held, md.writes[source])
            for pair in md.pairs[source]:
                o, l = backend.dense_with_lse(q[pair.q_start:pair.q_end], held[pair.k_start:pair.k_end, 0],
                                              held[pair.k_start:pair.k_end, 1], pair.causal, scale)
                rows = slice(pair.q_start, pair.q_end)
                out[rows], lse[rows] = merge_partials(out[rows], lse[rows], o, l)
    return out.to(q.dtype)


def _store(kv_cache: torch.Tensor, kv: torch.Tensor, write: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if write is not None:
        rows, slots = write
        write_kv(kv_cache, kv.index_select(0, rows), slots)


class RingStats:
    """Seconds of ring transfers since the last take(): `in_flight` from posting each transfer to its end,
    `exposed` the part of it this rank sat waiting (the rest was hidden behind attention)."""

    in_flight: float = 0.0
    exposed: float = 0.0
    num_bytes: int = 0  # sent by this rank

    @classmethod
    def take(cls) -> tuple[float, float, int]:
        taken = (cls.in_flight, cls.exposed, cls.num_bytes)
        cls.in_flight = cls.exposed = 0.0
        cls.num_bytes = 0
        return taken


class _Ring:
    """The fresh rows travelling around the SP ring: at step t this rank holds rank (rank - t) % sp's rows;
    the next ones are received while the current ones are used."""

    def __init__(self, kv: torch.Tensor, md: SPMetadata, ring_group: GroupCoordinator) -> None:
        self.md, self.group = md, ring_group
        self.held, self.pending = kv, None
        self._post(kv, 0)

    def _post(self, held: torch.Tensor, step: int) -> None:
        """Send what is held to the next rank and receive the previous rank's (for step + 1)."""
        md = self.md
        if step + 1 >= md.sp:
            self.pending = None
            return
        incoming = (md.rank - step - 1) % md.sp
        buffer = held.new_empty((md.num_rows[incoming], *held.shape[1:]))
        nxt, prev = (self.group.global_rank_of(md.rank + 1), self.group.global_rank_of(md.rank - 1))
        with timed():
            ops = [dist.P2POp(dist.isend, held, nxt, self.group.group), dist.P2POp(dist.irecv, buffer, prev,
                                                                                  self.group.group)]
            self.pending = (dist.batch_isend_irecv(ops), buffer, time.perf_counter())
        RingStats.num_bytes += held.numel() * held.element_size()

    def step(self, step: int) -> tuple[int, torch.Tensor]:
        """(source rank, its rows) for this ring step; starts the next transfer."""
        if step:
            works, buffer, posted = self.pending
            waiting = time.perf_counter()
            with timed():
                for work in works:
                    work.wait()
            done = time.perf_counter()
            RingStats.in_flight += done - posted
            RingStats.exposed += done - waiting
            self.held = buffer
            self._post(buffer, step)
        return (self.md.rank - step) % self.md.sp, self.held


def _cached_part(backend: AttentionBackend, q: torch.Tensor, kv_cache: torch.Tensor, md: SPMetadata, scale: float,
                 out: torch.Tensor, lse: torch.Tensor, group: GroupCoordinator) -> None:
    """Rows with earlier tokens: attention over every rank's cache, merged into out/lse (which are empty)."""
    width, mine = md.max_cached, len(md.cached_local)
    local = q.new_zeros((width, *q.shape[1:]))
    local[:mine] = q.index_select(0, md.cached_local)
    queries = all_gather(local, group, dim=0)  # [sp * width, Hq, D], rank by rank
    part_out = torch.zeros(queries.shape, dtype=torch.float32, device=q.device)
    part_lse = torch.full(queries.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if len(md.decode_rows):
        o, l = backend.paged_with_lse(queries.index_select(0, md.decode_rows), kv_cache, md.decode_tables,
                                      md.decode_lens, scale)
        part_out[md.decode_rows], part_lse[md.decode_rows] = o, l
    for prefix in md.prefix_groups:
        k, v = gather_kv(kv_cache, prefix.block_ids, 1, prefix.num_tokens)
        o, l = backend.dense_with_lse(queries.index_select(0, prefix.gathered_rows), k[0].transpose(0, 1),
                                      v[0].transpose(0, 1), False, scale)
        part_out[prefix.gathered_rows], part_lse[prefix.gathered_rows] = o, l
    outs = all_gather(part_out.unsqueeze(0), group, dim=0)  # [sp, sp * width, Hq, D]
    lses = all_gather(part_lse.unsqueeze(0), group, dim=0)
    rows = torch.arange(md.rank * width, md.rank * width + mine, device=q.device)
    merged_out, merged_lse = outs[0, rows], lses[0, rows]
    for source in range(1, md.sp):
        merged_out, merged_lse = merge_partials(merged_out, merged_lse, outs[source, rows], lses[source, rows])
    out[md.cached_local], lse[md.cached_local] = merged_out, merged_lse
