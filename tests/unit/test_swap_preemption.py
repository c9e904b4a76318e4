"""Swap preemption in the scheduler (hand-built ModelRunnerOutputs, no model): the victim's computed
blocks go to the host tier in a KV op of the same step and come back in the step it resumes, its
progress kept; a full host tier falls back to recompute; finishing or aborting frees both tiers."""
from __future__ import annotations

import pytest

from distinfer.config import CacheConfig, SchedulerConfig
from distinfer.engine.request import RequestStatus
from distinfer.engine.scheduler import Scheduler
from distinfer.kv.manager import KVCacheManager
from distinfer.kv.offload import HostKVTier
from distinfer.messages import FinishReason, KVCopyDirection
from tests.unit.test_scheduler import BS, TOKEN, _two_running_requests, make_req, run_step


def make_sched(num_blocks=4, num_host_blocks=8, mode="auto", max_model_len=16, prefix=False):
    return Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, preemption_mode=mode),
                     CacheConfig(block_size=BS, enable_prefix_caching=prefix), num_blocks, max_model_len,
                     num_host_blocks=num_host_blocks)


def test_victim_swaps_out_and_resumes_with_its_progress():
    sched = make_sched()
    _two_running_requests(sched, a={"max_tokens": 3})  # a, b: 8 tokens computed each, 2 blocks each
    b = sched.requests["b"]
    b_blocks = sched.kv.get_block_ids("b")
    so, _ = run_step(sched)  # "a" needs a third block: "b" is swapped out
    assert so.preempted_req_ids == {"b"} and so.num_scheduled_tokens == {"a": 1}
    (op,) = so.kv_ops
    assert op.direction == KVCopyDirection.SWAP_OUT and op.device_block_ids == b_blocks
    assert len(op.host_block_ids) == 2 and sched.kv.host.holds("b")
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 8  # progress kept
    so, outs = run_step(sched)  # "a" finished; "b" comes back: swap in, then only its new token
    (op_in,) = so.kv_ops
    assert op_in.direction == KVCopyDirection.SWAP_IN and op_in.host_block_ids == op.host_block_ids
    assert op_in.device_block_ids == sched.kv.get_block_ids("b")[:2]
    (cached,) = so.scheduled_cached_reqs
    assert cached.resumed_from_preemption and cached.num_computed_tokens == 8
    assert so.num_scheduled_tokens == {"b": 1} and outs["b"].new_token_ids == [TOKEN]
    assert not sched.kv.host.holds("b") and sched.kv.host.num_free_blocks == 8
    assert sched.num_recomputed_tokens == 0 and sched.get_stats().num_preemptions == 1
    assert sched.kv.host.stats.swapped_out_blocks == sched.kv.host.stats.swapped_in_blocks == 2


def test_full_host_tier_falls_back_to_recompute():
    sched = make_sched(num_host_blocks=1)  # the victim holds 2 computed blocks
    _two_running_requests(sched)
    so, _ = run_step(sched)
    assert so.preempted_req_ids == {"b"} and so.kv_ops == []
    assert sched.requests["b"].num_computed_tokens == 0 and sched.num_recomputed_tokens == 8


def test_recompute_mode_never_swaps():
    sched = make_sched(mode="recompute")
    _two_running_requests(sched)
    so, _ = run_step(sched)
    assert so.preempted_req_ids == {"b"} and so.kv_ops == [] and sched.kv.host.num_free_blocks == 8


def test_swap_mode_needs_a_host_tier():
    with pytest.raises(ValueError, match="kv_offloading_size"):
        make_sched(num_host_blocks=0, mode="swap")
    assert make_sched(num_host_blocks=0).kv.host is None  # auto without a tier: recompute


@pytest.mark.parametrize("reason", [FinishReason.ABORT, FinishReason.ERROR])
def test_finishing_a_swapped_request_frees_its_host_blocks(reason):
    sched = make_sched()
    _two_running_requests(sched)
    so, _ = run_step(sched)  # swap-out of "b" is in this step's ops
    assert sched.kv.host.num_free_blocks == 6
    sched.finish_requests("b", reason)  # aborted while (or right after) its swap-out runs
    assert sched.kv.host.num_free_blocks == 8 and not sched.kv.host.holds("b")
    so, _ = run_step(sched)
    assert "b" in so.finished_req_ids and so.kv_ops == []


