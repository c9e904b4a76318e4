"""Scheduler with hand-built ModelRunnerOutputs (no model): budget, chunking, diffs, preemption,
priorities, aborts, stop conditions, n>1 siblings, stats."""
import itertools

import pytest

from distinfer.config import CacheConfig, SchedulerConfig
from distinfer.engine.request import Request, RequestStatus
from distinfer.engine.scheduler import QueueFullError, Scheduler
from distinfer.messages import FinishReason, ModelRunnerOutput, TokenLogprobs
from distinfer.sampling_params import SamplingParams

BS = 4
EOS = 2
TOKEN = 7  # what the fake model samples unless told otherwise


def make_sched(num_blocks=64, max_num_seqs=16, budget=64, policy="fcfs", prefix=True, max_model_len=32, **kw):
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, policy=policy, **kw),
                     CacheConfig(block_size=BS, enable_prefix_caching=prefix), num_blocks, max_model_len)


_offsets = itertools.count(1)


def make_req(rid, prompt_len=3, arrival=0.0, priority=0, group_id=None, prompt=None, **params):
    base = 100 * next(_offsets)  # distinct prompts: no accidental prefix sharing
    params.setdefault("max_tokens", 100)
    sp = SamplingParams(**params)
    sp.eos_token_ids = [EOS]
    tokens = prompt if prompt is not None else list(range(base, base + prompt_len))
    return Request(rid, tokens, sp, arrival, priority=priority, group_id=group_id)


def run_step(sched, tokens=None, logprobs=False):
    """Schedule, 'run the model' (sample where the computation reaches the end), update."""
    so = sched.schedule()
    req_ids, sampled = [], []
    for rid, n in so.num_scheduled_tokens.items():
        req = sched.requests[rid]
        req_ids.append(rid)
        done = req.num_computed_tokens + n == req.num_tokens
        sampled.append([(tokens or {}).get(rid, TOKEN)] if done else [])
    lps = [[TokenLogprobs(s[0], -0.5, 1, [s[0]], [-0.5])] if s else None for s in sampled] if logprobs else None
    outs = sched.update_from_output(so, ModelRunnerOutput(req_ids, sampled, lps))
    return so, {o.request_id: o for o in outs}


def test_chunked_prefill_splits_a_long_prompt_and_sends_diffs():
    sched = make_sched(budget=4)
    sched.add_request(make_req("a", prompt_len=10))
    so, outs = run_step(sched)
    (new,) = so.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens, len(new.block_ids)) == ("a", 0, 1)
    assert so.num_scheduled_tokens == {"a": 4} and so.total_num_scheduled_tokens == 4 and outs == {}
    so, outs = run_step(sched)
    (cached,) = so.scheduled_cached_reqs
    assert (cached.new_token_ids, len(cached.new_block_ids), cached.num_computed_tokens) == ([], 1, 4)
    assert not cached.resumed_from_preemption and so.scheduled_new_reqs == [] and outs == {}
    so, outs = run_step(sched)
    (cached,) = so.scheduled_cached_reqs
    assert so.num_scheduled_tokens == {"a": 2} and cached.num_computed_tokens == 8
    assert len(cached.new_block_ids) == 1 and outs["a"].new_token_ids == [TOKEN]
    so, outs = run_step(sched, {"a": 9})  # first decode step: the sampled token is sent
    (cached,) = so.scheduled_cached_reqs
    assert (cached.new_token_ids, cached.new_block_ids, cached.num_computed_tokens) == ([TOKEN], [], 10)
    assert so.num_scheduled_tokens == {"a": 1} and outs["a"].new_token_ids == [9]
    assert len(sched.kv.get_block_ids("a")) == 3


