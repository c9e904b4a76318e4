"""Bad input over gRPC: each gets INVALID_ARGUMENT with a message naming the field, never reaches the
step loop, and the server serves a good request right after."""
from __future__ import annotations

import math

import grpc
import pytest

from distinfer import AsyncLLM
from distinfer.client import Client, InvalidArgumentError, NotFoundError
from distinfer.serving.grpc_codec import raw_message_class
from distinfer.serving.grpc_server import GrpcServerThread
from distinfer.v1 import inference_pb2 as pb

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=128)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with GrpcServerThread(engine, model_name="smollm2") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def still_serving(engine, client):
    """After every bad request: the engine lives and a good request works."""
    yield
    assert not engine.is_dead
    result = client.generate("Hello", temperature=0, max_tokens=2)
    assert len(result.token_ids) == 2 and result.finish_reason == "length"


BAD = [
    # (case id, prompt, generate kwargs, field the message must start with, words it must contain)
    ("empty-text", "", {}, "text", "must not be empty"),
    ("empty-token-ids", [], {}, "token_ids.ids", "must not be empty"),
    ("text-longer-than-context", "hello " * 400, {}, "text", "max_model_len"),
    ("ids-longer-than-context", [42] * MAX_MODEL_LEN, {}, "token_ids.ids", "max_model_len"),
    ("token-id-outside-vocab", [1, 10**9], {}, "token_ids.ids[1]", "outside the vocabulary"),
    ("max-tokens-zero", "Hi", {"max_tokens": 0}, "sampling_params.max_tokens", ">= 1"),
    ("max-tokens-negative", "Hi", {"max_tokens": -5}, "sampling_params.max_tokens", ">= 1"),
    ("temperature-negative", "Hi", {"temperature": -0.5}, "sampling_params.temperature", ">= 0"),
    ("temperature-nan", "Hi", {"temperature": math.nan}, "sampling_params.temperature", "nan"),
    ("top-p-zero", "Hi", {"top_p": 0.0}, "sampling_params.top_p", "(0, 1]"),
    ("top-p-above-one", "Hi", {"top_p": 1.5}, "sampling_params.top_p", "(0, 1]"),
    ("top-k-below-minus-one", "Hi", {"top_k": -2}, "sampling_params.top_k", ">= -1"),
    ("n-zero", "Hi", {"n": 0}, "sampling_params.n", "[1, 16]"),
    ("n-huge", "Hi", {"n": 100000}, "sampling_params.n", "[1, 16]"),
    ("too-many-stop-strings", "Hi", {"stop": [f"s{i}" for i in range(17)]}, "sampling_params.stop", "at most 16"),
    ("empty-stop-string", "Hi", {"stop": ["ok", ""]}, "sampling_params.stop[1]", "non-empty"),
    ("stop-token-outside-vocab", "Hi", {"stop_token_ids": [10**8]}, "sampling_params.stop_token_ids[0]", "vocabulary"),
    ("logprobs-too-many", "Hi", {"logprobs": 50}, "sampling_params.logprobs", "[0, 20]"),
    ("min-tokens-above-max", "Hi", {"min_tokens": 9, "max_tokens": 3}, "sampling_params.min_tokens", "max_tokens"),
    ("repetition-penalty-tiny", "Hi", {"repetition_penalty": 1e-300, "temperature": 1.0},
     "sampling_params.repetition_penalty", "[0.01, 100]"),
    ("penalty-infinite", "Hi", {"presence_penalty": math.inf}, "sampling_params.presence_penalty", "finite"),
    ("request-id-control-char", "Hi", {"request_id": "a\x1fb"}, "request_id", "printable"),
]


@pytest.mark.parametrize("prompt,kwargs,field,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(client, prompt, kwargs, field, words):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(prompt, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(field), info.value.details
    assert words in info.value.details


def _send_raw(server, message) -> grpc.RpcError:
    """Send bytes a well-behaved client could not: string fields holding invalid UTF-8."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream("/distinfer.v1.InferenceService/Generate", request_serializer=bytes,
                                    response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(call(message.SerializeToString(), timeout=30))
    return info.value


def test_a_model_not_served_here_is_not_found(client):
    """As HTTP answers 404 model_not_found: gRPC NOT_FOUND naming the field and the served model."""
    with pytest.raises(NotFoundError, match="^NOT_FOUND: model 'gpt-17' is not served here; this server serves") as info:
        client.generate("Hi", model="gpt-17")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("where", ["text", "stop", "request_id"])
def test_invalid_utf8_is_invalid_argument_not_internal(server, where):
    raw_request, raw_params = raw_message_class("GenerateRequest"), raw_message_class("SamplingParams")
    bad = b"caf\xc3"  # truncated UTF-8 sequence
    message = {
        "text": raw_request(text=bad),
        "stop": raw_request(text=b"Hi", sampling_params=raw_params(stop=[b"ok", bad])),
        "request_id": raw_request(request_id=bad, text=b"Hi"),
    }[where]
    error = _send_raw(server, message)
    expected_field = {"text": "text", "stop": "sampling_params.stop[1]", "request_id": "request_id"}[where]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(expected_field) and "UTF-8" in error.details()


def test_missing_prompt_is_invalid_argument(server):
    error = _send_raw(server, pb.GenerateRequest(request_id="no-input"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("input is not set")


def test_garbage_bytes_are_invalid_argument(server):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/distinfer.v1.InferenceService/Tokenize", request_serializer=bytes,
                                   response_deserializer=pb.TokenizeResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff", timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TokenizeRequest" in info.value.details()


def test_unknown_sampling_option_is_refused_by_the_client(client):
    with pytest.raises(TypeError, match="beam_width"):
        client.generate("Hi", beam_width=4)
