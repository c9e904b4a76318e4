"""Triton paged-attention kernels and TritonBackend against a float64 reference.

Off CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) on CPU tensors, so shapes stay small; tests/gpu/test_triton_attention_cuda.py reuses the
case builders here on CUDA. Every case poisons what the kernels must not touch: cache slots past a
row's length, unused and padding blocks hold NaN, and outputs start as NaN.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from distinfer.model.attention.paged import (
    AttentionMetadata,
    TorchSDPABackend,
    make_kv_cache,
)
from distinfer.model.kernels import triton_attention as ta
from tests.unit.paged_cases import NAN, poisoned_paged_cache

_interp = triton.runtime.interpreter.InterpretedFunction
# Off CUDA the kernels need TRITON_INTERPRET=1 before triton's first import in the process; in a full
# run an earlier test module may have imported it (transformers' Llama does): then
# test_in_a_fresh_process runs this module in a new process and the other tests skip here.
RUNNABLE = torch.cuda.is_available() or (isinstance(triton.language.cdiv, _interp)
                                         and isinstance(ta._decode_kernel, _interp))


@pytest.fixture(autouse=True)
def _needs_runnable_kernels(request):
    if not RUNNABLE and request.function is not test_in_a_fresh_process:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: see test_in_a_fresh_process")


def test_in_a_fresh_process():
    if RUNNABLE:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not fresh_process", __file__]
    res = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


# (rtol, atol) against the float64 reference of the same (rounded) inputs
TOLERANCE = {torch.float32: (1e-5, 2e-6), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# (Hq, Hkv, D): GQA ratios 1 / 4 / 8 with both head sizes
HEADS = [(4, 4, 64), (8, 2, 128), (16, 2, 64)]
HEAD_IDS = ["mha-d64", "gqa4-d128", "gqa8-d64"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@dataclass
class Case:
    """One step: rows[b] = (query tokens, seq_len); the cache holds each row's cached prefix, NaN elsewhere."""

    query_lens: list[int]
    seq_lens: list[int]
    q: torch.Tensor  # [T, Hq, D] strided view into a fused qkv buffer
    kv: torch.Tensor  # [T, 2, Hkv, D] view into the same buffer, row stride > 2*Hkv*D
    kv_cache: torch.Tensor  # [num_blocks, block_size, 2, Hkv, D]; block 0 is never a row's block
    block_tables: torch.Tensor  # [B, W], padded with block 0
    seq_lens_t: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    slot_mapping: torch.Tensor  # [T] int64, -1 for a token without a position (seq_len 0 row)

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[1]


