"""Triton paged attention (CUDA; also runs under TRITON_INTERPRET=1 on CPU tensors, slowly).

Reads K/V in place from the blocks through the block tables, with no per-step gather, mask or
Python list: only the metadata tensors (slot_mapping, block_tables, seq_lens_tensor,
query_start_loc) and the grid bounds max_seq_len / max_query_len, so it works on metadata whose
tensors are persistent CUDA-graph buffers and whose bounds are the capture bounds.
"""
from __future__ import annotations

import torch

from distinfer.model.attention.paged import AttentionBackend, AttentionMetadata
from distinfer.model.kernels import triton_attention as kernels


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
