"""The offline LLM API on the real model: output shape, sampling features, validation."""
from __future__ import annotations

import math

import pytest
import torch

from distinfer import LLM, SamplingParams
from tests.conftest import hf_greedy


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", max_model_len=2048)


def test_string_and_token_prompts_give_same_output_and_fields(llm, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=8)
    by_text = llm.generate("The capital of France is", params)[0]
    by_ids = llm.generate([tokenizer.encode("The capital of France is")], params)[0]
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == tokenizer.encode("The capital of France is")
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == tokenizer.decode(by_text.outputs[0].token_ids, skip_special_tokens=True)
    assert by_text.finished and by_text.outputs[0].finish_reason in ("length", "stop")
    metrics = by_text.metrics
    assert metrics.first_token_time >= metrics.arrival_time and metrics.num_generation_tokens == len(by_text.outputs[0].token_ids)


def test_max_tokens_gives_length_and_eos_gives_stop(llm, tokenizer):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == tokenizer.eos_token_id


def test_chat_uses_the_chat_template(llm, tokenizer, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12))[0]
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_prompt = list(expected_prompt["input_ids"] if hasattr(expected_prompt, "keys") else expected_prompt)
    assert out.prompt_token_ids == expected_prompt
    assert out.outputs[0].token_ids == hf_greedy(hf_model, expected_prompt, 12)


def test_stop_string_truncates_and_reports(llm):
    params = SamplingParams(temperature=0, max_tokens=40, stop=[","], ignore_eos=True)
    out = llm.generate("Count: 1, 2, 3,", params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ","
    assert "," not in out.text


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    again = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 3
    batch = llm.generate(["A long time ago", "Once upon a time", "Hello there", "def f(x):"], [others[0], params, others[1], others[2]])
    assert alone == again == batch[1].outputs[0].token_ids


def test_n_samples_share_the_prompt_blocks(llm):
    before = llm.engine.get_stats().prefix_cache_hits
    prompt = "Write a list of fruits: " + "apple, banana, cherry, " * 10
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "children use different seeds"
    assert llm.engine.get_stats().prefix_cache_hits - before >= 2 * 16, "siblings reuse the prompt's full blocks"


def test_logprobs_match_transformers(llm, tokenizer, hf_model):
    prompt_ids = tokenizer.encode("The capital of France is")
    out = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    with torch.inference_mode():
        expected = torch.log_softmax(hf_model(torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
    top = torch.topk(expected, 5)
    entry = out.logprobs[0]
    assert set(top.indices.tolist()) <= set(entry)
    for token_id, logprob in zip(top.indices.tolist(), top.values.tolist()):
        assert math.isclose(entry[token_id].logprob, logprob, abs_tol=1e-3)
    assert entry[out.token_ids[0]].rank == 1


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ("", SamplingParams(), "prompt"),
        ([10**9], SamplingParams(), "prompt_token_ids"),
        ([1] * 5000, SamplingParams(), "max_model_len"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, params)
    assert llm.engine.get_stats().num_running == 0 and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"min_p": 2}, "min_p"),
        ({"logprobs": 1000}, "logprobs"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