def make_case(query_lens: list[int], seq_lens: list[int], heads: tuple[int, int, int], block_size: int,
              dtype: torch.dtype, device: str = "cpu", seed: int = 0, table_dtype=torch.int32) -> Case:
    """Random q/kv and cached prefixes; blocks shuffled, one spare (poisoned) block per row."""
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    cache, tables = poisoned_paged_cache(seq_lens, block_size, hkv, d, dtype, seed)
    flat = cache.view(-1, 2, hkv, d)
    slots = []
    for table, n, s in zip(tables, query_lens, seq_lens):
        row = [table[p // block_size] * block_size + p % block_size for p in range(s)]
        prefix = row[: s - n]
        flat[prefix] = torch.randn(len(prefix), 2, hkv, d, generator=gen).to(dtype)
        slots += [-1] * (n - s) + row[max(s - n, 0):]  # a seq_len 0 row's token has no slot
    tokens = sum(query_lens)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d + 16, generator=gen).to(dtype=dtype, device=device)  # padded rows
    qsl = torch.tensor([0] + query_lens).cumsum(0)
    return Case(query_lens, seq_lens, qkv[:, : hq * d].view(tokens, hq, d),
                qkv[:, hq * d:(hq + 2 * hkv) * d].view(tokens, 2, hkv, d), cache.to(device),
                torch.tensor(tables, dtype=table_dtype, device=device),
                torch.tensor(seq_lens, dtype=torch.int32, device=device),
                qsl.to(device=device, dtype=torch.int32), torch.tensor(slots, dtype=torch.long, device=device))


def poisoned_out(case: Case) -> torch.Tensor:
    """A NaN [T, Hq, D] output view with one extra (never written) head per token."""
    tokens, hq, d = case.q.shape
    return torch.full((tokens, hq + 1, d), NAN, dtype=case.q.dtype, device=case.q.device)[:, :hq]


def reference(case: Case, scale: float) -> torch.Tensor:
    """float64 causal attention of every query token over its row's context (read from the cache after
    write_kv); zeros for a row without context."""
    tokens, hq, d = case.q.shape
    hkv = case.kv.shape[2]
    flat = case.kv_cache.view(-1, 2, hkv, d).double().cpu()
    tables, q = case.block_tables.cpu(), case.q.double().cpu()
    out = torch.zeros(tokens, hq, d, dtype=torch.float64)
    start = 0
    for b, (n, s) in enumerate(zip(case.query_lens, case.seq_lens)):
        if s > 0:
            pos = torch.arange(s)
            kv = flat[tables[b, pos // case.block_size].long() * case.block_size + pos % case.block_size]
            k, v = (kv[:, i].repeat_interleave(hq // hkv, dim=1) for i in (0, 1))  # [s, Hq, D]
            scores = torch.einsum("nhd,khd->hnk", q[start:start + n], k) * scale
            visible = pos[None, :] <= (s - n + torch.arange(n))[:, None]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[start:start + n] = torch.einsum("hnk,khd->nhd", probs, v)
        start += n
    return out


def check(out: torch.Tensor, case: Case, scale: float) -> None:
    rtol, atol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(out.double().cpu(), reference(case, scale), rtol=rtol, atol=atol)
    base = out.as_strided((out.shape[0], out.shape[1] + 1, out.shape[2]), out.stride())
    assert base[:, -1].isnan().all(), "wrote past the output view"


def run_decode(case: Case, max_seq_len: int | None = None) -> torch.Tensor:
    ta.write_kv(case.kv_cache, case.kv, case.slot_mapping)
    out = poisoned_out(case)
    res = ta.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens_t,
                                    case.q.shape[-1] ** -0.5, max_seq_len or max(case.seq_lens), out=out)
    assert res is out
    return out


def run_prefill(case: Case, max_query_len: int | None = None) -> torch.Tensor:
    ta.write_kv(case.kv_cache, case.kv, case.slot_mapping)
    out = poisoned_out(case)
    res = ta.paged_prefill_attention(case.q, case.kv_cache, case.block_tables, case.query_start_loc,
                                     case.seq_lens_t, case.q.shape[-1] ** -0.5,
                                     max_query_len or max(case.query_lens), out=out)
    assert res is out
    return out


# --- write_kv -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_strided_rows_and_skips_padding(dtype):
    case = make_case([1, 3, 1, 2], [0, 5, 1, 18], (8, 2, 64), block_size=16, dtype=dtype)
    expected = case.kv_cache.clone()
    keep = case.slot_mapping >= 0
    assert not keep.all()  # the seq_len 0 row's token is skipped
    expected.view(-1, 2, 2, 64)[case.slot_mapping[keep]] = case.kv[keep]
    ta.write_kv(case.kv_cache, case.kv, case.slot_mapping)
    torch.testing.assert_close(case.kv_cache, expected, rtol=0, atol=0, equal_nan=True)


# --- decode ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_decode_splits_and_padding_rows(heads, dtype):
    # a long row over several splits, odd lengths, a seq_len 0 padding row, one key
    lens = [700, 0, 37, 1, 300]
    case = make_case([1] * len(lens), lens, heads, block_size=16 if heads[2] == 64 else 32, dtype=dtype)
    assert ta.decode_num_splits(len(lens), heads[1], max(lens), case.q.device) > 1
    check(run_decode(case), case, heads[2] ** -0.5)


def test_decode_single_split_with_capture_bound():
    # one split (short rows, a big batch) and a max_seq_len bound above every row, as in a CUDA graph
    lens = [5, 17, 0, 33] + [9] * 12
    case = make_case([1] * len(lens), lens, (8, 2, 64), block_size=16, dtype=torch.float32, seed=1)
    assert ta.decode_num_splits(len(lens), 2, 40, case.q.device) == 1
    check(run_decode(case, max_seq_len=40), case, 0.125)
    case = make_case([1, 1, 1], [3, 0, 40], (4, 1, 64), block_size=32, dtype=torch.float32, seed=2)
    assert ta.decode_num_splits(3, 1, 2048, case.q.device) > 2  # splits past every row exit
    check(run_decode(case, max_seq_len=2048), case, 0.125)


# --- prefill --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_prefill_mixed_rows(heads, dtype):
    # fresh prompt (odd, > one query tile), cached prefix over partial blocks, decode rows, a row with
    # no tokens this step; max_query_len bound above the longest row
    qlens = [70, 1, 13, 0, 1, 7]
    lens = [70, 50, 13 + 21, 0, 1, 7 + 90]
    block = 16 if heads[2] == 64 else 32
    case = make_case(qlens, lens, heads, block_size=block, dtype=dtype, seed=4)
    check(run_prefill(case, max_query_len=80), case, heads[2] ** -0.5)


def test_int64_tables_and_contiguous_inputs():
    case = make_case([3, 1], [40, 19], (4, 1, 64), block_size=16, dtype=torch.float32, seed=6,
                     table_dtype=torch.int64)
    case.q, case.kv = case.q.contiguous(), case.kv.contiguous()
    check(run_prefill(case), case, 0.125)
    out = ta.paged_decode_attention(case.q[[3]], case.kv_cache, case.block_tables[1:], case.seq_lens_t[1:].long(),
                                    0.125, 19)
    torch.testing.assert_close(out.double(), reference(case, 0.125)[[3]], rtol=1e-5, atol=2e-6)


def test_group_and_head_size_not_powers_of_two():
    # 3 query heads per KV head (padded to 4 / 16 dot rows), head size 96 (padded to 128)
    case = make_case([1, 1], [90, 0], (6, 2, 96), block_size=16, dtype=torch.float32, seed=9)
    check(run_decode(case), case, 96 ** -0.5)
    case = make_case([11, 1], [30, 40], (6, 2, 96), block_size=16, dtype=torch.float32, seed=10)
    check(run_prefill(case), case, 96 ** -0.5)


# --- backend --------------------------------------------------------------------------------------

def backend_step(query_lens: list[int], seq_lens: list[int], heads: tuple[int, int, int], block_size: int,
                 seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """TritonBackend and TorchSDPABackend (float32) outputs of one step over equal prefilled caches; the
    caches must come out equal too."""
    from distinfer.model.attention.triton import TritonBackend

    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-s // block_size) for s in seq_lens) + 1
    ids = list(range(1, nblocks))
    random.Random(seed).shuffle(ids)
    tables = [[ids.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    md = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=device)
    cached = [(s - n, t) for s, n, t in zip(seq_lens, query_lens, tables) if s > n]
    prior = AttentionMetadata.build([c for c, _ in cached], [c for c, _ in cached], [t for _, t in cached],
                                    block_size, device=device)  # its slot_mapping: the cached prefixes' slots
    prefix = torch.randn(prior.num_tokens, 2, hkv, d, generator=gen).to(device)
    qkv = torch.randn(md.num_tokens, (hq + 2 * hkv) * d, generator=gen).to(device)
    q, kv = qkv[:, : hq * d].view(-1, hq, d), qkv[:, hq * d:].view(-1, 2, hkv, d)
    caches, outs = [], []
    for backend in (TritonBackend(), TorchSDPABackend()):
        caches.append(make_kv_cache(nblocks, block_size, hkv, d, torch.float32, device))
        caches[-1].view(-1, 2, hkv, d)[prior.slot_mapping] = prefix
        outs.append(backend.forward(q, kv, caches[-1], md, d ** -0.5))
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0)
    return outs[0], outs[1]


def test_backend_matches_torch_sdpa_mixed_batch():
    # decode rows + a fresh prompt + a prompt after a cached prefix over partial blocks
    from distinfer.model.attention.triton import TritonBackend

    assert TritonBackend.name == "triton"
    got, want = backend_step([1, 12, 1, 9], [30, 12, 17, 9 + 22], (8, 2, 64), block_size=16, seed=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_backend_matches_torch_sdpa_pure_decode():
    got, want = backend_step([1, 1, 1], [300, 5, 64], (4, 4, 64), block_size=32, seed=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
