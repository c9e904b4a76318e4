"""Sequence parallelism's plan of one step for one SP rank (`SPMetadata`), built once per step from the
step's plain lists and shared by every layer (model/attention/ring.py runs it).

Who computes which token (every rank derives the same split from the same SchedulerOutput):
  * a request computing more than one token this step (prefill, or a prefill chunk) is cut into 2*sp
    zigzag chunks; rank i takes chunks i and 2*sp-1-i, so every rank gets an equal share of the causal work;
  * a request computing one token (decode) computes it on the rank that stores that token's KV.

Where each token's K/V is stored (block-cyclic, a function of the position alone): block b of a request lives
on rank b % sp, in that rank's own cache (the scheduler's partitioned pool hands out block ids
[r * blocks_per_rank, (r + 1) * blocks_per_rank) for rank r; the rank subtracts its offset). So a rank's
tokens of a request are in position order in its blocks r, r+sp, ..., and those before any position form a
prefix of them: attention over "every token before position p held by rank r" is an unmasked paged read of
the first `tokens_held(r, p)` tokens of its local table.

A query row's attention is then merged (log-sum-exp) from:
  * the cached part: the tokens computed in earlier steps (for a decode row, also itself), read from every
    rank's cache (the rows' queries are all-gathered over the SP group; each rank returns partials);
  * the fresh part (prefill rows only): this step's chunks of its request, passed around the ring; a key
    chunk before the query chunk is attended fully, the same chunk causally, a later one not at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FreshPair:
    """Query rows [q_start, q_end) of this rank against key rows [k_start, k_end) of a source rank's tensor."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool


@dataclass
class PrefixGroup:
    """Gathered query rows of one prefill request attending to this rank's cached tokens of that request."""

    gathered_rows: torch.Tensor  # indices into the all-gathered cached-part queries
    block_ids: torch.Tensor  # this rank's local blocks holding them
    num_tokens: int


@dataclass
class SPMetadata:
    sp: int
    rank: int
    local_rows: torch.Tensor  # the step's flattened rows this rank computes, ascending
    num_rows: list[int]  # rows each rank computes (the size of what it sends around the ring)
    writes: list[tuple[torch.Tensor, torch.Tensor] | None]  # per source rank: (its rows stored here, their slots)
    pairs: list[list[FreshPair]]  # per source rank: the fresh-part attention this rank does with its rows
    needs_ring: bool  # some request computes more than one token this step
    cached_counts: list[int]  # rows in the cached part, per rank
    cached_local: torch.Tensor  # this rank's local rows in the cached part, in gathered order
    decode_rows: torch.Tensor  # gathered indices of decode rows
    decode_tables: torch.Tensor  # int64 [decode rows, width]: this rank's local blocks of their requests
    decode_lens: torch.Tensor  # int64: tokens of the request this rank holds up to and including the row
    prefix_groups: list[PrefixGroup] = field(default_factory=list)
    sample_counts: list[int] = field(default_factory=list)  # sampled rows computed per rank
    sample_local: torch.Tensor | None = None  # this rank's local rows whose hidden state is sampled
    sample_order: torch.Tensor | None = None  # gathered index of each sampled request's row, in batch order

    @property
    def max_cached(self) -> int:
        return max(self.cached_counts, default=0)

    @property
    def max_samples(self) -> int:
        return max(self.sample_counts, default=0)


