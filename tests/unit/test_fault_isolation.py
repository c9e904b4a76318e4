"""Fault isolation of one request (issue 8), without a model: SamplingParams refuses every value the
sampler's tensors cannot hold; a row the sampler cannot sample (non-finite logits, an exception) ends that
request alone while every other row gets exactly the token it gets without it; the scheduler ends a failed
request with FinishReason.ERROR and frees its blocks at once; the output processor ends a request whose
detokenization fails (and the siblings of an n > 1 request) while the others go on."""
from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from distinfer.config import CacheConfig, SchedulerConfig
from distinfer.engine.output_processor import (
    DETOKENIZE_FAILED,
    OutputProcessor,
    RequestOutputKind,
)
from distinfer.engine.request import Request, RequestStatus
from distinfer.engine.scheduler import Scheduler
from distinfer.messages import (
    EngineCoreOutput,
    EngineRequest,
    FinishReason,
    ModelRunnerOutput,
    TokenLogprobs,
)
from distinfer.sampling_params import SamplingParams, SamplingType, child_seed
from distinfer.worker.sampler import (
    NON_FINITE_LOGITS,
    SAMPLING_FAILED,
    Sampler,
    SamplerOutput,
    SamplingRow,
    make_generator,
)

pytestmark = pytest.mark.timeout(120)

INT32_MAX, INT64_MIN, INT64_MAX = 2**31 - 1, -(2**63), 2**63 - 1
V = 64  # vocabulary of the sampler tests: small, so a different uniform draw usually picks another token

# ------------------------------------------------------------------ SamplingParams bounds


@pytest.mark.parametrize("seed", [INT64_MAX + 1, INT64_MIN - 1, 2**64, 2**64 - 1, -(2**64)])
def test_seed_outside_int64_is_refused_naming_seed(seed: int) -> None:
    """A seed torch.Generator cannot hold never reaches the step loop."""
    with pytest.raises(ValueError, match=r"^seed "):
        SamplingParams(temperature=1.0, seed=seed)


@pytest.mark.parametrize("seed", [INT64_MAX, INT64_MIN, 0, -1])
def test_seed_at_int64_bounds_is_accepted_and_samples(seed: int) -> None:
    """Accepted seeds build a generator and sample without error."""
    params = SamplingParams(temperature=1.0, seed=seed)
    out = Sampler()(torch.randn(1, V, generator=torch.Generator().manual_seed(0)), [_row(params)])
    assert out.errors == {} and 0 <= out.token_ids[0] < V


def test_child_seeds_wrap_into_int64() -> None:
    """n > 1 children get seed + index, wrapped into int64 (the largest seed with n=2 stays valid)."""
    assert child_seed(INT64_MAX, 1) == INT64_MIN
    assert child_seed(INT64_MAX, 15) == INT64_MIN + 14
    for seed, index in ((0, 0), (5, 3), (-7, 2), (INT64_MIN, 15), (INT64_MAX - 15, 15)):
        assert child_seed(seed, index) == seed + index
    children = OutputProcessor(None).add_request(
        EngineRequest("r", [1, 2], SamplingParams(n=2, temperature=1.0, seed=INT64_MAX), arrival_time=0.0))
    assert [c.sampling_params.seed for c in children] == [INT64_MAX, INT64_MIN]


@pytest.mark.parametrize("temperature", [1e39, math.inf, -math.inf, math.nan, 1e6 * (1 + 1e-9), -1e-9])
def test_temperature_outside_range_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match=r"^temperature "):
        SamplingParams(temperature=temperature)


def test_temperature_at_its_maximum_is_accepted_and_samples() -> None:
    params = SamplingParams(temperature=1e6, seed=3)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 1e4
    out = Sampler()(logits, [_row(params)])
    assert out.errors == {} and 0 <= out.token_ids[0] < V


@pytest.mark.parametrize("field", ["n", "top_k", "max_tokens", "min_tokens"])
def test_counts_above_int32_are_refused_and_int32_max_accepted(field: str) -> None:
    """Counts must fit the sampler's int32 tensors."""
    extra = {"max_tokens": None} if field == "min_tokens" else {}
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: INT32_MAX + 1}, **extra)
    assert getattr(SamplingParams(**{field: INT32_MAX}, **extra), field) == INT32_MAX


