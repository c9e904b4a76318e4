"""Paged attention: KV cache in fixed-size blocks, plain-torch (SDPA) backend for CPU.

KV cache layout per layer: [num_blocks, block_size, 2, num_kv_heads, head_dim] (K then V per token),
so one block is one contiguous chunk (`cache[block_ids]` moves whole blocks), a step's K/V land
with one index_copy_ and a decode batch's context comes back with one index_select.
Token p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

`AttentionMetadata.build` precomputes every index tensor and mask once per step; each layer
then only writes its new K/V into the slots and runs SDPA:
  * decode rows (query_len == 1) batched: one SDPA call per chunk of rows over block-gathered,
    padded KV with an additive length mask (chunks of a few MiB keep the gathered copy in cache;
    a small batch is one chunk); the query heads sharing a KV head are folded into the
    query-length axis, so GQA needs no KV expansion;
  * prefill rows one SDPA call each: causal on the fresh K/V when nothing is cached before them,
    else over the gathered context with a causal mask shifted by the cached prefix length.
"""
from __future__ import annotations

import abc
import importlib.util
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    """One request computing more than one token this step."""

    start: int  # first row in the flattened batch
    end: int
    context_len: int  # cached prefix + new tokens
    block_ids: torch.Tensor | None  # blocks holding the context; None when there is no cached prefix
    mask: torch.Tensor | None  # additive float32 [q_len, context_len] causal mask shifted by the prefix


@dataclass
class DecodeChunk:
    """Consecutive decode rows attended in one SDPA call."""

    start: int  # index among the decode rows
    end: int
    block_ids: torch.Tensor  # [(end - start) * blocks per row], rows padded with block 0
    kv_len: int  # keys attended: the longest row's context
    mask: torch.Tensor | None  # additive float32 [rows, 1, 1, kv_len]; None when no row is padded


# Gathered K/V per decode chunk: small enough to stay in L2/L3 between the gather and the SDPA.
DECODE_CHUNK_BYTES = 3 << 20


