"""Attention with log-sum-exp (`AttentionBackend.dense_with_lse` / `paged_with_lse`, the partials sequence
parallelism merges) on every backend available here against a float64 reference: torch_sdpa (the torch
reference ops themselves), cpu_paged (the fused C decode kernel) and triton (interpreted on the CPU under
TRITON_INTERPRET=1 when CUDA is absent). GQA and MHA, odd lengths, rows without keys, strided inputs,
float32 and bfloat16; `merge_partials` over split keys equals attention over all keys; the existing
decode paths (no LSE) still give the same results.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from distinfer.model.attention.paged import (
    TorchSDPABackend,
    dense_attention_lse,
    merge_partials,
    paged_attention_lse,
)
from distinfer.model.kernels import cpu
from tests.unit.paged_cases import poisoned_paged_cache

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_runnable() -> bool:
    """CUDA, or the interpreter active for our kernels (TRITON_INTERPRET=1 before triton's first import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from distinfer.model.kernels import triton_dense_attention as td

    return torch.cuda.is_available() or isinstance(td._dense_kernel, InterpretedFunction)


TRITON_RUNNABLE = _triton_runnable()
DEVICE = "cuda" if torch.cuda.is_available() and TRITON_RUNNABLE else "cpu"
BACKENDS = ["torch_sdpa", "cpu_paged", "triton"]
# (Hq, Hkv, D): GQA 2 with head size 64 (the C kernel's unrolled size), MHA with 48 (generic, padded)
HEADS = [(4, 2, 64), (4, 4, 48)]
HEAD_IDS = ["gqa2-d64", "mha-d48"]
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
# (rtol, atol) of out, atol of lse; bfloat16: the Triton kernels round the probabilities for the P.V dot
TOLERANCE = {torch.float32: (1e-5, 2e-6, 1e-5), torch.bfloat16: (2e-2, 2e-2, 1e-3)}


def make_backend(name: str):
    if name == "triton":
        if not TRITON_RUNNABLE:
            pytest.skip("triton not installed, or imported before TRITON_INTERPRET=1 (see the fresh-process test)")
        from distinfer.model.attention.triton import TritonBackend

        return TritonBackend()
    if name == "cpu_paged":
        if cpu.load() is None:
            pytest.skip("CPU kernels unavailable (no compiler or DISTINFER_CPU_KERNELS=0)")
        from distinfer.model.attention.cpu_paged import CPUPagedBackend

        return CPUPagedBackend()
    return TorchSDPABackend()


def device_for(name: str) -> str:
    return DEVICE if name == "triton" else "cpu"


def test_triton_in_a_fresh_process():
    """In a full run an earlier module may import triton before TRITON_INTERPRET=1: run the triton cases anew."""
    if TRITON_RUNNABLE or not HAS_TRITON:
        pytest.skip("the triton cases run in this process" if HAS_TRITON else "triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and not fresh_process",
           __file__]
    res = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


# --- float64 reference ----------------------------------------------------------------------------

def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (out [n, Hq, D], lse [n, Hq]) of q [n, Hq, D] over k, v [m, Hkv, D], where visible [n, m] says
    which keys each row sees; zeros and -inf for a row that sees none."""
    group = q.shape[1] // max(k.shape[1], 1)
    k, v = (t.double().cpu().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("nhd,mhd->hnm", q.double().cpu() * scale, k).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # [Hq, n]
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    return torch.einsum("hnm,mhd->nhd", probs, v), lse.transpose(0, 1)


def check(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype):
    out, lse = got
    assert out.dtype == lse.dtype == torch.float32
    rtol, atol, lse_atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.double().cpu(), want[1], rtol=0, atol=lse_atol)  # -inf rows match exactly


# --- paged ----------------------------------------------------------------------------------------

def paged_case(lens: list[int], heads: tuple[int, int, int], block_size: int, dtype: torch.dtype, seed: int,
               device: str = "cpu"):
    """(q [B, Hq, D] with strided rows, cache, int64 tables, int64 lens); blocks shuffled, every slot that is no
    row's context (past a row's length, spare and padding blocks) holds NaN."""
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    cache, tables = poisoned_paged_cache(lens, block_size, hkv, d, dtype, seed)
    flat = cache.view(-1, 2, hkv, d)
    for table, n in zip(tables, lens):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        flat[slots] = torch.randn(n, 2, hkv, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), hq * d + 8, generator=gen).to(dtype)[:, : hq * d].view(len(lens), hq, d)
    return (q.to(device), cache.to(device), torch.tensor(tables, dtype=torch.int64, device=device),
            torch.tensor(lens, dtype=torch.int64, device=device))


def paged_reference(q, cache, tables, lens, scale):
    b, hq, d = q.shape
    bs, hkv = cache.shape[1], cache.shape[3]
    out, lse = torch.zeros(b, hq, d, dtype=torch.float64), torch.full((b, hq), float("-inf"), dtype=torch.float64)
    flat, tables = cache.view(-1, 2, hkv, d).cpu(), tables.cpu()
    for row, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        kv = flat[tables[row, pos // bs] * bs + pos % bs]
        o, s = reference(q[row:row + 1], kv[:, 0], kv[:, 1], torch.ones(1, n, dtype=torch.bool), scale)
        out[row], lse[row] = o[0], s[0]
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_with_lse(backend, heads, dtype):
    # odd lengths over partial blocks, rows without keys, one key, a long row (several Triton decode splits)
    impl = make_backend(backend)
    lens = [37, 0, 700, 1, 0, 190]
    q, cache, tables, ctx = paged_case(lens, heads, 16, dtype, seed=1, device=device_for(backend))
    scale = heads[2] ** -0.5
    got = impl.paged_with_lse(q, cache, tables, ctx, scale)
    want = paged_reference(q, cache, tables, ctx, scale)
    check(got, want, dtype)
    assert not got[0].isnan().any()
    assert got[1][[1, 4]].isneginf().all() and (got[0][[1, 4]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_with_lse_edges(backend):
    # every row empty (no key anywhere), an empty batch, a single short row in one split
    impl = make_backend(backend)
    dev = device_for(backend)
    q, cache, tables, ctx = paged_case([0, 0], (4, 2, 32), 16, torch.float32, seed=2, device=dev)
    out, lse = impl.paged_with_lse(q, cache, tables, ctx, 0.2)
    assert (out == 0).all() and lse.isneginf().all()
    out, lse = impl.paged_with_lse(q[:0], cache, tables[:0], ctx[:0], 0.2)
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)
    q, cache, tables, ctx = paged_case([5], (4, 2, 32), 16, torch.float32, seed=3, device=dev)
    check(impl.paged_with_lse(q, cache, tables, ctx, 0.2), paged_reference(q, cache, tables, ctx, 0.2),
          torch.float32)


def test_cpu_paged_falls_back_for_inputs_the_kernel_does_not_take():
    impl = make_backend("cpu_paged")
    for dtype, transposed in ((torch.float16, False), (torch.float32, True)):
        q, cache, tables, ctx = paged_case([9, 0, 40], (4, 2, 32), 16, dtype, seed=4)
        if transposed:  # elements of a head not contiguous
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        assert not cpu.decode_lse_applies(q, cache)
        check(impl.paged_with_lse(q, cache, tables, ctx, 0.2), paged_reference(q, cache, tables, ctx, 0.2),
              torch.float32 if dtype == torch.float32 else torch.bfloat16)


# --- dense ----------------------------------------------------------------------------------------

def dense_case(n: int, m: int, heads: tuple[int, int, int], dtype: torch.dtype, seed: int, device: str = "cpu"):
    """q [n, Hq, D] and k, v [m, Hkv, D] as strided views into fused buffers (as the model's projections give)."""
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq * d + 8, generator=gen).to(dtype)[:, : hq * d].view(n, hq, d)
    kv = torch.randn(m, 2, hkv, d, generator=gen).to(dtype)
    return q.to(device), kv[:, 0].to(device), kv[:, 1].to(device)


