"""Triton attention over contiguous (dense) q/k/v with the log-sum-exp: the per-chunk op of ring attention.

`dense_attention_lse`: q [n, Hq, D] over k, v [m, Hkv, D] (any strides), causal (n == m: row i sees keys
0..i) or not -> (out [n, Hq, D] float32, lse [n, Hq] float32, natural log of sum exp(scale * q.k)). One
program per (query tile, KV head) as in the paged prefill kernel (triton_attention.py): the tile's tokens x
the group's query heads flattened into the dot's M rows, flash-attention online softmax over key tiles up
to the tile's causal limit, in base 2 (scores scaled by scale * log2(e)). Every row of a tile sees key 0 in
the first key tile (m >= 1 is checked on the host), so the running max is finite from the first tile on.
Runs on CUDA and under TRITON_INTERPRET=1 on CPU tensors, like the paged kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from distinfer.model.kernels.triton_attention import (
    LOG2E,
    _dot,
    _dot_options,
    _lse,
    _prefill_config,
)


@triton.jit
def _dense_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, n_q, n_k, scale_log2,
                  s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd, s_ot, s_oh, s_od,
                  HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, CAUSAL: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
    # BLOCK_Q = BLOCK_M // G_PAD query tokens per tile; row r is (token r // G_PAD, head r % G_PAD)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    tok = tile * BLOCK_Q + offs_m // G_PAD
    g = offs_m % G_PAD
    heads = h * G + g
    row_mask = (tok < n_q) & (g < G)
    d_mask = offs_d < D
    tok64 = tok.to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * s_qt + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if CAUSAL:  # n_q == n_k: the tile's last token sees keys up to its own position
        kv_end = tl.minimum((tile + 1) * BLOCK_Q, n_k)
    else:
        kv_end = n_k
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for k0 in range(0, kv_end, BLOCK_N):
        kpos = k0 + offs_n
        k_mask = kpos < kv_end
        kpos64 = kpos.to(tl.int64)
        kt = tl.load(k_ptr + kpos64[None, :] * s_kt + h * s_kh + offs_d[:, None] * s_kd,
                     mask=k_mask[None, :] & d_mask[:, None], other=0.0)  # [D_PAD, BLOCK_N]
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        visible = k_mask[None, :]
        if CAUSAL:
            visible = visible & (kpos[None, :] <= tok[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row in the first tile
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kpos64[:, None] * s_vt + h * s_vh + offs_d[None, :] * s_vd,
                    mask=k_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64[:, None] * s_ot + heads[:, None] * s_oh + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + tok64 * HQ + heads, _lse(m_i, l_i), mask=row_mask)


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)} "
                         "([n, Hq, D] over [m, Hkv, D], Hq a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype}")
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"causal dense attention needs as many queries as keys, got {q.shape[0]} and {k.shape[0]}")


def dense_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionBackend.dense_with_lse on Triton: (out [n, Hq, D] float32, lse [n, Hq] float32); zeros and
    -inf when there is no query or no key."""
    _check_dense(q, k, v, causal)
    n, hq, d = q.shape
    m, hkv, _ = k.shape
    if n == 0 or m == 0:
        return (torch.zeros(n, hq, d, dtype=torch.float32, device=q.device),
                torch.full((n, hq), float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, hq, dtype=torch.float32, device=q.device)
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    d_pad = max(16, triton.next_power_of_2(d))  # 16: the smallest tl.dot
    prec, upcast = _dot_options(q.dtype)
    block_m, block_n, warps = _prefill_config(q.dtype, d_pad, g_pad)
    grid = (triton.cdiv(n, block_m // g_pad), hkv)
    _dense_kernel[grid](
        q, k, v, out, lse, n, m, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        HQ=hq, G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_Q=block_m // g_pad,
        CAUSAL=causal, PREC=prec, UPCAST=upcast, num_warps=warps, enable_fp_fusion=True)
    return out, lse


__all__ = ["dense_attention_lse"]