@dataclass
class AttentionMetadata:
    num_tokens: int
    block_size: int
    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor  # [T] long, where each new token's K/V goes
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0 (for other backends)
    seq_lens_tensor: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    max_query_len: int = 1  # bounds for kernel grids; a CUDA graph's metadata holds its capture bounds
    max_seq_len: int = 1
    # decode rows (query_len == 1)
    num_decodes: int = 0
    decode_rows: slice | torch.Tensor | None = None  # token rows: a slice when contiguous
    decode_seq_lens: list[int] = field(default_factory=list)
    decode_tables: torch.Tensor | None = None  # [num_decodes, max blocks] on the CPU
    device: torch.device | str = "cpu"
    _cache: dict = field(default_factory=dict, repr=False)  # per-step derived tensors, shared by layers

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Request i computes query_lens[i] tokens at positions seq_lens[i]-query_lens[i] .. seq_lens[i]-1."""
        _validate(query_lens, seq_lens, block_tables, block_size)
        nblocks = [-(-s // block_size) for s in seq_lens]
        width = max(nblocks, default=1)
        tables = torch.tensor([bt[:n] + [0] * (width - n) for bt, n in zip(block_tables, nblocks)],
                              dtype=torch.long).view(len(seq_lens), width)
        q = torch.tensor(query_lens, dtype=torch.long)
        s = torch.tensor(seq_lens, dtype=torch.long)
        qsl = torch.zeros(len(q) + 1, dtype=torch.long)
        torch.cumsum(q, 0, out=qsl[1:])
        num_tokens = int(qsl[-1])
        req = torch.repeat_interleave(torch.arange(len(q)), q)
        pos = torch.arange(num_tokens) - qsl[:-1][req] + (s - q)[req]
        slots = tables[req, pos // block_size] * block_size + pos % block_size
        md = cls(num_tokens=num_tokens, block_size=block_size, query_lens=list(query_lens),
                 seq_lens=list(seq_lens), slot_mapping=slots.to(device), block_tables=tables.to(device),
                 seq_lens_tensor=s.to(device=device, dtype=torch.int32),
                 query_start_loc=qsl.to(device=device, dtype=torch.int32), device=device,
                 max_query_len=max(query_lens, default=1), max_seq_len=max(seq_lens, default=1))
        md._build_decodes(qsl.tolist(), tables, nblocks, device)
        md._cache["prefill_inputs"] = (qsl.tolist(), tables, nblocks)  # prefills are built on first use
        return md

    def _build_decodes(self, qsl: list[int], tables: torch.Tensor, nblocks: list[int], device) -> None:
        idx = [i for i, n in enumerate(self.query_lens) if n == 1]
        if not idx:
            return
        rows = [qsl[i] for i in idx]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self.decode_rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=device)
        self.num_decodes = len(idx)
        self.decode_seq_lens = [self.seq_lens[i] for i in idx]
        self.decode_tables = tables[torch.tensor(idx)][:, : max(nblocks[i] for i in idx)]

    def decode_chunks(self, max_rows: int) -> list[DecodeChunk]:
        """The decode rows cut into chunks of at most `max_rows`; built once per step."""
        key = ("chunks", max_rows)
        if key not in self._cache:
            n = self.num_decodes
            self._cache[key] = [self._decode_chunk(a, min(a + max_rows, n)) for a in range(0, n, max_rows)]
        return self._cache[key]

    def _decode_chunk(self, start: int, end: int) -> DecodeChunk:
        lens = self.decode_seq_lens[start:end]
        kv_len = max(lens)
        block_ids = self.decode_tables[start:end, : -(-kv_len // self.block_size)].reshape(-1)
        mask = None
        if min(lens) != kv_len:
            valid = torch.arange(kv_len)[None, :] < torch.tensor(lens)[:, None]
            mask = _additive(valid).view(end - start, 1, 1, kv_len).to(self.device)
        return DecodeChunk(start, end, block_ids.to(self.device), kv_len, mask)

    @property
    def prefills(self) -> list[PrefillSeq]:
        """Rows computing more than one token, with the gathered-context masks the torch backends use; built
        on first use, once per step (the Triton backend never asks: it reads only the metadata tensors)."""
        if "prefills" not in self._cache:
            self._cache["prefills"] = self._build_prefills(*self._cache.get("prefill_inputs", ([], None, [])))
        return self._cache["prefills"]

    def _build_prefills(self, qsl: list[int], tables: torch.Tensor, nblocks: list[int]) -> list[PrefillSeq]:
        prefills = []
        for i, (q, s) in enumerate(zip(self.query_lens, self.seq_lens)):
            if q == 1:
                continue
            block_ids = mask = None
            if s > q:  # cached prefix: attend over the gathered context with a shifted causal mask
                block_ids = tables[i, : nblocks[i]].to(self.device)
                valid = torch.ones(q, s, dtype=torch.bool).tril(diagonal=s - q)
                mask = _additive(valid).to(self.device)
            prefills.append(PrefillSeq(qsl[i], qsl[i + 1], s, block_ids, mask))
        return prefills

    def mask_as(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`mask` converted to the query dtype, converted once per step and reused by every layer."""
        if mask.dtype == dtype:
            return mask
        key = (id(mask), dtype)
        if key not in self._cache:
            self._cache[key] = mask.to(dtype)
        return self._cache[key]

    @property
    def is_pure_decode(self) -> bool:
        return self.num_decodes == len(self.query_lens)


def _additive(valid: torch.Tensor) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=torch.float32).masked_fill_(~valid, float("-inf"))


def _validate(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int) -> None:
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError(f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and block_tables "
                         f"({len(block_tables)}) must have one entry per request")
    for i, (q, s, bt) in enumerate(zip(query_lens, seq_lens, block_tables)):
        if not 1 <= q <= s:
            raise ValueError(f"request {i}: need 1 <= query_len ({q}) <= seq_len ({s})")
        if len(bt) * block_size < s:
            raise ValueError(f"request {i}: {len(bt)} blocks of {block_size} cannot hold {s} tokens")