def test_host_blocks_freed_by_a_swap_in_are_reused_only_by_later_ops():
    space = HostKVTier(2)
    out_a = space.swap_out("a", [5, 6])
    assert not space.can_hold(1)
    with pytest.raises(ValueError, match="2 host blocks to copy need as many device blocks, got 3"):
        space.swap_in("a", [1, 2, 3])
    back = space.swap_in("a", [1, 2])
    assert back.device_block_ids == [1, 2] and back.host_block_ids == out_a.host_block_ids
    out_b = space.swap_out("b", [7])  # appended after the swap-in in the step's ops: ordered after it
    assert out_b.host_block_ids[0] in out_a.host_block_ids
    with pytest.raises(ValueError, match="already swapped"):
        space.swap_out("b", [8])
    with pytest.raises(ValueError, match="cannot hold"):
        space.swap_out("c", [1, 2])


def test_evicted_prefix_blocks_spill_to_the_host_and_come_back_as_hits():
    sched = make_sched(num_blocks=5, prefix=True, max_model_len=20)
    prompt = list(range(500, 509))  # 9 tokens: two full blocks can be cached, one token left to compute
    sched.add_request(make_req("first", prompt=prompt, max_tokens=1))
    run_step(sched)  # "first" computes its prompt, samples its one token and finishes
    assert sched.kv.pool.num_cached_blocks == 2  # its two full blocks stay cached on the device (evictable)
    sched.add_request(make_req("filler", prompt_len=19, max_tokens=1))  # takes all 5 blocks: evicts them
    so, _ = run_step(sched)
    spills = [op for op in so.kv_ops if op.direction == KVCopyDirection.SWAP_OUT]
    assert sum(len(op.device_block_ids) for op in spills) == 2
    assert sched.kv.host.num_cached_blocks == 2 and sched.kv.host.stats.spilled_blocks == 2
    run_step(sched)  # "filler" finishes
    sched.add_request(make_req("again", prompt=prompt, max_tokens=2))
    so, _ = run_step(sched)  # its prefix is no longer on the device, but in the host tier
    (copy_in,) = [op for op in so.kv_ops if op.direction == KVCopyDirection.SWAP_IN]
    assert copy_in.device_block_ids == sched.kv.get_block_ids("again")[:2]
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and so.num_scheduled_tokens == {"again": 1}
    stats = sched.kv.prefix_cache_stats
    assert stats.host_hits == 8 and sched.kv.host.stats.hit_blocks == 2


def test_a_full_host_tier_reuses_its_least_recently_spilled_block():
    tier = HostKVTier(2)
    ops = [tier.spill(bytes([i]), 10 + i) for i in range(3)]
    assert [op.host_block_ids for op in ops] == [[0], [1], [0]]  # the third reuses the oldest
    assert tier.reserve_hits([bytes([0])]) == []  # evicted
    assert tier.spill(bytes([2]), 99) is None  # already here: touched, no copy
    hits = tier.reserve_hits([bytes([1]), bytes([2])])
    assert hits == [1, 0] and tier.num_cached_blocks == 0  # reserved: nothing can reuse them now
    tier.release_hits([bytes([1]), bytes([2])], hits, num_used=2)
    assert tier.num_cached_blocks == 2 and tier.stats.hit_blocks == 2
    tier.swap_out("r", [7, 8])  # a swap-out may evict spilled blocks, never the other way round
    assert tier.num_cached_blocks == 0 and tier.spill(bytes([3]), 5) is None


