"""Paged attention metadata and the torch SDPA backend against a naive dense reference."""
from __future__ import annotations

import random

import pytest
import torch

from distinfer.model.attention import paged
from distinfer.model.attention.paged import (
    AttentionMetadata,
    get_attention_backend,
    resolve_attention_backend,
    make_kv_cache,
    write_kv,
)


def _tables(seq_lens: list[int], block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    # one spare block per request: tables may be longer than the context needs
    return [[pool.pop() for _ in range(-(-s // block_size) + 1)] for s in seq_lens]


def test_slot_mapping_follows_block_tables():
    md = AttentionMetadata.build([3, 1, 2], [5, 9, 2], [[7, 2], [4, 0, 6], [1]], block_size=4, device="cpu")
    # request 0: positions 2,3,4 -> blocks 7,7,2; request 1: position 8 -> block 6; request 2: 0,1 -> block 1
    assert md.slot_mapping.tolist() == [30, 31, 8, 24, 4, 5]
    assert md.num_tokens == 6 and md.num_decodes == 1
    assert md.decode_rows == slice(3, 4)
    assert [(p.start, p.end, p.context_len) for p in md.prefills] == [(0, 3, 5), (4, 6, 2)]
    assert md.prefills[0].block_ids.tolist() == [7, 2] and md.prefills[1].block_ids is None
    assert md.query_start_loc.tolist() == [0, 3, 4, 6]


def test_decode_rows_index_and_mask():
    md = AttentionMetadata.build([1, 4, 1], [3, 4, 6], [[0], [1], [2, 3]], block_size=4, device="cpu")
    assert md.decode_rows.tolist() == [0, 5]
    [chunk] = md.decode_chunks(max_rows=8)
    assert (chunk.start, chunk.end, chunk.kv_len) == (0, 2, 6)
    assert chunk.block_ids.tolist() == [0, 0, 2, 3]  # padded with block 0, masked out
    valid = chunk.mask[:, 0, 0] == 0
    assert valid.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    first, second = md.decode_chunks(max_rows=1)  # per-row chunks need no padding
    assert (first.kv_len, first.block_ids.tolist(), first.mask) == (3, [0], None)
    assert (second.kv_len, second.block_ids.tolist(), second.mask) == (6, [2, 3], None)
    same = AttentionMetadata.build([1, 1], [5, 5], [[0, 1], [2, 3]], block_size=4, device="cpu")
    assert same.decode_chunks(2)[0].mask is None and same.is_pure_decode


@pytest.mark.parametrize("bad", [
    dict(query_lens=[2], seq_lens=[1], block_tables=[[0]]),
    dict(query_lens=[0], seq_lens=[1], block_tables=[[0]]),
    dict(query_lens=[1], seq_lens=[9], block_tables=[[0, 1]]),
    dict(query_lens=[1, 1], seq_lens=[1], block_tables=[[0]]),
])
def test_build_rejects_inconsistent_input(bad):
    with pytest.raises(ValueError):
        AttentionMetadata.build(block_size=4, device="cpu", **bad)


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D] at the last n positions of k/v [s, Hkv, D]; causal; float64."""
    n, hq, _ = q.shape
    s, hkv, _ = k.shape
    rep = hq // hkv
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    allowed = torch.ones(n, s, dtype=torch.bool).tril(diagonal=s - n)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("chunk_bytes", [paged.DECODE_CHUNK_BYTES, 1])  # 1: one decode row per chunk
@pytest.mark.parametrize("backend", ["torch_sdpa", "cpu_paged"])  # cpu_paged: bf16 goes through torch
def test_backend_matches_dense_reference(dtype, tol, hq, hkv, chunk_bytes, backend, monkeypatch):
    monkeypatch.setattr(paged, "DECODE_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    d, bs, nblocks, scale = 16, 4, 40, 0.3
    query_lens = [1, 6, 1, 9, 3, 1]
    seq_lens = [7, 10, 13, 9, 3, 1]  # decode, chunked prefill, decode, fresh, fresh, decode of a 1-token prompt
    tables = _tables(seq_lens, bs, nblocks, seed=1)
    cache = make_kv_cache(nblocks, bs, hkv, d, dtype, "cpu")
    full_k = [torch.randn(s, hkv, d, dtype=dtype) for s in seq_lens]
    full_v = [torch.randn(s, hkv, d, dtype=dtype) for s in seq_lens]
    # the cached prefix (positions before this step's tokens) is already in the cache
    prefix = AttentionMetadata.build([s - q for s, q in zip(seq_lens, query_lens) if s > q],
                                     [s - q for s, q in zip(seq_lens, query_lens) if s > q],
                                     [t for t, s, q in zip(tables, seq_lens, query_lens) if s > q], bs, "cpu")
    pk = [k[: s - q] for k, s, q in zip(full_k, seq_lens, query_lens) if s > q]
    pv = [v[: s - q] for v, s, q in zip(full_v, seq_lens, query_lens) if s > q]
    write_kv(cache, torch.stack((torch.cat(pk), torch.cat(pv)), dim=1), prefix.slot_mapping)

    md = AttentionMetadata.build(query_lens, seq_lens, tables, bs, "cpu")
    q = torch.randn(sum(query_lens), hq, d, dtype=dtype)
    k = torch.cat([k[s - n:] for k, s, n in zip(full_k, seq_lens, query_lens)])
    v = torch.cat([v[s - n:] for v, s, n in zip(full_v, seq_lens, query_lens)])
    out = get_attention_backend(backend).forward(q, torch.stack((k, v), dim=1), cache, md, scale)
    assert out.shape == q.shape and out.dtype == dtype
    row = 0
    for i, (n, s) in enumerate(zip(query_lens, seq_lens)):
        ref = _naive(q[row:row + n], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[row:row + n].double(), ref, atol=tol, rtol=tol, msg=f"request {i}")
        row += n


@pytest.mark.parametrize("name", ["torch_sdpa", "cpu_paged"])
def test_pure_decode_and_single_prefill_paths(name):
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 2
    cache = make_kv_cache(16, bs, hkv, d, torch.float32, "cpu")
    k, v, q = torch.randn(5, hkv, d), torch.randn(5, hkv, d), torch.randn(5, hq, d)
    kv = torch.stack((k, v), dim=1)
    backend = get_attention_backend(name)
    prefill = backend.forward(q, kv, cache, AttentionMetadata.build([5], [5], [[3, 9, 4]], bs, "cpu"), 0.5)
    torch.testing.assert_close(prefill, _naive(q, k, v, 0.5).float(), atol=1e-5, rtol=1e-5)
    # decode of the last position again, now reading every key from the cache
    md = AttentionMetadata.build([1], [5], [[3, 9, 4]], bs, "cpu")
    dec = backend.forward(q[4:], kv[4:], cache, md, 0.5)
    assert torch.equal(cache[4, 0], kv[4])  # position 4 -> block 4 (third in the table), offset 0
    torch.testing.assert_close(dec, prefill[4:], atol=1e-5, rtol=1e-5)


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        get_attention_backend("flash")
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        resolve_attention_backend("flash", "cpu")


def test_backend_resolution_by_device(monkeypatch):
    assert resolve_attention_backend("auto", "cuda") in ("triton", "torch_sdpa")
    assert resolve_attention_backend("torch_sdpa", "cuda:1") == "torch_sdpa"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_attention_backend("cpu_paged", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attention_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", "cpu") == "triton"