def write_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's K/V [T, 2, Hkv, D] into their slots."""
    nb, bs, _, h, d = kv_cache.shape
    kv_cache.view(nb * bs, 2, h, d).index_copy_(0, slot_mapping, kv)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, batch: int, length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [batch, Hkv, length, D] (strided views) of `batch` rows of equally many blocks."""
    nb, _, _, h, d = kv_cache.shape
    # index_select over 2-D rows (one row = one block) is a plain memcpy per block: ~4x faster than 5-D
    kv = kv_cache.view(nb, -1).index_select(0, block_ids).view(batch, -1, 2, h, d)[:, :length]
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


class AttentionBackend(abc.ABC):
    """Computes attention for a step's flattened tokens given the paged cache. The two `*_with_lse` ops are
    the pieces sequence parallelism (model/attention/ring.py) merges across ranks: each returns the output in
    float32 and the log-sum-exp of the scaled scores per row and head (float32; -inf and a zero output for a
    row with no key), so partial results over disjoint key sets merge exactly (`merge_partials`)."""

    name: str = ""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [T, Hq, D] and kv [T, 2, Hkv, D] of this step's tokens -> [T, Hq, D]."""

    def dense_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, Hq, D] over contiguous k, v [m, Hkv, D] (Hq a multiple of Hkv); `causal` (n == m): row i sees
        keys 0..i. -> (out [n, Hq, D] float32, lse [n, Hq] float32)."""
        return dense_attention_lse(q, k, v, causal, scale)

    def paged_with_lse(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i of q [B, Hq, D] over the first context_lens[i] (int64, may be 0) tokens of its blocks
        block_tables[i] (int64 [B, W]), no mask -> (out [B, Hq, D] float32, lse [B, Hq] float32)."""
        return paged_attention_lse(q, kv_cache, block_tables, context_lens, scale)


class TorchSDPABackend(AttentionBackend):
    name = "torch_sdpa"

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                scale: float) -> torch.Tensor:
        self._write(kv_cache, kv, md)
        if md.is_pure_decode:
            return self._decode(q, kv_cache, md, scale)
        if md.num_decodes == 0 and len(md.prefills) == 1:
            return self._prefill(q, kv, kv_cache, md, md.prefills[0], scale)
        out = torch.empty_like(q)
        if md.num_decodes:
            rows = md.decode_rows
            if isinstance(rows, slice):
                out[rows] = self._decode(q[rows], kv_cache, md, scale)
            else:
                out.index_copy_(0, rows, self._decode(q.index_select(0, rows), kv_cache, md, scale))
        for p in md.prefills:
            out[p.start:p.end] = self._prefill(q, kv, kv_cache, md, p, scale)
        return out

    @staticmethod
    def _write(kv_cache: torch.Tensor, kv: torch.Tensor, md: AttentionMetadata) -> None:
        write_kv(kv_cache, kv, md.slot_mapping)

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [B, Hq, D] of the decode rows -> [B, Hq, D]."""
        b, hq, d = q.shape
        hkv = kv_cache.shape[3]
        qg = q.reshape(b, hkv, hq // hkv, d)  # the heads sharing a KV head act as query rows
        row_bytes = md.decode_tables.shape[1] * kv_cache[0].numel() * kv_cache.element_size()
        chunks = md.decode_chunks(max(1, DECODE_CHUNK_BYTES // row_bytes))
        if len(chunks) == 1:
            return TorchSDPABackend._decode_chunk(qg, kv_cache, md, chunks[0], scale).reshape(b, hq, d)
        out = torch.empty_like(qg)
        for c in chunks:
            out[c.start:c.end] = TorchSDPABackend._decode_chunk(qg[c.start:c.end], kv_cache, md, c, scale)
        return out.view(b, hq, d)

    @staticmethod
    def _decode_chunk(qg: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, c: DecodeChunk,
                      scale: float) -> torch.Tensor:
        k, v = gather_kv(kv_cache, c.block_ids, c.end - c.start, c.kv_len)
        mask = None
        if c.mask is not None:
            mask = md.mask_as(c.mask, qg.dtype)
            # A row's slots past its length are masked, but a freed block keeps what its last owner wrote
            # (NaN from a request that failed on non-finite values), and a NaN key or value gives NaN
            # even at weight 0: zero them in the gathered copy (never in the cache).
            padded = c.mask.isinf().view(c.end - c.start, 1, c.kv_len, 1)
            k.masked_fill_(padded, 0)
            v.masked_fill_(padded, 0)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def _prefill(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                 p: PrefillSeq, scale: float) -> torch.Tensor:
        """One prefill row's queries q[p.start:p.end] -> [q_len, Hq, D]."""
        qi = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if p.block_ids is None:
            ki = kv[p.start:p.end, 0].transpose(0, 1).unsqueeze(0)
            vi = kv[p.start:p.end, 1].transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ki, vi = gather_kv(kv_cache, p.block_ids, 1, p.context_len)
            mask = md.mask_as(p.mask, q.dtype)
            out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)