def zigzag_bounds(num_tokens: int, sp: int) -> list[int]:
    """Boundaries of the 2*sp near-equal chunks of `num_tokens` (chunk c is [b[c], b[c+1]))."""
    parts = 2 * sp
    return [num_tokens * c // parts for c in range(parts + 1)]


def tokens_held(rank: int, num_tokens: int, block_size: int, sp: int) -> int:
    """How many of positions [0, num_tokens) of a request rank `rank` stores (block-cyclic)."""
    full, rest = divmod(num_tokens, block_size)
    return len(range(rank, full, sp)) * block_size + (rest if full % sp == rank else 0)


class _Split:
    """Every rank's rows and chunks of one step (the same on every rank)."""

    def __init__(self, query_lens: list[int], seq_lens: list[int], block_size: int, sp: int) -> None:
        self.rows: list[list[int]] = [[] for _ in range(sp)]  # global rows per rank
        # per rank: (request, chunk or -1 for a decode row, first local row, end local row)
        self.chunks: list[list[tuple[int, int, int, int]]] = [[] for _ in range(sp)]
        self.position: list[int] = []
        self.request_of: list[int] = []
        start = 0
        for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
            self.position += range(s - q, s)
            self.request_of += [i] * q
            if q == 1:
                self._take(((s - 1) // block_size) % sp, i, -1, start, start + 1)
            else:
                bounds = zigzag_bounds(q, sp)
                for rank in range(sp):
                    for chunk in (rank, 2 * sp - 1 - rank):
                        if bounds[chunk + 1] > bounds[chunk]:
                            self._take(rank, i, chunk, start + bounds[chunk], start + bounds[chunk + 1])
            start += q

    def _take(self, rank: int, request: int, chunk: int, first: int, end: int) -> None:
        local = len(self.rows[rank])
        self.chunks[rank].append((request, chunk, local, local + end - first))
        self.rows[rank] += range(first, end)


def build_sp_metadata(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                      sp: int, rank: int, blocks_per_rank: int, sample_requests: list[int],
                      device: torch.device | str = "cpu") -> SPMetadata:
    """The plan of one step for `rank`; `sample_requests` are the batch indices that sample this step."""
    split = _Split(query_lens, seq_lens, block_size, sp)
    offset = rank * blocks_per_rank

    def local_blocks(request: int, num_tokens: int) -> list[int]:
        table = block_tables[request]
        ids = [table[b] - offset for b in range(rank, -(-num_tokens // block_size), sp)]
        if any(not 0 <= i < blocks_per_rank for i in ids):
            raise ValueError(f"request {request}: a block of SP rank {rank} is outside its partition")
        return ids

    md = SPMetadata(sp, rank, torch.tensor(split.rows[rank], dtype=torch.long, device=device),
                    [len(r) for r in split.rows], _writes(split, block_tables, block_size, sp, rank, offset, device),
                    _pairs(split, rank, sp), any(q > 1 for q in query_lens), **_cached(
                        split, query_lens, seq_lens, block_size, sp, rank, local_blocks, device))
    md.sample_counts, md.sample_local, md.sample_order = _samples(split, query_lens, sample_requests, sp, rank,
                                                                  device)
    return md


def _writes(split: _Split, block_tables: list[list[int]], block_size: int, sp: int, rank: int, offset: int,
            device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    writes: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for source in range(sp):
        rows, slots = [], []
        for local, row in enumerate(split.rows[source]):
            position = split.position[row]
            block = position // block_size
            if block % sp == rank:
                rows.append(local)
                slots.append((block_tables[split.request_of[row]][block] - offset) * block_size
                             + position % block_size)
        writes.append((torch.tensor(rows, dtype=torch.long, device=device),
                       torch.tensor(slots, dtype=torch.long, device=device)) if rows else None)
    return writes


def _pairs(split: _Split, rank: int, sp: int) -> list[list[FreshPair]]:
    mine = [c for c in split.chunks[rank] if c[1] >= 0]
    pairs: list[list[FreshPair]] = []
    for source in range(sp):
        theirs = [c for c in split.chunks[source] if c[1] >= 0]
        found = []
        for request, chunk, q_start, q_end in mine:
            for key_request, key_chunk, k_start, k_end in theirs:
                if key_request == request and key_chunk <= chunk:
                    found.append(FreshPair(q_start, q_end, k_start, k_end, causal=key_chunk == chunk))
        pairs.append(found)
    return pairs


def _cached(split: _Split, query_lens: list[int], seq_lens: list[int], block_size: int, sp: int, rank: int,
            local_blocks, device) -> dict:
    """The cached part: which rows take part (gathered order: rank by rank, each in local order), and what
    this rank computes for all of them."""
    counts, gathered_of_row, mine = [], {}, []
    for source in range(sp):
        local_rows = [local for request, chunk, first, end in split.chunks[source]
                      if chunk < 0 or seq_lens[request] > query_lens[request] for local in range(first, end)]
        counts.append(len(local_rows))
        if source == rank:
            mine = local_rows
    width = max(counts, default=0)
    for source in range(sp):
        k = 0
        for request, chunk, first, end in split.chunks[source]:
            if chunk < 0 or seq_lens[request] > query_lens[request]:
                for _ in range(first, end):
                    gathered_of_row.setdefault(request, []).append((chunk, source * width + k))
                    k += 1
    decode_rows, tables, lens, groups = [], [], [], []
    for request, entries in gathered_of_row.items():
        if query_lens[request] == 1:  # a decode row: everything before it, and itself
            decode_rows.append(entries[0][1])
            tables.append(local_blocks(request, seq_lens[request]))
            lens.append(tokens_held(rank, seq_lens[request], block_size, sp))
            continue
        prior = seq_lens[request] - query_lens[request]
        held = tokens_held(rank, prior, block_size, sp)
        if held:
            groups.append(PrefixGroup(torch.tensor([g for _, g in entries], dtype=torch.long, device=device),
                                      torch.tensor(local_blocks(request, prior), dtype=torch.long, device=device),
                                      held))
    table_width = max((len(t) for t in tables), default=1) or 1
    padded = [t + [0] * (table_width - len(t)) for t in tables]
    return dict(cached_counts=counts, cached_local=torch.tensor(mine, dtype=torch.long, device=device),
                decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
                decode_tables=torch.tensor(padded, dtype=torch.long, device=device).view(len(tables), table_width),
                decode_lens=torch.tensor(lens, dtype=torch.long, device=device), prefix_groups=groups)


def _samples(split: _Split, query_lens: list[int], sample_requests: list[int], sp: int, rank: int,
             device) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Which rank computes the last row of each sampling request, and where it lands once all-gathered."""
    last_row = dict.fromkeys(sample_requests)
    start = 0
    for i, q in enumerate(query_lens):
        if i in last_row:
            last_row[i] = start + q - 1
        start += q
    where = {row: (source, local) for source in range(sp) for local, row in enumerate(split.rows[source])}
    per_rank: list[list[int]] = [[] for _ in range(sp)]
    for request in sample_requests:
        per_rank[where[last_row[request]][0]].append(where[last_row[request]][1])
    counts = [len(rows) for rows in per_rank]
    width = max(counts, default=0)
    order = [where[last_row[r]][0] * width + per_rank[where[last_row[r]][0]].index(where[last_row[r]][1])
             for r in sample_requests]
    return (counts, torch.tensor(per_rank[rank], dtype=torch.long, device=device),
            torch.tensor(order, dtype=torch.long, device=device))