def test_decode_steps_batch_all_running_requests():
    sched = make_sched(max_num_seqs=8)
    for i in range(8):
        sched.add_request(make_req(f"r{i}", prompt_len=3, arrival=i))
    so, outs = run_step(sched)
    assert len(so.scheduled_new_reqs) == 8 and so.total_num_scheduled_tokens == 24 and len(outs) == 8
    so, outs = run_step(sched)
    assert so.scheduled_new_reqs == [] and len(so.scheduled_cached_reqs) == 8
    assert set(so.num_scheduled_tokens.values()) == {1} and so.total_num_scheduled_tokens == 8
    assert all(o.new_token_ids == [TOKEN] for o in outs.values())


def test_token_budget_is_respected_and_fills_with_chunks():
    sched = make_sched(budget=16)
    for i in range(3):
        sched.add_request(make_req(f"r{i}", prompt_len=10, arrival=i))
    so, _ = run_step(sched)
    assert so.num_scheduled_tokens == {"r0": 10, "r1": 6}
    so, _ = run_step(sched)
    assert so.num_scheduled_tokens == {"r0": 1, "r1": 4, "r2": 10}
    assert so.total_num_scheduled_tokens == 15
    so, _ = run_step(sched)
    assert so.total_num_scheduled_tokens == 3 <= 16


def test_max_num_seqs_caps_running_requests():
    sched = make_sched(max_num_seqs=2)
    for i in range(5):
        sched.add_request(make_req(f"r{i}", arrival=i, max_tokens=1))
    so, outs = run_step(sched)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"} and sched.num_waiting == 3
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs.values())
    so, _ = run_step(sched)
    assert set(so.num_scheduled_tokens) == {"r2", "r3"} and so.finished_req_ids == {"r0", "r1"}


def _two_running_requests(sched, **req_kw):
    """Two 7-token prompts filling 4 blocks after one decode step (8 tokens computed each)."""
    sched.add_request(make_req("a", prompt_len=7, arrival=0, **req_kw.get("a", {})))
    sched.add_request(make_req("b", prompt_len=7, arrival=1, **req_kw.get("b", {})))
    run_step(sched)
    run_step(sched)
    assert sched.kv.num_free_blocks == 0


def test_preemption_frees_the_latest_arrival_and_resumes_with_all_tokens():
    sched = make_sched(num_blocks=4, max_model_len=16)
    _two_running_requests(sched, a={"max_tokens": 3})
    b = sched.requests["b"]
    so, _ = run_step(sched)  # "a" needs a third block: "b" (latest arrival) is preempted
    assert so.preempted_req_ids == {"b"} and so.num_scheduled_tokens == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.waiting[0] is b and sched.kv.get_block_ids("b") == []
    so, outs = run_step(sched)  # "a" finished last step (max_tokens=3); "b" resumes
    assert so.finished_req_ids == {"a"}
    (cached,) = so.scheduled_cached_reqs
    assert cached.req_id == "b" and cached.resumed_from_preemption
    assert cached.new_block_ids == sched.kv.get_block_ids("b") and len(cached.new_block_ids) == 3
    assert cached.new_token_ids == [TOKEN]  # sampled after the workers last saw it
    # Recompute covers prompt + outputs (9 tokens); its first block was still cached.
    assert cached.num_computed_tokens == 4 and so.num_scheduled_tokens == {"b": 5}
    assert outs["b"].new_token_ids == [TOKEN] and b.num_output_tokens == 3
    assert sched.get_stats().num_preemptions == 1


def test_running_request_that_is_its_own_victim_is_not_scheduled():
    sched = make_sched(num_blocks=4, max_model_len=16)
    sched.add_request(make_req("a", prompt_len=6, arrival=0))
    sched.add_request(make_req("b", prompt_len=8, arrival=1))
    run_step(sched)  # a: 7 tokens in 2 blocks; b: 9 tokens, needs a third block next
    so, _ = run_step(sched)
    assert so.preempted_req_ids == {"b"} and so.num_scheduled_tokens == {"a": 1}
    assert sched.num_running == 1 and sched.num_waiting == 1


def test_priority_policy_preempts_the_lowest_priority_not_the_latest():
    sched = make_sched(num_blocks=4, max_model_len=16, policy="priority")
    _two_running_requests(sched, a={"priority": 1}, b={"priority": 0})
    so, _ = run_step(sched)  # "a" runs first and needs a block: "a" itself is the victim
    assert so.preempted_req_ids == {"a"} and so.num_scheduled_tokens == {"b": 1}


