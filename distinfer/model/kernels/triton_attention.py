"""Triton paged-attention kernels: KV write, split-K decode and causal prefill over the block tables.

Cache layout per layer: [num_blocks, block_size, 2, Hkv, D] contiguous, so token slot `s` (block *
block_size + offset) holds its K at element s * 2*Hkv*D + h*D and its V Hkv*D further. Every kernel
reads K/V in place through the block table (no gather copy) and never touches a slot at or past a
row's seq_len (those may hold anything, NaN included).

  * `write_kv`: one program per token; slot < 0 (a padding row) writes nothing.
  * `paged_decode_attention`: one program per (row, KV head, split) serves the Hq/Hkv query heads of
    its group as the rows of a tl.dot (group padded to >= 16, the smallest dot: free on tensor cores,
    and decode is bound by reading K/V). Splits (flash-decoding): num_splits = min(cdiv(max_seq_len,
    MIN_SPLIT_TOKENS), cdiv(PROGRAMS_PER_SM * SMs, B * Hkv), MAX_SPLITS), a function of (B, Hkv,
    max_seq_len) only, so a CUDA graph captured at a max_seq_len bound replays for any lengths; each
    row cuts its own seq_len into num_splits tile-aligned parts and splits past its end exit at once
    (results never depend on max_seq_len, only the parallelism does). With more than one split a
    second kernel merges the (max, sum, accumulator) partials with the log-sum-exp rule. With an `lse`
    tensor (constexpr WRITE_LSE) the kernel writing the output also writes the row's log-sum-exp
    (`paged_decode_attention_lse`: float32 out, for sequence parallelism's merges).
  * `paged_prefill_attention`: one program per (query tile, row, KV head), the tile's tokens x the
    group's heads flattened into the dot's M rows; flash-attention online softmax over key tiles up to
    the tile's causal limit.

Inputs float32 / bfloat16 / float16, accumulation float32; float32 dots use input_precision="ieee"
(exact fp32 on CUDA, never TF32). Runs under TRITON_INTERPRET=1 on CPU tensors, where bfloat16 dot
operands are widened to float32 first (the interpreter multiplies bfloat16 as raw integers); the
products are the same, bfloat16 x bfloat16 being exact in float32.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # a decode split covers at least this many keys of the longest row
MAX_SPLITS = 16
PROGRAMS_PER_SM = 4  # decode splits until the grid has about this many programs per SM
CPU_SMS = 16  # stand-in SM count off CUDA (the interpreter)
_TL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _lse(m, l_sum):
    """Natural log-sum-exp from a base-2 running max `m` and sum `l_sum` of exp2(s - m); -inf where the sum is 0
    (no key)."""
    log2_sum = tl.log2(tl.where(l_sum > 0, l_sum, 1.0))
    return tl.where(l_sum > 0, (m + log2_sum) * 0.6931471805599453, float("-inf"))  # * ln(2)


@triton.jit
def _write_kv_kernel(kv_ptr, cache_ptr, slot_ptr, s_t, s_c, s_h, s_d,
                     HKV: tl.constexpr, D: tl.constexpr, HD_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, HD_PAD)
    mask = offs < HKV * D
    src = kv_ptr + t.to(tl.int64) * s_t + (offs // D) * s_h + (offs % D) * s_d
    dst = cache_ptr + slot * (2 * HKV * D) + offs
    for c in tl.static_range(2):
        x = tl.load(src + c * s_c, mask=mask)
        tl.store(dst + c * HKV * D, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, lse_ptr, scale_log2,
                   s_qb, s_qh, s_qd, s_btb, s_btw, s_ob, s_oh, s_od,
                   HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                   D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, WRITE_LSE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE) * TILE  # tile-aligned; 0 when seq_len == 0
    start = split * split_len
    if NUM_SPLITS > 1:  # noqa: SIM102 (compile-time branch: one split must still write a seq_len 0 row)
        if start >= seq_len:  # past this row's end (or a padding row): the merge skips this split
            return
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, TILE)
    g_mask = offs_g < G
    d_mask = offs_d < D
    heads = h * G + offs_g
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptr = cache_ptr + h * D
    v_ptr = k_ptr + HKV * D
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t0 in range(start, end, TILE):
        t = t0 + offs_n
        t_mask = t < end
        block = tl.load(bt_ptr + b64 * s_btb + (t // BLOCK_SIZE) * s_btw, mask=t_mask, other=0)
        slot_off = (block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * (2 * HKV * D)
        kt = tl.load(k_ptr + slot_off[None, :] + offs_d[:, None], mask=t_mask[None, :] & d_mask[:, None],
                     other=0.0)  # [D_PAD, TILE]
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot_off[:, None] + offs_d[None, :], mask=t_mask[:, None] & d_mask[None, :],
                    other=0.0)  # [TILE, D_PAD]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    if NUM_SPLITS == 1:  # l_i == 0 only for a seq_len 0 row: zeros, not 0/0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * s_ob + heads[:, None] * s_oh + offs_d[None, :] * s_od,
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        if WRITE_LSE:  # lse [B, Hq] contiguous
            tl.store(lse_ptr + b64 * (HKV * G) + heads, _lse(m_i, l_i), mask=g_mask)
    else:  # partials [B, Hq, NUM_SPLITS, D_PAD] and [B, Hq, NUM_SPLITS, 2] (max, sum)
        row = (b64 * (HKV * G) + heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_merge_kernel(part_acc_ptr, part_ml_ptr, lens_ptr, out_ptr, lse_ptr, s_ob, s_oh, s_od,
                         HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, WRITE_LSE: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE) * TILE  # as in _decode_kernel
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    valid = (offs_s < NUM_SPLITS) & (offs_s * split_len < seq_len)  # none for a seq_len 0 row
    row = (b.to(tl.int64) * HQ + hq) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=valid, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(valid, tl.exp2(m - tl.where(valid, m_max, 0.0)), 0.0)  # no -inf - -inf
    denom = tl.sum(w * l_s, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * D_PAD + offs_d[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + hq * s_oh + offs_d * s_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < D)
    if WRITE_LSE:
        tl.store(lse_ptr + b.to(tl.int64) * HQ + hq, _lse(m_max, denom))


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, bt_ptr, qsl_ptr, lens_ptr, out_ptr, scale_log2,
                    s_qt, s_qh, s_qd, s_btb, s_btw, s_ot, s_oh, s_od,
                    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # BLOCK_Q = BLOCK_M // G_PAD query tokens per tile; row r is (token r // G_PAD, head r % G_PAD)
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(lens_ptr + b).to(tl.int32) - q_len  # cached prefix; token i sits at position ctx + i
    kv_end = ctx + tl.minimum((tile + 1) * BLOCK_Q, q_len)  # causal limit of the tile's last token

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    tok = tile * BLOCK_Q + offs_m // G_PAD
    g = offs_m % G_PAD
    heads = h * G + g
    row_mask = (tok < q_len) & (g < G)
    d_mask = offs_d < D
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    pos = ctx + tok
    bt_row = bt_ptr + b.to(tl.int64) * s_btb
    k_ptr = cache_ptr + h * D
    v_ptr = k_ptr + HKV * D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for k0 in range(0, kv_end, BLOCK_N):
        kpos = k0 + offs_n
        k_mask = kpos < kv_end
        block = tl.load(bt_row + (kpos // BLOCK_SIZE) * s_btw, mask=k_mask, other=0)
        slot_off = (block.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE) * (2 * HKV * D)
        kt = tl.load(k_ptr + slot_off[None, :] + offs_d[:, None], mask=k_mask[None, :] & d_mask[:, None],
                     other=0.0)  # [D_PAD, BLOCK_N]
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        s = tl.where((kpos[None, :] <= pos[:, None]) & k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot_off[:, None] + offs_d[None, :], mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * s_ot + heads[:, None] * s_oh + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, widen-to-float32) for tl.dot on `dtype` operands."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"Triton attention takes float32/bfloat16/float16, got {dtype}")
    return ("ieee" if dtype == torch.float32 else "tf32"), (dtype == torch.bfloat16 and _interpreted())


def _check_cache(kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, Hkv, D) of a contiguous [num_blocks, block_size, 2, Hkv, D] cache."""
    if kv_cache.dim() != 5 or kv_cache.shape[2] != 2 or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be a contiguous [blocks, block_size, 2, Hkv, D] tensor, got "
                         f"{tuple(kv_cache.shape)} with strides {kv_cache.stride()}")
    return kv_cache.shape[1], kv_cache.shape[3], kv_cache.shape[4]


