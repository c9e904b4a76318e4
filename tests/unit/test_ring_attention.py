"""Ring attention (model/attention/ring.py over the plan of sp_plan.py) == full causal attention, on random
tensors, in real gloo process groups of 2 and 3 ranks: several requests per step (prefill from scratch, prefill
after a cached prefix, decode), lengths not divisible by 2*sp, GQA and not; then a decode step that reads
what the ring stored. The plan's pure parts are checked without processes."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from distinfer.model.attention.sp_plan import build_sp_metadata, tokens_held, zigzag_bounds

BLOCK = 4
# (cached tokens before this step, tokens computed this step) per request
STEPS = [
    [(0, 23)],  # one prompt, 23 tokens: not divisible by 2*sp
    [(0, 5), (9, 1), (0, 2), (13, 11), (6, 1)],  # mixed: prefills, decodes, a chunk after a cached prefix
    [(17, 30), (0, 1)],  # a one-token prompt: computed like a decode row
]
HEADS = [(4, 2), (3, 3)]  # (query heads, KV heads)


def test_zigzag_and_block_cyclic_ownership():
    assert zigzag_bounds(23, 2) == [0, 5, 11, 17, 23]
    assert zigzag_bounds(3, 2) == [0, 0, 1, 2, 3]  # chunks may be empty
    # positions 0..9 with blocks of 4 on 2 ranks: rank 0 holds 0-3 and 8-9, rank 1 holds 4-7
    assert [tokens_held(r, 10, 4, 2) for r in (0, 1)] == [6, 4]
    assert [tokens_held(r, 7, 4, 3) for r in (0, 1, 2)] == [4, 3, 0]


def test_each_rank_takes_chunks_i_and_2sp_minus_1_minus_i():
    # 16 tokens in blocks of 4: blocks 0 and 2 on rank 0 (ids 0, 1), blocks 1 and 3 on rank 1 (ids 8, 9)
    md0 = build_sp_metadata([16], [16], [[0, 8, 1, 9]], BLOCK, 2, 0, 8, [0])
    md1 = build_sp_metadata([16], [16], [[0, 8, 1, 9]], BLOCK, 2, 1, 8, [0])
    assert md0.local_rows.tolist() == [0, 1, 2, 3, 12, 13, 14, 15]  # chunks 0 and 3
    assert md1.local_rows.tolist() == list(range(4, 12))  # chunks 1 and 2
    assert md0.sample_counts == [1, 0] and md0.sample_local.tolist() == [7]  # the last token is on rank 0
    # rank 0 stores positions 0-3 and 8-11: its own rows 0-3 and rank 1's rows 8-11 (its local rows 4-7)
    assert md0.writes[0][1].tolist() == [0, 1, 2, 3] and md0.writes[1][0].tolist() == [4, 5, 6, 7]
    assert md0.writes[1][1].tolist() == [4, 5, 6, 7]  # slots of its second local block (id 1)
    with pytest.raises(ValueError, match="outside its partition"):  # a table that breaks the block-cyclic rule
        build_sp_metadata([1], [10], [[0, 1, 9]], BLOCK, 2, 0, 8, [0])


def _tables(steps: list[tuple[int, int]], sp: int, per_rank: int) -> list[list[int]]:
    """Block ids of each request: block b from rank b % sp's partition, in order."""
    used = [0] * sp
    tables = []
    for cached, new in steps:
        table = []
        for b in range(-(-(cached + new + 1) // BLOCK)):  # room for one more (decode) token
            rank = b % sp
            table.append(rank * per_rank + used[rank])
            used[rank] += 1
        tables.append(table)
    return tables


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scale: float) -> torch.Tensor:
    """Rows first.. of q attend causally to k, v (all positions), GQA expanded."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q[first:], k) * scale
    positions = torch.arange(k.shape[0])
    scores.masked_fill_(positions[None, None, :] > torch.arange(first, q.shape[0])[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _run_case(rank: int, sp: int, steps, heads, seed: int, groups) -> None:
    from distinfer.model.attention.paged import TorchSDPABackend, make_kv_cache, write_kv
    from distinfer.model.attention.ring import RingStats, ring_attention

    hq, hkv = heads
    d, per_rank, scale = 8, 64, 0.35
    gen = torch.Generator().manual_seed(seed)
    lengths = [c + n + 1 for c, n in steps]  # every position this case ever uses (one decode step after)
    qs = [torch.randn(n, hq, d, generator=gen) for n in lengths]
    ks = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    vs = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    tables = _tables(steps, sp, per_rank)
    cache = make_kv_cache(per_rank, BLOCK, hkv, d, torch.float32, "cpu")
    for i, (cached, _) in enumerate(steps):  # the cached prefix, where its owners keep it
        for p in range(cached):
            if (p // BLOCK) % sp == rank:
                slot = (tables[i][p // BLOCK] - rank * per_rank) * BLOCK + p % BLOCK
                write_kv(cache, torch.stack([ks[i][p], vs[i][p]])[None], torch.tensor([slot]))
    backend = TorchSDPABackend()
    for phase in ("step", "decode"):
        if phase == "step":
            query_lens, seq_lens = [n for _, n in steps], [c + n for c, n in steps]
        else:
            query_lens, seq_lens = [1] * len(steps), [c + n + 1 for c, n in steps]
        md = build_sp_metadata(query_lens, seq_lens, tables, BLOCK, sp, rank, per_rank,
                               list(range(len(steps))))
        where = [(i, p) for i, (q, s) in enumerate(zip(query_lens, seq_lens)) for p in range(s - q, s)]
        rows = [where[r] for r in md.local_rows.tolist()]
        q = torch.stack([qs[i][p] for i, p in rows]) if rows else torch.empty(0, hq, d)
        kv = torch.stack([torch.stack([ks[i][p], vs[i][p]]) for i, p in rows]) if rows else torch.empty(0, 2, hkv, d)
        RingStats.take()
        out = ring_attention(backend, q, kv, cache, md, scale, *groups)
        in_flight, exposed, sent = RingStats.take()
        if md.needs_ring:  # every ring step but the last passes on what this rank holds
            assert sent == sum(md.num_rows[(rank - t) % sp] for t in range(sp - 1)) * 2 * hkv * d * 4
            assert 0 <= exposed <= in_flight
        else:
            assert (in_flight, exposed, sent) == (0.0, 0.0, 0)
        for row, (i, p) in enumerate(rows):
            expected = _reference(qs[i][:p + 1], ks[i][:p + 1], vs[i][:p + 1], p, scale)[0]
            assert torch.allclose(out[row], expected, atol=2e-5), (phase, steps, heads, i, p)


def _worker(rank: int, sp: int, init_file: str) -> None:
    import torch.distributed as dist

    from distinfer.distributed.parallel_state import GroupCoordinator

    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=sp, rank=rank)
    try:
        ranks = tuple(range(sp))
        groups = tuple(GroupCoordinator(name, ranks, rank, dist.new_group(list(ranks))) for name in ("sp", "ring"))
        torch.set_num_threads(1)
        for seed, steps in enumerate(STEPS):
            for heads in HEADS:
                _run_case(rank, sp, steps, heads, seed, groups)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sp", [2, 3])
def test_ring_attention_equals_full_causal_attention(sp):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(sp, os.path.join(tmp, "init")), nprocs=sp, join=True)