def dense_reference(q, k, v, causal, scale):
    n, m = q.shape[0], k.shape[0]
    visible = torch.ones(n, m, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    return reference(q, k, v, visible, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_with_lse(backend, causal, heads, dtype):
    impl = make_backend(backend)
    dev = device_for(backend)
    shapes = [(75, 75), (1, 1)] if causal else [(29, 53), (70, 3), (1, 40)]  # odd, > one query tile, tiny
    for i, (n, m) in enumerate(shapes):
        q, k, v = dense_case(n, m, heads, dtype, seed=10 + i, device=dev)
        scale = heads[2] ** -0.5
        check(impl.dense_with_lse(q, k, v, causal, scale), dense_reference(q, k, v, causal, scale), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_with_lse_empty(backend):
    impl = make_backend(backend)
    dev = device_for(backend)
    for n, m, causal in ((0, 0, True), (0, 7, False), (5, 0, False)):
        q, k, v = dense_case(n, m, (4, 2, 32), torch.float32, seed=20, device=dev)
        out, lse = impl.dense_with_lse(q, k, v, causal, 0.2)
        assert out.shape == (n, 4, 32) and lse.shape == (n, 4) and out.dtype == lse.dtype == torch.float32
        assert (out == 0).all() and lse.isneginf().all()


# --- merging partials -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_partials_over_split_keys_equals_full_attention(backend):
    impl = make_backend(backend)
    dev = device_for(backend)
    q, k, v = dense_case(23, 61, (4, 2, 32), torch.float32, seed=30, device=dev)
    full = dense_reference(q, k, v, False, 0.2)
    for cut in (17, 0, 61):  # a split, and each side empty once
        first = impl.dense_with_lse(q, k[:cut], v[:cut], False, 0.2)
        second = impl.dense_with_lse(q, k[cut:], v[cut:], False, 0.2)
        check(merge_partials(*first, *second), full, torch.float32)
    # causal diagonal chunk merged with a chunk of earlier keys: a later query chunk of a causal sequence
    q, k, v = dense_case(40, 40 + 26, (4, 2, 32), torch.float32, seed=31, device=dev)
    visible = torch.ones(40, 66, dtype=torch.bool).tril(diagonal=26)
    want = reference(q, k, v, visible, 0.2)
    merged = merge_partials(*impl.dense_with_lse(q, k[26:], v[26:], True, 0.2),
                            *impl.dense_with_lse(q, k[:26], v[:26], False, 0.2))
    check(merged, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_paged_partials_across_shards(backend):
    # decode under sequence parallelism: one query over two ranks' shards of its context (one rank empty)
    impl = make_backend(backend)
    dev = device_for(backend)
    q, cache, tables, ctx = paged_case([50, 30, 0], (4, 2, 32), 16, torch.float32, seed=40, device=dev)
    _, cache2, tables2, ctx2 = paged_case([21, 0, 0], (4, 2, 32), 16, torch.float32, seed=41, device=dev)
    merged = merge_partials(*impl.paged_with_lse(q, cache, tables, ctx, 0.2),
                            *impl.paged_with_lse(q, cache2, tables2, ctx2, 0.2))
    want = [paged_reference(q, c, t, n, 0.2) for c, t, n in ((cache, tables, ctx), (cache2, tables2, ctx2))]
    out_w, lse_w = merge_partials(*(x.float() for x in want[0]), *(x.float() for x in want[1]))
    check(merged, (out_w.double(), lse_w.double()), torch.float32)
    assert merged[1][2].isneginf().all() and (merged[0][2] == 0).all()  # no key on either rank: no NaN


def test_torch_reference_ops_match_float64():
    # the base ops every backend falls back to (also what torch_sdpa runs), against the einsum reference
    q, k, v = dense_case(33, 33, (4, 2, 32), torch.float32, seed=50)
    check(dense_attention_lse(q, k, v, True, 0.2), dense_reference(q, k, v, True, 0.2), torch.float32)
    # heads' elements not contiguous (torch's CPU flash kernel misreads those: the op copies them first)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    check(dense_attention_lse(qt, kt, vt, False, 0.2), dense_reference(q, k, v, False, 0.2), torch.float32)
    q, cache, tables, ctx = paged_case([19, 0, 64], (4, 2, 32), 16, torch.float32, seed=51)
    check(paged_attention_lse(q, cache, tables, ctx, 0.2), paged_reference(q, cache, tables, ctx, 0.2),
          torch.float32)


# --- the existing decode paths are unchanged ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_decode_without_lse_unchanged(dtype):
    make_backend("cpu_paged")
    lens = [37, 700, 1, 190]
    q, cache, tables, ctx = paged_case(lens, (4, 2, 64), 16, dtype, seed=60)
    plain = cpu.paged_decode_attention(q, cache, tables, ctx, 0.125)
    assert plain.dtype == dtype
    out, _ = cpu.paged_decode_attention_lse(q, cache, tables, ctx, 0.125)
    assert torch.equal(plain, out.to(dtype))  # the same arithmetic; only the final rounding differs
    rtol, atol, _ = TOLERANCE[dtype]
    torch.testing.assert_close(plain.double(), paged_reference(q, cache, tables, ctx, 0.125)[0],
                               rtol=max(rtol, 8e-3 if dtype == torch.bfloat16 else 0), atol=atol)
    with pytest.raises(IndexError):  # the plain decode path still refuses a row without keys
        cpu.paged_decode_attention(q, cache, tables, torch.tensor([3, 0, 1, 1]), 0.125)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_decode_without_lse_unchanged(dtype):
    make_backend("triton")
    from distinfer.model.kernels import triton_attention as ta

    lens = [37, 700, 0, 190]
    q, cache, tables, ctx = paged_case(lens, (4, 2, 64), 16, dtype, seed=61, device=DEVICE)
    assert ta.decode_num_splits(len(lens), 2, 700, q.device) > 1
    for bound in (700, 64):  # several splits and the merge kernel; then one split (only rows <= 64)
        rows = [0, 2] if bound == 64 else list(range(len(lens)))
        plain = ta.paged_decode_attention(q[rows], cache, tables[rows], ctx[rows], 0.125, bound)
        assert plain.dtype == dtype
        out, lse = ta.paged_decode_attention_lse(q[rows], cache, tables[rows], ctx[rows], 0.125)
        want = paged_reference(q[rows], cache, tables[rows], ctx[rows], 0.125)
        check((out, lse), want, dtype)
        if dtype == torch.float32:
            assert torch.equal(plain, out)
        else:
            torch.testing.assert_close(plain.double().cpu(), want[0], rtol=2e-2, atol=2e-2)