def test_abort_right_after_swap_in_frees_every_block_of_both_tiers():
    sched = make_sched()
    _two_running_requests(sched, a={"max_tokens": 3})
    run_step(sched)  # "b" swapped out
    so = sched.schedule()  # "a" finished last step; "b" swaps in (the copy is planned in this step)
    assert [op.direction for op in so.kv_ops] == [KVCopyDirection.SWAP_IN]
    sched.finish_requests("b", FinishReason.ABORT)  # aborted while its swap-in step runs
    assert sched.kv.num_free_blocks == 4 and sched.kv.host.num_free_blocks == 8
    assert not sched.requests and not sched.running and not sched.waiting


def test_a_request_that_cannot_be_admitted_yet_plans_no_copy_and_counts_one_lookup():
    sched = make_sched(num_blocks=6, prefix=True, max_model_len=24)
    prompt = list(range(500, 509))  # two full blocks to cache
    sched.add_request(make_req("first", prompt=prompt, max_tokens=1))
    run_step(sched)
    sched.add_request(make_req("hog", prompt_len=21, max_tokens=3))  # all 6 blocks: both cached ones evicted
    so, _ = run_step(sched)
    (spill,) = so.kv_ops  # the two spills of one allocation are one copy
    assert spill.direction == KVCopyDirection.SWAP_OUT and len(spill.device_block_ids) == 2
    sched.add_request(make_req("again", prompt=prompt, max_tokens=2))
    before = sched.kv.prefix_cache_stats
    for _ in range(2):  # "hog" decodes; "again" finds its prefix in the host tier but no device block is free
        so, _ = run_step(sched)
        assert so.kv_ops == [] and "again" not in so.num_scheduled_tokens
    assert sched.kv.prefix_cache_stats == before and sched.kv.host.num_cached_blocks == 2
    so, _ = run_step(sched)  # "hog" finished last step: "again" gets in, its prefix copied in once
    spill, copy_in = so.kv_ops  # its blocks evict hog's cached ones first (spilled in one copy)
    assert spill.direction == KVCopyDirection.SWAP_OUT and copy_in.direction == KVCopyDirection.SWAP_IN
    assert copy_in.device_block_ids == sched.kv.get_block_ids("again")[:2]
    after = sched.kv.prefix_cache_stats
    assert (after.queries - before.queries, after.hits - before.hits, after.host_hits - before.host_hits) == (9, 8, 8)
    assert so.num_scheduled_tokens == {"again": 1}


def test_swap_in_copies_only_the_blocks_no_longer_cached_on_the_device():
    sched = make_sched(prefix=True)
    _two_running_requests(sched, a={"max_tokens": 3})
    b_blocks = sched.kv.get_block_ids("b")
    so, _ = run_step(sched)  # "b" swapped out; "a" takes one block: b's second (freed last-first) is evicted
    out = next(op for op in so.kv_ops if op.direction == KVCopyDirection.SWAP_OUT
               and op.device_block_ids[:2] == b_blocks)
    so, _ = run_step(sched)  # "a" finished; "b" resumes: its first block is still cached on the device
    (op_in,) = [op for op in so.kv_ops if op.direction == KVCopyDirection.SWAP_IN]
    assert op_in.host_block_ids == out.host_block_ids[1:2]
    table = sched.kv.get_block_ids("b")
    assert table[0] == b_blocks[0] and op_in.device_block_ids == [table[1]]
    assert so.num_scheduled_tokens == {"b": 1} and sched.requests["b"].num_computed_tokens == 9
    assert sched.kv.host.stats.swapped_in_blocks == 1 and not sched.kv.host.holds("b")


def test_merged_copies_keep_only_the_last_write_to_a_host_block():
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True, max_model_len=16, num_host_blocks=1)
    tokens = list(range(9))
    prefix = kv.find_computed("a", tokens)
    kv.admit("a", prefix, len(tokens))
    kv.cache_blocks("a", tokens, len(tokens))
    first, second = kv.get_block_ids("a")[:2]
    kv.free("a")  # tail first: the second block is evicted before the first
    kv.allocate_slots("b", 16)  # evicts both; the one host block takes the second, then the first
    (op,) = kv.take_ops()
    assert (op.device_block_ids, op.host_block_ids) == ([first], [0])
    assert kv.find_computed("c", tokens).num_host_blocks == 1  # the first block is there, not the second