@pytest.mark.parametrize("stop", ["a\ud800", ["ok", "\udfff"], ["x\ud83d"]])
def test_stop_string_with_lone_surrogate_is_refused(stop: str | list[str]) -> None:
    with pytest.raises(ValueError, match=r"^stop "):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("field,value", [
    ("n", True), ("top_k", True), ("seed", True), ("seed", False), ("max_tokens", True),
    ("min_tokens", False), ("logprobs", True), ("stop_token_ids", [True]), ("temperature", True),
])
def test_bools_are_refused_where_numbers_are_expected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: value})


# ------------------------------------------------------------------ Sampler: non-finite rows

GREEDY = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)]
SEEDED = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=1.3, top_p=0.9, seed=-5, logprobs=1),
          SamplingParams(temperature=1.0, top_k=5, min_p=0.05, seed=INT64_MAX)]
MIXES = {
    "greedy": [GREEDY[0], GREEDY[1], GREEDY[0], GREEDY[1]],
    "seeded": [SEEDED[0], SEEDED[1], SEEDED[2], SEEDED[0]],
    "mixed": [GREEDY[1], SEEDED[1], GREEDY[0], SEEDED[2]],
}


def _row(params: SamplingParams) -> SamplingRow:
    return SamplingRow(params, [], [], make_generator(params.seed))


def _alone(logits_row: torch.Tensor, params: SamplingParams) -> SamplerOutput:
    """What the sampler gives this row sampled alone (fresh generator of the same seed)."""
    return Sampler()(logits_row.unsqueeze(0).clone(), [_row(params)])


def _assert_same_as_alone(out: SamplerOutput, logits: torch.Tensor, params: list[SamplingParams], skip: set[int]) -> None:
    for i, p in enumerate(params):
        if i in skip:
            continue
        ref = _alone(logits[i], p)
        assert ref.errors == {}
        assert out.token_ids[i] == ref.token_ids[0], i
        if p.sampling_type == SamplingType.GREEDY:
            assert out.token_ids[i] == int(logits[i].argmax())
        _assert_same_logprobs(out.logprobs[i], ref.logprobs[0])


def _assert_same_logprobs(got: TokenLogprobs | None, want: TokenLogprobs | None) -> None:
    assert (got is None) == (want is None)
    if got is not None:
        assert (got.sampled_token_id, got.sampled_rank, got.top_token_ids) == (
            want.sampled_token_id, want.sampled_rank, want.top_token_ids)
        assert got.sampled_logprob == pytest.approx(want.sampled_logprob, abs=1e-6)
        assert got.top_logprobs == pytest.approx(want.top_logprobs, abs=1e-6)


def _batch_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "distinfer.worker.sampler" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("bad", [0, 2])
def test_non_finite_logits_end_only_their_row(mix: str, poison: float, bad: int, caplog) -> None:
    """One NaN or +inf logit in a row: that row alone errors (NON_FINITE_LOGITS, no logprobs), detected
    without an exception; every other row gets the token (and logprobs) it gets alone."""
    params = MIXES[mix]
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(7))
    logits[bad, 5] = poison
    with caplog.at_level(logging.ERROR, logger="distinfer.worker.sampler"):
        out = Sampler()(logits.clone(), [_row(p) for p in params])
    assert out.errors == {bad: NON_FINITE_LOGITS}
    assert out.logprobs[bad] is None
    _assert_same_as_alone(out, logits, params, skip={bad})
    assert _batch_failures(caplog) == []  # found by the finiteness check, not by a failing batch