def dense_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionBackend.dense_with_lse in torch ops (float32 math; the CPU flash kernel where it exists)."""
    n, hq, d = q.shape
    if n == 0 or k.shape[0] == 0:
        return q.new_zeros(n, hq, d, dtype=torch.float32), q.new_full((n, hq), float("-inf"), dtype=torch.float32)
    group = hq // k.shape[1]
    # the CPU flash kernel needs each head's elements contiguous (wrong results otherwise, torch 2.13)
    qi, ki, vi = ((t.float() if t.stride(-1) == 1 else t.float().contiguous()).transpose(0, 1).unsqueeze(0)
                  for t in (q, k, v))
    if group > 1:
        ki, vi = ki.repeat_interleave(group, dim=1), vi.repeat_interleave(group, dim=1)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qi, ki, vi, 0.0, causal, scale=scale)
    else:
        scores = (qi @ ki.transpose(-1, -2)) * scale
        if causal:
            scores.masked_fill_(torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.softmax(scores, dim=-1) @ vi
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def paged_attention_lse(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionBackend.paged_with_lse in torch ops: one gather and dense_attention_lse per row."""
    b, hq, d = q.shape
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq), float("-inf"), dtype=torch.float32, device=q.device)
    bs = kv_cache.shape[1]
    for row, n in enumerate(context_lens.tolist()):
        if n > 0:
            k, v = gather_kv(kv_cache, block_tables[row, : -(-n // bs)], 1, n)
            out[row], lse[row] = (t[0] for t in dense_attention_lse(q[row:row + 1], k[0].transpose(0, 1),
                                                                     v[0].transpose(0, 1), False, scale))
    return out, lse


def merge_partials(out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor,
                   other_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results (float32): weights
    exp(lse_i - lse) per row and head; a side with no key (-inf) weighs 0."""
    merged = torch.logaddexp(lse, other_lse)
    safe = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)
    weight, other_weight = torch.exp(lse - safe).unsqueeze(-1), torch.exp(other_lse - safe).unsqueeze(-1)
    return out * weight + other_out * other_weight, merged


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for `name` on `device`. "auto": triton on CUDA (torch_sdpa when Triton is not
    installed), on the CPU the fused C kernels where they compile, else torch_sdpa."""
    from distinfer.config import ATTENTION_BACKENDS

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda:
            return "triton" if importlib.util.find_spec("triton") is not None else "torch_sdpa"
        from distinfer.model.kernels import cpu

        return "cpu_paged" if cpu.load() is not None else "torch_sdpa"
    if name == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1, which runs "
                         "its kernels interpreted on the CPU, for tests)")
    if name == "cpu_paged" and on_cuda:
        raise ValueError("the cpu_paged attention backend runs on the CPU only; use triton or torch_sdpa on CUDA")
    return name


def get_attention_backend(name: str) -> AttentionBackend:
    """A backend instance by concrete name (see resolve_attention_backend)."""
    if name == "triton":
        from distinfer.model.attention.triton import TritonBackend

        return TritonBackend()
    if name == "cpu_paged":
        from distinfer.model.attention.cpu_paged import CPUPagedBackend

        return CPUPagedBackend()
    if name == "torch_sdpa":
        return TorchSDPABackend()
    raise ValueError(f"Unknown attention backend {name!r}; resolve 'auto' with resolve_attention_backend first")


def make_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One layer's cache [num_blocks, block_size, 2, Hkv, D], zero-filled so padded (masked) slots
    never hold NaN."""
    return torch.zeros(num_blocks, block_size, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
