"""Re-sharding a request's KV blocks between instances of different tensor / pipeline parallel sizes
(worker/kv_transfer.py `reshard`), on random tensors shaped like the tiny distributed test model's cache
(4 layers, 2 KV heads of 16 dims): every destination rank gets exactly its layers and heads of the same
global cache, replicated heads (tp=4 > 2 KV heads) included, and moving there and back is bit-identical."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distinfer.model.llama import pp_layer_range
from distinfer.worker.kv_transfer import KVLayout, KVShard, check_export, reshard

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 4, 2, 16, 8, torch.float32
NUM_BLOCKS = 3


def layouts(tp: int, pp: int, partition: tuple[int, ...] | None = None, heads: int = HEADS) -> list[KVLayout]:
    """The layout of every rank of a tp x pp instance, in rank order (rank = pp_rank * tp + tp_rank), as the
    model splits it: contiguous layer ranges per stage; KV heads split over tp, or one replicated head per
    rank when tp > heads."""
    out = []
    for pp_rank in range(pp):
        start, end = pp_layer_range(LAYERS, pp_rank, pp, partition)
        for tp_rank in range(tp):
            per_rank = max(heads // tp, 1)
            first = tp_rank // max(tp // heads, 1) * per_rank
            out.append(KVLayout(start, end - start, first, per_rank, LAYERS, heads, HEAD_DIM, BLOCK_SIZE, DTYPE))
    return out


def full_cache(seed: int = 0, heads: int = HEADS) -> list[torch.Tensor]:
    """The whole model's KV for NUM_BLOCKS blocks: one [blocks, block_size, 2, heads, head_dim] per layer."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(NUM_BLOCKS, BLOCK_SIZE, 2, heads, HEAD_DIM, generator=gen) for _ in range(LAYERS)]


def rank_tensors(full: list[torch.Tensor], layout: KVLayout) -> list[torch.Tensor]:
    """What a rank with `layout` holds of the whole cache."""
    heads = slice(layout.first_head, layout.first_head + layout.num_heads)
    return [full[layer][:, :, :, heads].clone()
            for layer in range(layout.first_layer, layout.first_layer + layout.num_layers)]


def export(full: list[torch.Tensor], source: list[KVLayout]) -> list[KVShard]:
    return [KVShard(layout, rank_tensors(full, layout)) for layout in source]


CONFIGS = {"tp1": (1, 1, None), "tp2": (2, 1, None), "tp4": (4, 1, None), "pp2": (1, 2, None),
           "pp2-uneven": (1, 2, (3, 1)), "tp2xpp2": (2, 2, None), "tp4xpp2": (4, 2, None)}
PAIRS = [("tp1", "tp2"), ("tp2", "tp1"), ("tp1", "pp2"), ("pp2", "tp1"), ("tp2xpp2", "tp1"), ("tp1", "tp2xpp2"),
         ("pp2-uneven", "tp2"), ("pp2-uneven", "pp2"), ("tp2", "tp2xpp2"), ("tp1", "tp4"), ("tp4", "tp1"),
         ("tp4", "tp2"), ("tp4xpp2", "pp2-uneven"), ("tp2xpp2", "tp4")]


