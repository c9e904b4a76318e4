"""Request validation at the serving edge, shared by the gRPC and HTTP front ends.

Everything here works on plain Python values (no protobuf, no HTTP types, no torch), so a bad request
is refused with a message naming the field before it reaches the engine's step loop. Every
`RequestValidationError` message starts with the field's name; front ends may prefix a path
(`error.with_path("sampling_params.temperature")`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from distinfer.sampling_params import SamplingParams, is_encodable

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
MAX_INSTANCE_ID_CHARS = 256
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # DrainInstance without timeout_s (RouterEngine.drain_instance's default)
MAX_DRAIN_TIMEOUT_S = 3600.0

# SamplingParams fields a client may set, with the type each must have.
SAMPLING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "n": int, "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float),
    "seed": int, "presence_penalty": (int, float), "frequency_penalty": (int, float),
    "repetition_penalty": (int, float), "max_tokens": int, "min_tokens": int, "stop": (str, list, tuple),
    "stop_token_ids": (list, tuple), "ignore_eos": bool, "include_stop_str_in_output": bool,
    "logprobs": int, "skip_special_tokens": bool, "spaces_between_special_tokens": bool, "detokenize": bool,
}


class RequestValidationError(ValueError):
    """A bad request. `field` names the offending input; the message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def with_path(self, path: str) -> "RequestValidationError":
        """The same error with `field` replaced by `path` in the message (e.g. a proto field path)."""
        if self.message.startswith(self.field):
            return type(self)(path, path + self.message[len(self.field):])
        return type(self)(path, f"{path}: {self.message}")


class UnknownModelError(RequestValidationError):
    """The request names a model this server does not serve (gRPC NOT_FOUND, HTTP 404)."""


@dataclass(frozen=True)
class ServingLimits:
    """What the served model accepts."""

    vocab_size: int
    max_model_len: int
    max_prompt_chars: int | None = None  # characters of one prompt text; None: unbounded


