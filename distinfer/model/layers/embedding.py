"""Vocabulary-parallel token embedding and LM head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distinfer.distributed.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from distinfer.distributed.parallel_state import get_tp_rank, get_tp_world_size
from distinfer.model.layers.linear import linear
from distinfer.model.layers.weight_utils import Loaded, copy_into, narrow_checked, set_weight_loader


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over TP ranks in contiguous ranges of ceil(vocab / tp) ids.

    A rank looks up the ids in its range, zeroes the others, and the all-reduce sums the parts."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        weight = torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype)
        self.weight = set_weight_loader(nn.Parameter(weight, requires_grad=False), self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded: Loaded, shard_id: object = None) -> None:
        rows = self.vocab_end - self.vocab_start
        copy_into(param.data[:rows], narrow_checked(loaded, 0, self.num_embeddings, self.vocab_start, rows))
        param.data[rows:].zero_()  # padding rows of the last shard

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_range
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding; `tie_weights` shares the embedding's tensor."""

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], gathered over the TP group."""
        logits = linear(hidden_states, self.weight)
        if self.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits, dim=-1)[:, : self.num_embeddings]
        return logits.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden_states)
