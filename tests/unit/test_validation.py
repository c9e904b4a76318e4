"""serving/validation.py: every refusal names its field; good input passes through unchanged."""
from __future__ import annotations

import math

import pytest

from distinfer.sampling_params import SamplingParams
from distinfer.serving.validation import (
    DEFAULT_DRAIN_TIMEOUT_S,
    MAX_DRAIN_TIMEOUT_S,
    MAX_N,
    MAX_STOP_STRINGS,
    RequestValidationError,
    ServingLimits,
    build_sampling_params,
    validate_drain_timeout,
    validate_instance_id,
    validate_model_name,
    validate_request_id,
    validate_text_prompt,
    validate_token_ids,
)

LIMITS = ServingLimits(vocab_size=100, max_model_len=8)

BAD_SAMPLING = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": MAX_N + 1}, "n"),
    ({"min_p": 2.0}, "min_p"),
    ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # overflowed logits to inf and killed the sampler
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [100]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": True}, "n"),
    ({"beam_width": 2}, "beam_width"),
]


@pytest.mark.parametrize("fields,field", BAD_SAMPLING, ids=[f"{k}" for k, _ in BAD_SAMPLING])
def test_bad_sampling_names_the_field(fields, field):
    with pytest.raises(RequestValidationError) as info:
        build_sampling_params(LIMITS, **fields)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_good_sampling_and_defaults():
    assert build_sampling_params(LIMITS) == SamplingParams()
    params = build_sampling_params(LIMITS, temperature=0, max_tokens=4, stop="x", stop_token_ids=(3,), n=None)
    assert (params.max_tokens, params.stop, params.stop_token_ids, params.n) == (4, ["x"], [3], 1)


def test_prompts():
    assert validate_token_ids([1, 2, 3], LIMITS) == [1, 2, 3]
    for ids, needle in (([], "must not be empty"), ([1, 100], "[1] is 100, outside"), ([-1], "[0] is -1"),
                        (list(range(8)), "max_model_len")):
        with pytest.raises(RequestValidationError, match=r"^token_ids") as info:
            validate_token_ids(ids, LIMITS)
        assert needle in info.value.message
    assert validate_text_prompt("abc", LIMITS, lambda t: [1] * len(t)) == [1, 1, 1]
    with pytest.raises(RequestValidationError, match="^text must not be empty"):
        validate_text_prompt("", LIMITS, lambda t: [1])
    with pytest.raises(RequestValidationError, match="^text is 9 tokens long"):
        validate_text_prompt("x" * 9, LIMITS, lambda t: [1] * len(t))


def test_request_id_and_model():
    validate_request_id("")
    validate_request_id("abc-123")
    for bad in ("a\x1fb", "x" * 300, "tab\there"):
        with pytest.raises(RequestValidationError, match="^request_id"):
            validate_request_id(bad)
    validate_model_name("", "m")
    validate_model_name("m", "m")
    with pytest.raises(RequestValidationError, match="^model 'other' is not served"):
        validate_model_name("other", "m")


def test_with_path():
    error = RequestValidationError("stop", "stop[3] must be a non-empty string")
    moved = error.with_path("sampling_params.stop")
    assert (moved.field, moved.message) == ("sampling_params.stop", "sampling_params.stop[3] must be a non-empty string")


@pytest.mark.parametrize("instance_id", ["", "x" * 257, "instance-\n0", None, 3])
def test_bad_instance_id_names_the_field(instance_id):
    with pytest.raises(RequestValidationError, match=r"^instance_id "):
        validate_instance_id(instance_id)


@pytest.mark.parametrize("timeout_s", [-1.0, -1e-9, math.nan, math.inf, -math.inf, MAX_DRAIN_TIMEOUT_S + 0.5, True, "5"])
def test_bad_drain_timeout_names_the_field(timeout_s):
    with pytest.raises(RequestValidationError, match=r"^timeout_s "):
        validate_drain_timeout(timeout_s)


def test_good_drain_arguments_pass():
    assert validate_instance_id("instance-0") == "instance-0" and validate_instance_id("d" * 256) == "d" * 256
    assert validate_drain_timeout(None) == DEFAULT_DRAIN_TIMEOUT_S
    assert [validate_drain_timeout(t) for t in (0, 0.5, MAX_DRAIN_TIMEOUT_S)] == [0.0, 0.5, MAX_DRAIN_TIMEOUT_S]