def _fail(field: str, message: str) -> None:
    """Raise with a message that starts with the field (`message` may start with an index: "[3] is")."""
    raise RequestValidationError(field, f"{field}{'' if message.startswith('[') else ' '}{message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_request_id(request_id: str) -> None:
    """Ids are at most MAX_REQUEST_ID_CHARS printable characters (empty: the server picks one)."""
    if not isinstance(request_id, str):
        _fail("request_id", f"must be a string, got {type(request_id).__name__}")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        _fail("request_id", f"must have at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not request_id.isprintable():
        _fail("request_id", f"must contain printable characters only, got {request_id!r}")


def validate_instance_id(instance_id: Any) -> str:
    """An engine instance id (admin calls): 1 to MAX_INSTANCE_ID_CHARS printable characters."""
    if not isinstance(instance_id, str):
        _fail("instance_id", f"must be a string, got {type(instance_id).__name__}")
    if not instance_id:
        _fail("instance_id", "must not be empty: give an id from GetServerInfo.instances")
    if len(instance_id) > MAX_INSTANCE_ID_CHARS:
        _fail("instance_id", f"must have at most {MAX_INSTANCE_ID_CHARS} characters, got {len(instance_id)}")
    if not instance_id.isprintable():
        _fail("instance_id", f"must contain printable characters only, got {instance_id!r}")
    return instance_id


def validate_drain_timeout(timeout_s: Any) -> float:
    """Seconds a drain may wait, in [0, MAX_DRAIN_TIMEOUT_S]; None means DEFAULT_DRAIN_TIMEOUT_S."""
    if timeout_s is None:
        return DEFAULT_DRAIN_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        _fail("timeout_s", f"must be a number, got {type(timeout_s).__name__}")
    if not math.isfinite(timeout_s) or not 0 <= timeout_s <= MAX_DRAIN_TIMEOUT_S:
        _fail("timeout_s", f"must be in [0, {MAX_DRAIN_TIMEOUT_S:g}] seconds, got {timeout_s}")
    return float(timeout_s)


def validate_model_name(requested: str | None, served: str) -> None:
    """Empty or None means the served model; any other name must be the served one."""
    if requested and requested != served:
        raise UnknownModelError("model", f"model {requested!r} is not served here; this server serves {served!r}")


def validate_token_ids(token_ids: Sequence[int], limits: ServingLimits, field: str = "token_ids") -> list[int]:
    """A non-empty prompt of ids inside the vocabulary that leaves room for one generated token."""
    ids = list(token_ids)
    if not ids:
        _fail(field, "must not be empty")
    for i, token_id in enumerate(ids):
        if not _is_int(token_id) or not 0 <= token_id < limits.vocab_size:
            _fail(field, f"[{i}] is {token_id!r}, outside the vocabulary [0, {limits.vocab_size})")
    check_prompt_length(len(ids), limits, field)
    return ids


def check_prompt_length(num_tokens: int, limits: ServingLimits, field: str) -> None:
    if num_tokens >= limits.max_model_len:
        _fail(field, f"is {num_tokens} tokens long but the context (max_model_len) is {limits.max_model_len} "
              "tokens: shorten the prompt (at least one token must be left to generate)")


def check_fits_context(num_prompt_tokens: int, max_tokens: int | None, limits: ServingLimits,
                       field: str = "max_tokens") -> None:
    """The prompt plus max_tokens must fit the context (as vLLM and OpenAI: no silent capping)."""
    room = limits.max_model_len - num_prompt_tokens
    if max_tokens is not None and max_tokens > room:
        _fail(field, f"is {max_tokens} but the prompt has {num_prompt_tokens} tokens and the context "
              f"(max_model_len) is {limits.max_model_len} tokens: at most {room} can be generated; "
              f"lower {field} or shorten the prompt")


def check_text(text: Any, limits: ServingLimits, field: str = "text") -> str:
    """A non-empty string of valid Unicode within the prompt-size limit (checked before tokenizing)."""
    if not isinstance(text, str):
        _fail(field, f"must be a string, got {type(text).__name__}")
    if not text:
        _fail(field, "must not be empty")
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        _fail(field, f"has {len(text)} characters; at most {limits.max_prompt_chars} are allowed (a longer "
              "text cannot fit the context)")
    if not is_encodable(text):
        _fail(field, "is not valid Unicode (it holds a lone surrogate)")
    return text


def validate_text_prompt(text: str, limits: ServingLimits, tokenize: Callable[[str], list[int]], field: str = "text") -> list[int]:
    """Check a text prompt (check_text), tokenize it and check that it fits the context."""
    return tokenize_checked_text(check_text(text, limits, field), limits, tokenize, field)


def tokenize_checked_text(text: str, limits: ServingLimits, tokenize: Callable[[str], list[int]],
                          field: str = "text") -> list[int]:
    """Tokenize a text that passed check_text and check that it fits the context: the front ends check
    on the event loop, then run this on a worker thread."""
    ids = list(tokenize(text))
    if not ids:
        _fail(field, "must not be empty (it has no tokens)")
    check_prompt_length(len(ids), limits, field)
    return ids


def _check_types(fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if name not in SAMPLING_FIELDS:
            _fail(name, f"is not a sampling parameter; known: {', '.join(sorted(SAMPLING_FIELDS))}")
        if value is None:
            continue
        expected = SAMPLING_FIELDS[name]
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            _fail(name, f"has the wrong type {type(value).__name__}")


def _check_limits(fields: dict[str, Any], limits: ServingLimits) -> None:
    """Bounds of the serving edge beyond what SamplingParams itself checks."""
    n = fields.get("n")
    if n is not None and not 1 <= n <= MAX_N:
        _fail("n", f"must be in [1, {MAX_N}], got {n}")
    stop = fields.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if len(stop) > MAX_STOP_STRINGS:
        _fail("stop", f"has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS or not is_encodable(s):
            _fail("stop", f"[{i}] must be a non-empty string of valid Unicode of at most {MAX_STOP_STRING_CHARS} "
                  f"characters, got {s!r}")
    stop_ids = list(fields.get("stop_token_ids") or [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        _fail("stop_token_ids", f"has {len(stop_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    for i, token_id in enumerate(stop_ids):
        if not _is_int(token_id) or not 0 <= token_id < limits.vocab_size:
            _fail("stop_token_ids", f"[{i}] is {token_id!r}, outside the vocabulary [0, {limits.vocab_size})")


def build_sampling_params(limits: ServingLimits, **fields: Any) -> SamplingParams:
    """SamplingParams from the fields a client set (None or absent: the engine's default)."""
    _check_types(fields)
    _check_limits(fields, limits)
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items() if v is not None}
    try:
        return SamplingParams(**given)
    except ValueError as exc:  # SamplingParams names the field first
        message = str(exc)
        raise RequestValidationError(message.split(" ", 1)[0], message) from None
