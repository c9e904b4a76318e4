"""Protobuf <-> engine conversions for the gRPC server, and safe request decoding.

A proto3 `string` cannot carry invalid UTF-8: protobuf refuses to parse such a message, and grpcio
would answer INTERNAL ("Exception deserializing request!"). The server decodes requests itself with
`safe_deserializer`: on a parse failure it re-reads the bytes with a copy of the schema whose strings
are `bytes`, finds the field holding invalid UTF-8, and the handler answers INVALID_ARGUMENT naming it.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.protobuf.descriptor import FieldDescriptor

from distinfer.messages import RequestOutput
from distinfer.serving.validation import RequestValidationError, ServingLimits, build_sampling_params
from distinfer.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


@dataclass
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse; `error` says why, naming the field."""

    error: RequestValidationError


# ---------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=1)
def _raw_pool() -> descriptor_pool.DescriptorPool:
    """A private pool holding distinfer.v1 with every `string` field turned into `bytes`."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    for msg in proto.message_type:
        for f in msg.field:
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


def raw_message_class(name: str) -> type[message.Message]:
    """The bytes-for-strings twin of distinfer.v1.<name>: same wire format, no UTF-8 check.

    Tests use it to send what a misbehaving client could (raw bytes in a string field)."""
    return message_factory.GetMessageClass(_raw_pool().FindMessageTypeByName(f"distinfer.v1.{name}"))


def _find_invalid_utf8(msg: message.Message, prefix: str = "") -> tuple[str, UnicodeDecodeError] | None:
    for fd, value in msg.ListFields():
        path = f"{prefix}{fd.name}"
        repeated = fd.is_repeated
        items = list(value) if repeated else [value]
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]" if repeated else path
            if fd.type == FieldDescriptor.TYPE_BYTES:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return item_path, exc
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                found = _find_invalid_utf8(item, item_path + ".")
                if found is not None:
                    return found
    return None


def explain_decode_failure(message_name: str, data: bytes) -> RequestValidationError:
    """Why `data` is not a valid distinfer.v1.<message_name>, naming the field when it can."""
    try:
        raw = raw_message_class(message_name).FromString(data)
    except message.DecodeError:
        return RequestValidationError("request", f"request is not a valid {message_name} message")
    found = _find_invalid_utf8(raw)
    if found is None:
        return RequestValidationError("request", f"request is not a valid {message_name} message")
    path, exc = found
    return RequestValidationError(path, f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})")


def safe_deserializer(cls: type[message.Message]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: undecodable bytes become an UndecodableRequest."""
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except message.DecodeError:
            error = explain_decode_failure(cls.DESCRIPTOR.name, data)
            logger.debug("refused an undecodable %s: %s", cls.DESCRIPTOR.name, error.message)
            return UndecodableRequest(error)

    return deserialize


# ---------------------------------------------------------------- requests


def sampling_fields(params: pb.SamplingParams) -> dict[str, Any]:
    """The sampling fields a client set, as plain Python values (unset optionals are left out)."""
    fields: dict[str, Any] = {}
    for fd in params.DESCRIPTOR.fields:
        if fd.is_repeated:
            values = list(getattr(params, fd.name))
            if values:
                fields[fd.name] = values
        elif fd.has_presence:
            if params.HasField(fd.name):
                fields[fd.name] = getattr(params, fd.name)
        elif getattr(params, fd.name):  # plain bools: only `true` differs from the default
            fields[fd.name] = getattr(params, fd.name)
    return fields


def to_sampling_params(params: pb.SamplingParams, limits: ServingLimits):
    try:
        return build_sampling_params(limits, **sampling_fields(params))
    except RequestValidationError as exc:
        raise exc.with_path(f"sampling_params.{exc.field}") from None


# ---------------------------------------------------------------- responses


@dataclass
class StreamState:
    """What one Generate stream has sent so far."""

    request_id: str
    n: int
    finished: set[int] = field(default_factory=set)
    completion_tokens: int = 0


def _logprobs(entries: list[dict]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(entries=[
            pb.TokenLogprob(token_id=token_id, logprob=lp.logprob, rank=lp.rank or 0, decoded_token=lp.decoded_token or "")
            for token_id, lp in position.items()
        ])
        for position in entries
    ]


def _response(request_id: str, completion: Any) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=request_id, index=completion.index, token_ids=completion.token_ids,
                               text=completion.text)
    if completion.logprobs:
        resp.logprobs.extend(_logprobs(completion.logprobs))
    if completion.cumulative_logprob is not None:
        resp.cumulative_logprob = completion.cumulative_logprob
    if completion.finish_reason is not None:
        resp.finish_reason = FINISH_REASONS.get(completion.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        stop = completion.stop_reason
        if isinstance(stop, str):
            resp.stop_string = stop
        elif isinstance(stop, int) and not isinstance(stop, bool):
            resp.stop_token_id = stop
    return resp


def to_responses(output: RequestOutput, state: StreamState) -> list[pb.GenerateResponse]:
    """One GenerateResponse per sequence delta; the last message of the stream carries the usage.

    An aborted request reports its abort once; every sequence still open then ends with ABORT."""
    responses: list[pb.GenerateResponse] = []
    for completion in output.outputs:
        if completion.index in state.finished:
            continue
        state.completion_tokens += len(completion.token_ids)
        responses.append(_response(state.request_id, completion))
        if completion.finish_reason is not None:
            state.finished.add(completion.index)
    if output.finished:
        aborted = any(c.finish_reason == "abort" for c in output.outputs)
        for index in range(state.n):
            if index not in state.finished:
                reason = pb.FINISH_REASON_ABORT if aborted else pb.FINISH_REASON_UNSPECIFIED
                responses.append(pb.GenerateResponse(request_id=state.request_id, index=index, finish_reason=reason))
                state.finished.add(index)
        if not responses:
            responses.append(pb.GenerateResponse(request_id=state.request_id))
        prompt_tokens = len(output.prompt_token_ids)
        responses[-1].usage.CopyFrom(pb.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=state.completion_tokens,
            total_tokens=prompt_tokens + state.completion_tokens, cached_tokens=output.num_cached_tokens))
    return responses