def test_priority_policy_orders_the_waiting_queue():
    sched = make_sched(max_num_seqs=1, policy="priority")
    for rid, priority, arrival in (("low", 2, 0), ("high", 0, 1), ("mid", 1, 2), ("high2", 0, 3)):
        sched.add_request(make_req(rid, arrival=arrival, priority=priority, max_tokens=1))
    order = [next(iter(run_step(sched)[0].num_scheduled_tokens)) for _ in range(4)]
    assert order == ["high", "high2", "mid", "low"]


def test_fcfs_orders_by_arrival_and_never_preempts_for_waiting():
    sched = make_sched(max_num_seqs=1)
    sched.add_request(make_req("first", arrival=0, priority=5))
    run_step(sched)
    sched.add_request(make_req("second", arrival=1, priority=0))
    so, _ = run_step(sched)
    assert so.preempted_req_ids == set() and set(so.num_scheduled_tokens) == {"first"}


def test_waiting_high_priority_preempts_running_low_priority_for_a_seat():
    sched = make_sched(max_num_seqs=1, policy="priority")
    sched.add_request(make_req("low", arrival=0, priority=5))
    run_step(sched)
    sched.add_request(make_req("high", arrival=1, priority=0))
    so, _ = run_step(sched)
    assert so.preempted_req_ids == {"low"} and set(so.num_scheduled_tokens) == {"high"}
    assert sched.requests["low"].status == RequestStatus.PREEMPTED


def test_waiting_high_priority_preempts_running_low_priority_for_blocks():
    sched = make_sched(num_blocks=4, max_model_len=16, policy="priority")
    sched.add_request(make_req("low", prompt_len=13, arrival=0, priority=5))
    run_step(sched)
    assert sched.kv.num_free_blocks == 0
    sched.add_request(make_req("high", prompt_len=3, arrival=1, priority=0))
    sched.add_request(make_req("lower", prompt_len=3, arrival=2, priority=9))
    so, _ = run_step(sched)
    # "low" was scheduled first this step, then undone: its tokens do not count; "lower" may
    # not jump ahead of the victim even though blocks are free now.
    assert so.preempted_req_ids == {"low"} and so.num_scheduled_tokens == {"high": 3}
    assert [r.request_id for r in sched.waiting] == ["low", "lower"]


def test_abort_of_running_request_frees_blocks_at_once():
    sched = make_sched(prefix=False)
    baseline = sched.kv.num_free_blocks
    sched.add_request(make_req("a", prompt_len=10))
    so = sched.schedule()
    assert sched.kv.num_free_blocks < baseline
    sched.finish_requests("a", FinishReason.ABORT)  # while the step is "in flight"
    assert sched.kv.num_free_blocks == baseline and sched.kv.usage == 0.0
    assert sched.update_from_output(so, ModelRunnerOutput(["a"], [[TOKEN]])) == []  # stale result ignored
    assert not sched.has_unfinished_requests() and sched.has_finished_requests()
    assert sched.schedule().finished_req_ids == {"a"}
    assert sched.schedule().finished_req_ids == set()  # reported once


def test_abort_of_waiting_and_preempted_requests():
    sched = make_sched(num_blocks=4, max_model_len=16)
    _two_running_requests(sched)
    run_step(sched)  # "b" preempted
    sched.add_request(make_req("w", arrival=5))
    sched.finish_requests(["b", "w", "unknown"], FinishReason.ABORT)
    assert sched.num_waiting == 0 and "b" not in sched.requests
    sched.finish_requests("a", FinishReason.ABORT)
    assert sched.kv.num_free_blocks == 4 and not sched.has_unfinished_requests()
    assert sched.schedule().finished_req_ids == {"a", "b", "w"}


