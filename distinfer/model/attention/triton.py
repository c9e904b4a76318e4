"""Triton paged attention (CUDA; also runs under TRITON_INTERPRET=1 on CPU tensors, slowly).

Reads K/V in place from the blocks through the block tables, with no per-step gather, mask or
Python list: only the metadata tensors (slot_mapping, block_tables, seq_lens_tensor,
query_start_loc) and the grid bounds max_seq_len / max_query_len, so it works on metadata whose
tensors are persistent CUDA-graph buffers and whose bounds are the capture bounds. The `*_with_lse`
ops (sequence parallelism's partials) run the decode kernel writing LSE and float32 out, and a dense
flash-attention kernel over contiguous q/k/v (kernels/triton_dense_attention.py).
"""
from __future__ import annotations

import torch

from distinfer.model.attention.paged import AttentionBackend, AttentionMetadata
from distinfer.model.kernels import triton_attention as kernels
from distinfer.model.kernels import triton_dense_attention as dense_kernels


class TritonBackend(AttentionBackend):
    name = "triton"

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                scale: float) -> torch.Tensor:
        kernels.write_kv(kv_cache, kv, md.slot_mapping)
        if md.is_pure_decode:  # one token per row: T == B
            return kernels.paged_decode_attention(q, kv_cache, md.block_tables, md.seq_lens_tensor, scale,
                                                  md.max_seq_len)
        return kernels.paged_prefill_attention(q, kv_cache, md.block_tables, md.query_start_loc,
                                               md.seq_lens_tensor, scale, md.max_query_len)

    def dense_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return dense_kernels.dense_attention_lse(q, k, v, causal, scale)

    def paged_with_lse(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.paged_decode_attention_lse(q, kv_cache, block_tables, context_lens, scale)
