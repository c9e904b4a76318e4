"""The public API's generated code is current, buf-lint clean, and covers every sampling option;
the codec's conversions and invalid-UTF-8 diagnosis; the client SDK imports without torch."""
from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distinfer.messages import CompletionOutput, Logprob, RequestOutput
from distinfer.sampling_params import SamplingParams
from distinfer.serving.grpc_codec import (
    StreamState,
    UndecodableRequest,
    explain_decode_failure,
    raw_message_class,
    safe_deserializer,
    sampling_fields,
    to_responses,
    to_sampling_params,
)
from distinfer.serving.validation import RequestValidationError, ServingLimits
from distinfer.v1 import inference_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["distinfer/v1/inference_pb2.py", "distinfer/v1/inference_pb2.pyi", "distinfer/v1/inference_pb2_grpc.py"]
LIMITS = ServingLimits(vocab_size=1000, max_model_len=64)


def test_checked_in_code_matches_regenerated(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for rel in GENERATED:
        fresh, checked_in = (tmp_path / rel).read_text(), (REPO / rel).read_text()
        assert fresh == checked_in, f"{rel} is stale: run `python protos/generate.py` and commit the result"


def _buf() -> str | None:
    for candidate in (shutil.which("buf"), "/tmp/buf/node_modules/.bin/buf", str(REPO / ".tools/node_modules/.bin/buf"), str(REPO / "node_modules/.bin/buf")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def test_buf_lint_clean():
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (npm install --prefix /tmp/buf @bufbuild/buf)")
    result = subprocess.run([buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_proto_covers_every_user_sampling_option():
    user_fields = {f.name for f in dataclasses.fields(SamplingParams)} - {"eos_token_ids"}
    assert set(pb.SamplingParams.DESCRIPTOR.fields_by_name) == user_fields


def test_client_sdk_imports_without_torch():
    code = "import sys, distinfer.client; assert 'torch' not in sys.modules, 'torch imported'; " \
           "assert 'distinfer.engine' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_sampling_fields_keep_only_what_was_set():
    params = pb.SamplingParams(temperature=0.0, max_tokens=5, stop=["x"], ignore_eos=True)
    assert sampling_fields(params) == {"temperature": 0.0, "max_tokens": 5, "stop": ["x"], "ignore_eos": True}
    assert sampling_fields(pb.SamplingParams()) == {}
    converted = to_sampling_params(params, LIMITS)
    assert (converted.temperature, converted.max_tokens, converted.stop, converted.ignore_eos) == (0.0, 5, ["x"], True)
    assert to_sampling_params(pb.SamplingParams(), LIMITS) == SamplingParams()


def test_sampling_errors_carry_the_proto_path():
    with pytest.raises(RequestValidationError, match=r"^sampling_params\.top_p must be in \(0, 1\]") as info:
        to_sampling_params(pb.SamplingParams(top_p=0.0), LIMITS)
    assert info.value.field == "sampling_params.top_p"


def test_invalid_utf8_is_located():
    raw_request, raw_params = raw_message_class("GenerateRequest"), raw_message_class("SamplingParams")
    data = raw_request(text=b"ok", sampling_params=raw_params(stop=[b"fine", b"bad\xff"])).SerializeToString()
    decoded = safe_deserializer(pb.GenerateRequest)(data)
    assert isinstance(decoded, UndecodableRequest)
    assert decoded.error.field == "sampling_params.stop[1]"
    assert "not valid UTF-8" in decoded.error.message
    assert explain_decode_failure("GenerateRequest", b"\xff\xff\xff").field == "request"
    good = pb.GenerateRequest(text="héllo").SerializeToString()
    assert safe_deserializer(pb.GenerateRequest)(good).text == "héllo"


def _output(outputs: list[CompletionOutput], finished: bool) -> RequestOutput:
    return RequestOutput("r", None, [1, 2, 3], outputs, finished, num_cached_tokens=2)


def test_responses_for_n_sequences_with_usage_last():
    state = StreamState("r", n=2)
    first = to_responses(_output([CompletionOutput(0, "a", [5]), CompletionOutput(1, "b", [6])], False), state)
    assert [(r.index, r.text, list(r.token_ids)) for r in first] == [(0, "a", [5]), (1, "b", [6])]
    assert not any(r.HasField("usage") for r in first)
    last = to_responses(_output([CompletionOutput(0, "", [2], finish_reason="stop", stop_reason=None),
                                 CompletionOutput(1, "c", [7], finish_reason="stop", stop_reason="c")], True), state)
    assert [r.finish_reason for r in last] == [pb.FINISH_REASON_STOP] * 2
    assert last[1].stop_string == "c" and last[0].WhichOneof("stop_reason") is None
    assert last[-1].usage == pb.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, cached_tokens=2)


def test_abort_ends_every_open_sequence():
    state = StreamState("r", n=3)
    to_responses(_output([CompletionOutput(1, "x", [9], finish_reason="length")], False), state)
    last = to_responses(_output([CompletionOutput(0, "", [], finish_reason="abort")], True), state)
    assert sorted((r.index, r.finish_reason) for r in last) == [(0, pb.FINISH_REASON_ABORT), (2, pb.FINISH_REASON_ABORT)]
    assert last[-1].HasField("usage")


def test_logprobs_and_stop_token():
    lp = [{7: Logprob(-0.5, 1, "x"), 3: Logprob(-1.5, 2, "y")}]
    out = CompletionOutput(0, "x", [7], cumulative_logprob=-0.5, logprobs=lp, finish_reason="stop", stop_reason=7)
    (resp,) = to_responses(_output([out], True), StreamState("r", n=1))
    assert [(e.token_id, e.rank, e.decoded_token) for e in resp.logprobs[0].entries] == [(7, 1, "x"), (3, 2, "y")]
    assert math.isclose(resp.logprobs[0].entries[1].logprob, -1.5) and resp.stop_token_id == 7
    assert math.isclose(resp.cumulative_logprob, -0.5)