def test_eos_stops_with_no_stop_reason_and_frees_blocks():
    sched = make_sched()
    sched.add_request(make_req("a"))
    _, outs = run_step(sched, {"a": EOS}, logprobs=True)
    out = outs["a"]
    assert (out.finish_reason, out.stop_reason, out.new_token_ids) == (FinishReason.STOP, None, [EOS])
    assert out.new_logprobs[0].sampled_token_id == EOS
    assert sched.kv.usage == 0.0 and sched.num_running == 0


def test_ignore_eos_keeps_generating():
    sched = make_sched()
    sched.add_request(make_req("a", ignore_eos=True, max_tokens=2))
    _, outs = run_step(sched, {"a": EOS})
    assert not outs["a"].finished
    _, outs = run_step(sched, {"a": EOS})
    assert outs["a"].finish_reason == FinishReason.LENGTH


def test_stop_token_ids_report_the_stop_reason():
    sched = make_sched()
    sched.add_request(make_req("a", stop_token_ids=[9]))
    run_step(sched, {"a": 5})
    _, outs = run_step(sched, {"a": 9})
    assert (outs["a"].finish_reason, outs["a"].stop_reason) == (FinishReason.STOP, 9)


def test_min_tokens_suppresses_stops_until_reached():
    sched = make_sched()
    sched.add_request(make_req("a", min_tokens=3, stop_token_ids=[9]))
    for token in (EOS, 9):
        _, outs = run_step(sched, {"a": token})
        assert not outs["a"].finished
    _, outs = run_step(sched, {"a": EOS})
    assert outs["a"].finish_reason == FinishReason.STOP
    assert sched.requests == {}


def test_max_tokens_finishes_with_length():
    sched = make_sched()
    sched.add_request(make_req("a", max_tokens=3))
    finishes = [run_step(sched)[1]["a"].finish_reason for _ in range(3)]
    assert finishes == [None, None, FinishReason.LENGTH]


def test_max_model_len_finishes_with_length_and_long_prompts_are_refused():
    sched = make_sched(max_model_len=16)
    sched.add_request(make_req("a", prompt_len=14, max_tokens=None))
    assert run_step(sched)[1]["a"].finish_reason is None
    assert run_step(sched)[1]["a"].finish_reason == FinishReason.LENGTH
    with pytest.raises(ValueError, match="max_model_len=16"):
        sched.add_request(make_req("b", prompt_len=17))


def test_n_siblings_share_the_prompt_prefix_blocks():
    sched = make_sched()
    prompt = list(range(500, 509))  # two full blocks + one token
    for i in range(2):
        sched.add_request(make_req(f"s{i}", prompt=prompt, group_id="g", arrival=0.0))
    so, _ = run_step(sched)
    assert set(so.num_scheduled_tokens) == {"s0"}  # s1 waits for the shared prompt
    so, outs = run_step(sched)
    new = next(r for r in so.scheduled_new_reqs if r.req_id == "s1")
    assert new.num_computed_tokens == 8 and so.num_scheduled_tokens["s1"] == 1
    assert new.block_ids[:2] == sched.kv.get_block_ids("s0")[:2]
    assert outs["s1"].num_cached_tokens == 8
    assert sched.get_stats().prefix_cache_hits == 8


def test_stats_counters():
    sched = make_sched(num_blocks=8, max_num_seqs=1)
    sched.add_request(make_req("a", prompt_len=5))
    sched.add_request(make_req("b", prompt_len=5))
    run_step(sched)
    stats = sched.get_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert (stats.num_total_blocks, stats.num_free_blocks) == (8, 6)
    assert stats.kv_cache_usage == pytest.approx(2 / 8)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions) == (5, 0, 0)


def test_duplicate_ids_and_full_queue_are_refused():
    sched = make_sched(max_waiting_requests=1)
    sched.add_request(make_req("a"))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add_request(make_req("a"))
    with pytest.raises(QueueFullError):
        sched.add_request(make_req("b"))