@pytest.mark.parametrize("bad_params", [
    SamplingParams(temperature=1e-4, seed=1),
    SamplingParams(temperature=1e-4),
    SamplingParams(temperature=1e-4, top_p=0.5, top_k=3, min_p=0.1, seed=2, logprobs=3),
], ids=["seeded", "unseeded", "truncated"])
def test_finite_logits_that_overflow_at_low_temperature_end_only_their_row(bad_params: SamplingParams, caplog) -> None:
    """Logits ~1e37 are finite, but divided by temperature 1e-4 they overflow float32: that row errors,
    the others are unaffected, and nothing raises."""
    params = [SEEDED[0], bad_params, GREEDY[1], SEEDED[1]]
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(8))
    logits[1] *= 1e37
    assert bool(torch.isfinite(logits).all())
    with caplog.at_level(logging.ERROR, logger="distinfer.worker.sampler"):
        out = Sampler()(logits.clone(), [_row(p) for p in params])
    assert out.errors == {1: NON_FINITE_LOGITS}
    _assert_same_as_alone(out, logits, params, skip={1})
    assert _batch_failures(caplog) == []


# ------------------------------------------------------------------ Sampler: an exception in the batch


def _poisoned(params: SamplingParams) -> SamplingParams:
    """A copy whose logprobs count passed no validation: topk over the vocabulary raises (the fault)."""
    bad = params.clone()
    object.__setattr__(bad, "logprobs", 10**6)
    return bad


@pytest.mark.parametrize("bad_base", [GREEDY[0], SEEDED[0]], ids=["greedy", "seeded"])
def test_exception_in_batch_fails_only_its_row_and_reuses_the_draws(bad_base: SamplingParams, caplog) -> None:
    """Over several steps, a batch with a row that makes the sampler raise: that row alone gets
    SAMPLING_FAILED, and every other row (greedy, seeded, unseeded) gets the same tokens and logprobs as a
    run without the bad row. Seeded and unseeded rows match only if the row-by-row retry reused the
    uniforms drawn for the failed batch instead of drawing again."""
    good = [SEEDED[0], SamplingParams(temperature=1.0), GREEDY[1], SEEDED[1], SamplingParams(temperature=0.9, logprobs=2)]
    bad_at = 2
    with_bad = good[:bad_at] + [_poisoned(bad_base)] + good[bad_at:]
    rows_with, rows_without = [_row(p) for p in with_bad], [_row(p) for p in good]
    sampler_with, sampler_without = Sampler(seed=5), Sampler(seed=5)
    gen = torch.Generator().manual_seed(9)
    steps = 6
    seen: set[int] = set()
    with caplog.at_level(logging.ERROR, logger="distinfer.worker.sampler"):
        for _ in range(steps):
            logits = torch.randn(len(with_bad), V, generator=gen)
            out = sampler_with(logits.clone(), rows_with)
            ref = sampler_without(torch.cat([logits[:bad_at], logits[bad_at + 1:]]), rows_without)
            assert out.errors == {bad_at: SAMPLING_FAILED} and ref.errors == {}
            assert out.logprobs[bad_at] is None
            assert out.token_ids[:bad_at] + out.token_ids[bad_at + 1:] == ref.token_ids
            for got, want in zip(out.logprobs[:bad_at] + out.logprobs[bad_at + 1:], ref.logprobs):
                _assert_same_logprobs(got, want)
            seen.update(ref.token_ids[i] for i in (0, 1, 3))  # the random rows
    assert len(seen) > 3  # the random rows really vary from step to step (a redraw would show)
    failures = _batch_failures(caplog)
    assert sum("sampling a batch" in r.getMessage() for r in failures) == steps  # the retry path ran


# ------------------------------------------------------------------ Scheduler

BS = 4
_offsets = itertools.count(1)


def _sched(num_blocks: int = 32) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), CacheConfig(block_size=BS, enable_prefix_caching=False),
                     num_blocks, max_model_len=64)