@pytest.mark.parametrize("src, dst", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_destination_rank_gets_exactly_its_layers_and_heads(src, dst):
    source, destination = layouts(*CONFIGS[src]), layouts(*CONFIGS[dst])
    full = full_cache()
    kv = export(full, source)
    assert check_export(kv, destination) == NUM_BLOCKS
    local = reshard(kv, destination)
    assert len(local) == len(destination)
    for rank, (layout, tensors) in enumerate(zip(destination, local)):
        expected = rank_tensors(full, layout)
        assert len(tensors) == len(expected), rank
        assert all(t.is_contiguous() and torch.equal(t, e) for t, e in zip(tensors, expected)), rank
    back = reshard([KVShard(layout, tensors) for layout, tensors in zip(destination, local)], source)
    assert all(torch.equal(a, b) for shard, layers in zip(kv, back) for a, b in zip(shard.tensors, layers))


def test_identical_layouts_pass_the_tensors_through():
    for name in ("tp1", "tp2xpp2", "tp4"):
        source = layouts(*CONFIGS[name])
        kv = export(full_cache(), source)
        local = reshard(kv, layouts(*CONFIGS[name]))
        assert all(a is b for shard, layers in zip(kv, local) for a, b in zip(shard.tensors, layers)), name


def test_whole_source_tensors_are_not_copied_when_only_the_layers_split():
    """tp=2 -> tp=2 x pp=2: each destination layer has exactly one source rank's heads: that very tensor."""
    kv = export(full_cache(), layouts(2, 1))
    local = reshard(kv, layouts(2, 2))
    for rank, layout in enumerate(layouts(2, 2)):
        source = kv[rank % 2].tensors[layout.first_layer:layout.first_layer + layout.num_layers]
        assert all(a is b for a, b in zip(local[rank], source)), rank


def test_replicated_heads_are_taken_once_and_given_to_every_replica():
    """tp=1 -> tp=4 with 2 KV heads: ranks 0, 1 hold head 0 and ranks 2, 3 head 1; one copy per head."""
    full = full_cache()
    local = reshard(export(full, layouts(1, 1)), layouts(4, 1))
    for rank, tensors in enumerate(local):
        assert all(torch.equal(t, full[layer][:, :, :, rank // 2:rank // 2 + 1]) for layer, t in enumerate(tensors))
    assert all(a is b for a, b in zip(local[0], local[1])) and all(a is b for a, b in zip(local[2], local[3]))
    # Back from the replicas: the first holder of each head is used, whatever the others hold.
    shards = [KVShard(layout, tensors) for layout, tensors in zip(layouts(4, 1), local)]
    shards[1] = KVShard(shards[1].layout, [torch.full_like(t, float("nan")) for t in shards[1].tensors])
    assert all(torch.equal(a, b) for a, b in zip(reshard(shards, layouts(1, 1))[0], full))


def test_an_export_repeating_ranks_is_the_same_cache():
    """Sequence-parallel ranks (and replicas) repeat layouts: a repeated shard changes nothing."""
    full, source = full_cache(), layouts(2, 1)
    kv = export(full, source)
    assert all(torch.equal(a, b) for a, b in zip(reshard(kv + kv, layouts(1, 1))[0], full))


@pytest.mark.parametrize("change, error", [
    (dict(total_layers=5), "5 layers"), (dict(total_heads=4), "4 KV heads"), (dict(head_dim=32), "of 32"),
    (dict(block_size=16), "blocks of 16"), (dict(dtype=torch.bfloat16), "bfloat16"),
], ids=["depth", "heads", "head-size", "block-size", "dtype"])
def test_a_different_model_cache_is_refused_by_name(change, error):
    """The destination's layouts describe another cache: a ValueError naming what differs."""
    kv = export(full_cache(), layouts(2, 1))
    with pytest.raises(ValueError, match=error):
        reshard(kv, [replace(layout, **change) for layout in layouts(1, 1)])


def test_malformed_exports_are_refused():
    kv = export(full_cache(), layouts(2, 2))
    with pytest.raises(ValueError, match="no source rank holds KV head 1 of layer 0"):
        reshard(kv[:1] + kv[2:], layouts(1, 1))  # a rank missing
    with pytest.raises(ValueError, match="2 layers of KV for a layout of 3"):
        reshard([KVShard(replace(kv[0].layout, num_layers=3), kv[0].tensors)] + kv[1:], layouts(1, 1))
    with pytest.raises(ValueError, match="expected"):
        reshard([KVShard(kv[0].layout, [t[:, :4] for t in kv[0].tensors])] + kv[1:], layouts(1, 1))
    with pytest.raises(ValueError, match="expected"):  # blocks differ between ranks
        reshard([KVShard(kv[0].layout, [t[:-1] for t in kv[0].tensors])] + kv[1:], layouts(1, 1))
    with pytest.raises(ValueError, match="KVShard"):
        reshard([shard.tensors for shard in kv], layouts(1, 1))
    assert check_export([], layouts(1, 1)) == 0
