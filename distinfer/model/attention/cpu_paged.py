"""CPU paged attention on the fused kernels: decode rows read K/V in place from the blocks.

Same results as `TorchSDPABackend` (to float32 rounding) without its per-step block gather: the
step's K/V land in their slots with one memcpy per token and each decode row's keys are read from
its blocks directly. Prefill rows keep SDPA (compute-bound, where SDPA's blocking pays). Tensors the
kernels do not take (not float32/bfloat16, not on the CPU) go through the parent backend's torch ops.
`paged_with_lse` (sequence parallelism's partials) runs on the same decode kernel; `dense_with_lse`
stays the base one (torch's CPU flash kernel returns the LSE).
"""
from __future__ import annotations

import torch

from distinfer.model.attention.paged import AttentionMetadata, TorchSDPABackend
from distinfer.model.kernels import cpu


class CPUPagedBackend(TorchSDPABackend):
    name = "cpu_paged"

    @staticmethod
    def _write(kv_cache: torch.Tensor, kv: torch.Tensor, md: AttentionMetadata) -> None:
        if cpu.enabled_for(kv, kv_cache):
            cpu.write_kv(kv_cache, kv, md.slot_mapping)
        else:
            TorchSDPABackend._write(kv_cache, kv, md)

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        if not cpu.enabled_for(q, kv_cache):
            return TorchSDPABackend._decode(q, kv_cache, md, scale)
        tables, lens = decode_inputs(md)
        return cpu.paged_decode_attention(q, kv_cache, tables, lens, scale)

    def paged_with_lse(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decode kernel reading K/V in place (float32 out and LSE); the torch reference for
        inputs it does not take."""
        if not cpu.decode_lse_applies(q, kv_cache):
            return super().paged_with_lse(q, kv_cache, block_tables, context_lens, scale)
        return cpu.paged_decode_attention_lse(q, kv_cache, block_tables, context_lens, scale)


def decode_inputs(md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """(contiguous int64 block tables, int64 context lengths) of the decode rows, built once per step."""
    if "cpu_decode" not in md._cache:
        md._cache["cpu_decode"] = (md.decode_tables.contiguous(),
                                   torch.tensor(md.decode_seq_lens, dtype=torch.int64))
    return md._cache["cpu_decode"]