class _FakeWorker:
    """Applies SchedulerOutput diffs like a worker and 'writes KV' (the token id) into slots, so
    the test can check that every computed position in a block table holds the right token."""

    def __init__(self, sched):
        self.sched, self.tokens, self.tables, self.slots = sched, {}, {}, {}

    def execute(self, so, rng):
        for rid in so.finished_req_ids:
            self.tokens.pop(rid, None)
        for new in so.scheduled_new_reqs:
            self.tokens[new.req_id], self.tables[new.req_id] = list(new.prompt_token_ids), list(new.block_ids)
        for diff in so.scheduled_cached_reqs:
            self.tokens[diff.req_id] += diff.new_token_ids
            table = self.tables[diff.req_id]
            self.tables[diff.req_id] = list(diff.new_block_ids) if diff.resumed_from_preemption else table + diff.new_block_ids
        sampled = []
        for rid, n in so.num_scheduled_tokens.items():
            req, tokens, table = self.sched.requests[rid], self.tokens[rid], self.tables[rid]
            assert tokens == req.all_token_ids and table == self.sched.kv.get_block_ids(rid)
            start = req.num_computed_tokens
            for pos in range(start):  # prefix hits and earlier chunks hold the right KV
                assert self.slots[(table[pos // BS], pos % BS)] == tokens[pos]
            for pos in range(start, start + n):
                self.slots[(table[pos // BS], pos % BS)] = tokens[pos]
            sampled.append([rng.choice([EOS, 5, 6, 9])] if start + n == len(tokens) else [])
        return ModelRunnerOutput(list(so.num_scheduled_tokens), sampled)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_workload_keeps_invariants_and_frees_everything(policy):
    import random

    rng = random.Random(0)
    sched = make_sched(num_blocks=12, max_num_seqs=5, budget=12, policy=policy, max_model_len=40)
    worker, shared = _FakeWorker(sched), list(range(900, 910))
    for i in range(30):
        prompt = shared[:rng.randint(1, 10)] + [rng.randint(10, 50) for _ in range(rng.randint(1, 12))]
        sched.add_request(make_req(f"r{i}", prompt=prompt, arrival=i, priority=rng.randint(0, 3),
                                   group_id=f"g{i // 3}", max_tokens=rng.randint(1, 20), ignore_eos=i % 2 == 0))
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        if rng.random() < 0.02 and sched.requests:
            sched.finish_requests(rng.choice(sorted(sched.requests)), FinishReason.ABORT)
        so = sched.schedule()
        assert so.total_num_scheduled_tokens <= 12 and sched.num_running <= 5
        assert not so.preempted_req_ids & set(so.num_scheduled_tokens)
        sched.update_from_output(so, worker.execute(so, rng))
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_free_blocks == 12 and all(b.ref_cnt == 0 for b in sched.kv.pool.blocks)
    stats = sched.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0  # both paths exercised


def _fake_output(sched, so):
    req_ids = list(so.num_scheduled_tokens)
    sampled = [[TOKEN] if sched.requests[r].num_computed_tokens + n == sched.requests[r].num_tokens else []
               for r, n in so.num_scheduled_tokens.items()]
    return ModelRunnerOutput(req_ids, sampled)


def test_steps_in_flight_schedule_disjoint_requests_and_never_preempt_in_flight():
    """Pipeline parallel keeps several steps in flight: each request is in at most one of them."""
    sched = make_sched(num_blocks=8, max_model_len=16, max_num_seqs=4)
    for rid in "abcd":
        sched.add_request(make_req(rid, prompt_len=3))
    first = sched.schedule()
    second = sched.schedule()
    assert set(first.num_scheduled_tokens) == set("abcd") and second.is_empty
    sched.update_from_output(first, _fake_output(sched, first))
    third = sched.schedule()
    assert set(third.num_scheduled_tokens) == set("abcd")
    # While `third` is in flight, a newcomer that needs blocks cannot evict an in-flight request.
    sched.add_request(make_req("e", prompt_len=12))
    fourth = sched.schedule()
    assert not fourth.preempted_req_ids and set(fourth.num_scheduled_tokens) <= {"e"}
    assert all(sched.requests[r].status == RequestStatus.RUNNING for r in "abcd")