def _check_query(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(block_size, Hkv, D, padded D) for q [N, Hq, D] against the cache."""
    block_size, hkv, d = _check_cache(kv_cache)
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] % hkv or q.dtype != kv_cache.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit a cache of {hkv} KV heads of size {d} "
                         f"({kv_cache.dtype})")
    return block_size, hkv, d, max(16, triton.next_power_of_2(d))  # 16: the smallest tl.dot


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SMS


def decode_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per (row, KV head): enough programs to fill the GPU, none shorter than MIN_SPLIT_TOKENS
    at max_seq_len. Depends only on its arguments (the grid of a CUDA graph is fixed at capture)."""
    by_length = triton.cdiv(max(max_seq_len, 1), MIN_SPLIT_TOKENS)
    by_occupancy = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), max(batch * num_kv_heads, 1))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def write_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V [T, 2, Hkv, D] (any strides) into their cache slots; slot < 0 skips the row."""
    _, hkv, d = _check_cache(kv_cache)
    t = kv.shape[0]
    if t == 0:
        return
    _write_kv_kernel[(t,)](kv, kv_cache, slot_mapping, *kv.stride(), HKV=hkv, D=d,
                           HD_PAD=triton.next_power_of_2(hkv * d), num_warps=4, enable_fp_fusion=True)


def _decode_config(dtype: torch.dtype, d_pad: int) -> tuple[int, int]:
    """(TILE keys per step, num_warps): no register spills on sm_90 with Triton 3.6 and 3.9."""
    if dtype == torch.float32:  # CUDA-core FMA dots
        return 32, (4 if d_pad <= 128 else 8)
    return (64 if d_pad <= 128 else 32), 4


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row: q [B, Hq, D] over the row's first seq_lens[b] cached keys -> [B, Hq, D].
    `max_seq_len` bounds seq_lens (sets the grid); a seq_len 0 row gives zeros. With `lse` (contiguous
    float32 [B, Hq]) the natural log-sum-exp of the scaled scores is written there too (-inf for seq_len 0)."""
    block_size, hkv, d, d_pad = _check_query(q, kv_cache)
    batch, hq, _ = q.shape
    if out is None:
        out = torch.empty(batch, hq, d, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    g = hq // hkv
    prec, upcast = _dot_options(q.dtype)
    tile, warps = _decode_config(q.dtype, d_pad)
    splits = decode_num_splits(batch, hkv, max_seq_len, q.device)
    write_lse = lse is not None
    if write_lse:
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == (batch, hq)
    else:
        lse = out  # unused
    part_acc = part_ml = out  # unused with one split
    if splits > 1:
        part_acc = torch.empty(batch, hq, splits, d_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(batch, hq, splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, hkv, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_acc, part_ml, lse, scale * LOG2E,
        *q.stride(), *block_tables.stride(), *out.stride(),
        HKV=hkv, G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=d_pad, BLOCK_SIZE=block_size,
        TILE=tile, NUM_SPLITS=splits, PREC=prec, UPCAST=upcast, WRITE_LSE=write_lse, num_warps=warps,
        enable_fp_fusion=True)
    if splits > 1:
        _decode_merge_kernel[(batch, hq)](
            part_acc, part_ml, seq_lens, out, lse, *out.stride(), HQ=hq, D=d, D_PAD=d_pad, TILE=tile,
            NUM_SPLITS=splits, S_PAD=triton.next_power_of_2(splits), WRITE_LSE=write_lse, num_warps=4,
            enable_fp_fusion=True)
    return out


def paged_decode_attention_lse(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionBackend.paged_with_lse: the decode kernel with float32 out and LSE; context_lens may be 0.
    Reads max(context_lens) on the host for the grid (one sync; not for CUDA-graph capture)."""
    batch, hq, d = q.shape
    out = torch.empty(batch, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    max_len = int(context_lens.max()) if batch else 0
    paged_decode_attention(q, kv_cache, block_tables, context_lens, scale, max_len, out=out, lse=lse)
    return out, lse


def _prefill_config(dtype: torch.dtype, d_pad: int, g_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M rows = tokens x padded group, BLOCK_N keys, num_warps)."""
    if dtype == torch.float32:  # CUDA-core FMA dots: small tiles, 8 warps keep them in registers
        block_m, block_n, warps = (64 if d_pad <= 128 else 32), 32, 8
    elif d_pad <= 128:
        block_m, block_n, warps = 128, 64, 8
    else:
        block_m, block_n, warps = 64, 32, 8
    return max(block_m, g_pad), block_n, warps


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            max_query_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of any batch: row b's tokens q[qsl[b]:qsl[b+1]] (q [T, Hq, D]) sit at positions
    seq_lens[b] - q_len + i and see the cached keys up to their own -> [T, Hq, D]. The step's K/V must
    already be in the cache; `max_query_len` bounds the rows' query lengths (sets the grid)."""
    block_size, hkv, d, d_pad = _check_query(q, kv_cache)
    tokens, hq, _ = q.shape
    if out is None:
        out = torch.empty(tokens, hq, d, dtype=q.dtype, device=q.device)
    batch = query_start_loc.shape[0] - 1
    if tokens == 0 or batch <= 0:
        return out
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    prec, upcast = _dot_options(q.dtype)
    block_m, block_n, warps = _prefill_config(q.dtype, d_pad, g_pad)
    grid = (triton.cdiv(max(max_query_len, 1), block_m // g_pad), batch, hkv)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out, scale * LOG2E,
        *q.stride(), *block_tables.stride(), *out.stride(),
        HKV=hkv, G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_Q=block_m // g_pad, PREC=prec, UPCAST=upcast, num_warps=warps,
        enable_fp_fusion=True)
    return out


__all__ = ["decode_num_splits", "paged_decode_attention", "paged_decode_attention_lse", "paged_prefill_attention",
           "write_kv"]
