"""SamplingParams: vLLM-compatible sampling options, validated at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# Ranges the sampler's tensors hold: seeds are int64 (torch.Generator), counts int32, and logits divided by
# any temperature up to MAX_TEMPERATURE stay finite float32 (above it sampling is uniform anyway).
MAX_TEMPERATURE = 1e6
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SamplingType(Enum):
    GREEDY = "greedy"
    RANDOM = "random"
    RANDOM_SEED = "random_seed"


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name} {message}")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_encodable(text: str) -> bool:
    """False for text holding a lone surrogate (JSON allows "\\ud800"; UTF-8 cannot carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def child_seed(seed: int, index: int) -> int:
    """The seed of sequence `index` of an n > 1 request: seed + index, wrapped into int64."""
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


@dataclass
class SamplingParams:
    """Options for one request. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # Filled in by the engine from the tokenizer; not a user option.
    eos_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            # Greedy ignores truncation; normalise so the sampler can batch greedy rows.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        _check(_is_int(self.n, 1, INT32_MAX), "n", f"must be an integer >= 1, got {self.n!r}")
        _check(_is_finite_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
               f"must be a finite number >= 0 and <= {MAX_TEMPERATURE:g}, got {self.temperature!r}")
        _check(_is_finite_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k, -1, INT32_MAX), "top_k", f"must be an integer >= -1 and <= {INT32_MAX} (0 or -1 disables), got {self.top_k!r}")
        _check(_is_finite_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or _is_int(self.seed, INT64_MIN, INT64_MAX), "seed",
               f"must be an integer in [-2^63, 2^63 - 1] or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_finite_number(value) and -2 <= value <= 2, name, f"must be a finite number in [-2, 2], got {value!r}")
        # Bounded so that dividing/multiplying logits by it can never overflow to inf.
        _check(_is_finite_number(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty", f"must be a finite number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty!r}")
        _check(self.max_tokens is None or _is_int(self.max_tokens, 1, INT32_MAX), "max_tokens", f"must be an integer >= 1 and <= {INT32_MAX}, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens, 0, INT32_MAX), "min_tokens", f"must be an integer >= 0 and <= {INT32_MAX}, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(all(isinstance(s, str) and s and is_encodable(s) for s in self.stop), "stop", "must be non-empty strings of valid Unicode")
        _check(all(_is_int(t, 0, INT32_MAX) for t in self.stop_token_ids), "stop_token_ids", "must be non-negative integers")
        _check(self.logprobs is None or _is_int(self.logprobs, 0, MAX_LOGPROBS), "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that finish the request (EOS unless ignored, plus stop_token_ids)."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids

    def clone(self, **changes: object) -> "SamplingParams":
        from dataclasses import replace

        return replace(self, **changes)
