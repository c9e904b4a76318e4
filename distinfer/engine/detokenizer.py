"""Incremental detokenization and stop-string matching, per request.

A fast (Rust) tokenizer streams through `tokenizers.decoders.DecodeStream`, which buffers tokens until
they form complete UTF-8, so a multi-byte character split over several tokens is emitted once, whole.
Other tokenizers use vLLM's prefix/read-offset scheme over convert_ids_to_tokens / convert_tokens_to_string.
Both are primed with the end of the prompt so the first generated token decodes in context (e.g. the
leading space of SentencePiece tokens). Final text equals `tokenizer.decode(output_ids, skip_special_tokens=...)`.
`spaces_between_special_tokens` applies on the slow path, as in vLLM and as `decode` of a fast
tokenizer ignores it.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from tokenizers.decoders import DecodeStream

from distinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
_INVALID_PREFIX_ERR = "Invalid prefix encountered"
_PROMPT_CONTEXT_MIN, _PROMPT_CONTEXT_MAX = 4, 24  # prompt tokens used to prime the fast stream
_SLOW_PREFIX_TOKENS = 5  # vLLM's initial incremental detokenization offset


class IncrementalDetokenizer(ABC):
    """Turns generated token ids, one at a time, into text pieces that concatenate to the output."""

    @abstractmethod
    def decode_next(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""


def is_fast_tokenizer(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "backend_tokenizer")


def new_detokenizer(tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams, *, force_slow: bool = False) -> IncrementalDetokenizer:
    """The fast streaming detokenizer when the tokenizer allows it, else the offset-based one."""
    if is_fast_tokenizer(tokenizer) and not force_slow:
        return FastIncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
    return SlowIncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens)


class FastIncrementalDetokenizer(IncrementalDetokenizer):
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip_special = skip_special_tokens
        self._stream = DecodeStream(ids=self._prompt_context(prompt_token_ids), skip_special_tokens=skip_special_tokens)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """A short prompt suffix that decodes cleanly (no half characters), as vLLM does."""
        if len(prompt_token_ids) <= _PROMPT_CONTEXT_MIN:
            return list(prompt_token_ids)
        for i in range(_PROMPT_CONTEXT_MIN, min(len(prompt_token_ids), _PROMPT_CONTEXT_MAX) + 1):
            suffix = prompt_token_ids[-i:]
            if _REPLACEMENT not in self._backend.decode(suffix, skip_special_tokens=self._skip_special):
                return suffix
        return prompt_token_ids[-_PROMPT_CONTEXT_MAX:]

    def decode_next(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception as exc:  # the stream rejects a prefix that no longer decodes the same way
            if not str(exc).startswith(_INVALID_PREFIX_ERR):
                raise
            logger.warning("Invalid prefix in decode stream; resetting it")
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            return self._stream.step(self._backend, token_id) or ""


class SlowIncrementalDetokenizer(IncrementalDetokenizer):
    """vLLM's detokenize_incrementally: decode a small token window and emit the new suffix."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool, spaces_between_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        self._special = set(tokenizer.all_special_tokens)
        self._added = set(tokenizer.get_added_vocab())
        context = prompt_token_ids[-(_SLOW_PREFIX_TOKENS + 1):]
        self._tokens: list[str] = tokenizer.convert_ids_to_tokens(context, skip_special_tokens=skip_special_tokens)
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - _SLOW_PREFIX_TOKENS, 0)

    def _to_string(self, tokens: list[str]) -> str:
        """convert_tokens_to_string, keeping added tokens as separate pieces (joined by spaces or not)."""
        pieces: list[str] = []
        run: list[str] = []
        for token in tokens:
            if self._skip_special and token in self._special:
                continue
            if token in self._added:
                if run:
                    pieces.append(self._tok.convert_tokens_to_string(run))
                    run = []
                pieces.append(token)
            else:
                run.append(token)
        if run:
            pieces.append(self._tok.convert_tokens_to_string(run))
        return (" " if self._spaces else "").join(pieces)

    def decode_next(self, token_id: int) -> str:
        self._tokens.extend(self._tok.convert_ids_to_tokens([token_id], skip_special_tokens=self._skip_special))
        prefix_text = self._to_string(self._tokens[self._prefix_offset:self._read_offset])
        new_text = self._to_string(self._tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text):]


class TokenDecoder:
    """Decodes single tokens (for logprobs' decoded_token), cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tok.decode([token_id])
        return text


def find_stop_string(text: str, new_chars: int, stops: list[str], include_stop: bool) -> tuple[str, int] | None:
    """Earliest stop string that ends inside the last `new_chars` characters of `text`.

    Returns (stop string, length to truncate the text to), or None.
    """
    if not stops or new_chars <= 0:
        return None
    best: tuple[int, str] | None = None
    for stop in stops:
        # Start where a match would end on the first new character: older text was already checked.
        pos = text.find(stop, max(0, len(text) - new_chars - (len(stop) - 1)))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return None
    pos, stop = best
    return stop, pos + len(stop) if include_stop else pos


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