def _req(rid: str, prompt_len: int = 7, max_tokens: int = 4) -> Request:
    base = 100 * next(_offsets)
    return Request(rid, list(range(base, base + prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


def _prefill_two(sched: Scheduler) -> None:
    """Requests a and b, prefilled (each sampled its first token 7)."""
    sched.add_request(_req("a"))
    sched.add_request(_req("b"))
    so = sched.schedule()
    assert set(so.num_scheduled_tokens) == {"a", "b"}
    sched.update_from_output(so, ModelRunnerOutput(["a", "b"], [[7], [7]]))


def test_sampling_error_ends_that_request_alone_and_frees_its_blocks_at_once() -> None:
    """errors={a: reason}: a gets one EngineCoreOutput (ERROR, the reason, no token), leaves running and
    frees its blocks in the same update; b gets its token and runs on to max_tokens; all blocks return."""
    sched = _sched()
    total = sched.kv.num_free_blocks
    _prefill_two(sched)
    a = sched.requests["a"]
    a_blocks = len(sched.kv.get_block_ids("a"))
    free_before = sched.kv.num_free_blocks
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    outs = sched.update_from_output(so, ModelRunnerOutput(["a", "b"], [[], [9]], errors={"a": "reason"}))
    by_id = {o.request_id: o for o in outs}
    assert set(by_id) == {"a", "b"}
    failed = by_id["a"]
    assert (failed.finish_reason, failed.error, failed.new_token_ids) == (FinishReason.ERROR, "reason", [])
    assert a.status == RequestStatus.FINISHED_ERROR and a.output_token_ids == [7]
    assert sched.kv.get_block_ids("a") == [] and sched.kv.num_free_blocks == free_before + a_blocks > free_before
    assert "a" not in sched.requests and [r.request_id for r in sched.running] == ["b"]
    assert by_id["b"].new_token_ids == [9] and not by_id["b"].finished and by_id["b"].error is None
    so = sched.schedule()
    assert so.finished_req_ids == {"a"} and so.num_scheduled_tokens == {"b": 1}  # workers drop a's state
    outs = sched.update_from_output(so, ModelRunnerOutput(["b"], [[9]]))
    while sched.has_unfinished_requests():
        so = sched.schedule()
        outs = sched.update_from_output(so, ModelRunnerOutput(["b"], [[9]]))
    assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].error is None
    assert sched.kv.num_free_blocks == total


def test_error_for_a_request_aborted_during_the_step_is_ignored() -> None:
    """A late error for a request that already finished produces no output and frees nothing twice."""
    sched = _sched()
    total = sched.kv.num_free_blocks
    _prefill_two(sched)
    so = sched.schedule()
    sched.finish_requests("a", FinishReason.ABORT)
    outs = sched.update_from_output(so, ModelRunnerOutput(["a", "b"], [[], [9]], errors={"a": "late"}))
    assert [o.request_id for o in outs] == ["b"]
    sched.finish_requests("b", FinishReason.ERROR)  # how the engine ends a request the output processor failed
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == total


# ------------------------------------------------------------------ OutputProcessor


class _FaultyTokenizer:
    """The real tokenizer, except that turning `poison` into a token string raises (the injected fault).
    is_fast=False routes requests to the offset-based detokenizer, which calls convert_ids_to_tokens."""

    is_fast = False

    def __init__(self, inner: object, poison: int) -> None:
        self._inner, self._poison = inner, poison

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
        if self._poison in ids:
            raise RuntimeError("injected detokenizer fault: secret internal detail")
        return self._inner.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def words(tokenizer) -> dict[str, list[int]]:
    return {w: tokenizer.encode(w, add_special_tokens=False) for w in ("prompt text here", " hello world", " poison")}


@pytest.fixture()
def faulty(tokenizer, words) -> _FaultyTokenizer:
    return _FaultyTokenizer(tokenizer, poison=words[" poison"][0])


def _engine_req(words: dict[str, list[int]], rid: str, **params) -> EngineRequest:
    return EngineRequest(rid, words["prompt text here"], SamplingParams(**params), arrival_time=1.0, prompt="p")


def test_detokenizer_exception_ends_that_request_alone(tokenizer, faulty, words, caplog) -> None:
    """The failing request ends with "error" and DETOKENIZE_FAILED (not the exception text), its id goes to
    reqs_to_fail; the other request of the same step goes on and its text is the full decode."""
    op = OutputProcessor(faulty)
    op.add_request(_engine_req(words, "bad"), RequestOutputKind.DELTA)
    op.add_request(_engine_req(words, "good"), RequestOutputKind.DELTA)
    hello, poison = words[" hello world"], words[" poison"][0]
    first = op.process_outputs([EngineCoreOutput("bad", hello[:1]), EngineCoreOutput("good", hello[:1])])
    assert first.reqs_to_fail == [] and len(first.request_outputs) == 2
    with caplog.at_level(logging.ERROR, logger="distinfer.engine.output_processor"):
        res = op.process_outputs([EngineCoreOutput("bad", [poison]), EngineCoreOutput("good", hello[1:])])
    assert res.reqs_to_fail == ["bad"] and res.reqs_to_abort == []
    outs = {o.request_id: o for o in res.request_outputs}
    bad, good = outs["bad"], outs["good"]
    assert bad.finished and bad.error == DETOKENIZE_FAILED and "secret" not in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error"]
    assert not good.finished and good.error is None
    assert any("detokenizing request bad failed" in r.getMessage() for r in caplog.records)
    late = op.process_outputs([EngineCoreOutput("bad", hello[:1], finish_reason=FinishReason.LENGTH)])
    assert late.request_outputs == [] and late.reqs_to_fail == []
    end = op.process_outputs([EngineCoreOutput("good", hello[:1], finish_reason=FinishReason.LENGTH)])
    final = end.request_outputs[0]
    assert final.finished and final.error is None and final.outputs[0].finish_reason == "length"
    text = "".join(c.text for o in (*first.request_outputs, good, final) if o.request_id == "good" for c in o.outputs)
    assert text == tokenizer.decode(hello + hello[:1])
    assert not op.has_unfinished_requests()


@pytest.mark.parametrize("failing_first", [True, False])
def test_detokenizer_exception_in_one_child_aborts_its_sibling(faulty, words, failing_first: bool) -> None:
    """n=2: a child whose detokenization fails ends with "error", its sibling with "abort"; both internal
    ids are in reqs_to_fail (the scheduler still runs both); the request finishes with DETOKENIZE_FAILED."""
    op = OutputProcessor(faulty)
    c0, c1 = (r.request_id for r in op.add_request(_engine_req(words, "user", n=2, temperature=1.0, seed=1),
                                                    RequestOutputKind.CUMULATIVE))
    outputs = [EngineCoreOutput(c0, [words[" poison"][0]]), EngineCoreOutput(c1, words[" hello world"][:1])]
    res = op.process_outputs(outputs if failing_first else outputs[::-1])
    assert sorted(res.reqs_to_fail) == sorted([c0, c1]) and res.reqs_to_abort == []
    (out,) = res.request_outputs
    assert out.finished and out.error == DETOKENIZE_FAILED
    assert {c.index: c.finish_reason for c in out.outputs} == {0: "error", 1: "abort"}
    assert op.process_outputs([EngineCoreOutput(c1, [5])]).request_outputs == []
    assert not op.has_unfinished_requests()


def test_scheduler_error_ends_the_request_with_its_text(tokenizer, words) -> None:
    """An EngineCoreOutput with ERROR and a reason (from the sampler) ends the request with that reason;
    the scheduler ended it already, so it is not in reqs_to_fail; an n=2 sibling is aborted (and is)."""
    op = OutputProcessor(tokenizer)
    op.add_request(_engine_req(words, "one"), RequestOutputKind.DELTA)
    c0, c1 = (r.request_id for r in op.add_request(_engine_req(words, "two", n=2, temperature=1.0),
                                                    RequestOutputKind.FINAL_ONLY))
    res = op.process_outputs([
        EngineCoreOutput("one", [], finish_reason=FinishReason.ERROR, error=NON_FINITE_LOGITS),
        EngineCoreOutput(c1, words[" hello world"][:1]),
        EngineCoreOutput(c0, [], finish_reason=FinishReason.ERROR, error=SAMPLING_FAILED),
    ])
    assert res.reqs_to_fail == [c1] and res.reqs_to_abort == []
    outs = {o.request_id: o for o in res.request_outputs}
    assert outs["one"].finished and outs["one"].error == NON_FINITE_LOGITS
    assert outs["one"].outputs[0].finish_reason == "error"
    assert outs["two"].finished and outs["two"].error == SAMPLING_FAILED
    assert {c.index: c.finish_reason for c in outs["two"].outputs} == {0: "error", 1: "abort"}
    assert not op.has_unfinished_requests()
