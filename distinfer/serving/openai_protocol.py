"""OpenAI request bodies (pydantic) and their mapping onto SamplingParams; response pieces as dicts.

Unknown fields are ignored (like the OpenAI API does for forward compatibility); fields we cannot
honour (echo, suffix, logit_bias, tools, non-text response formats) are refused with a 400 naming
them rather than silently dropped.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from distinfer.messages import Logprob, RequestOutput
from distinfer.sampling_params import MAX_LOGPROBS, SamplingParams, is_encodable
from distinfer.serving.validation import MAX_N, ServingLimits, build_sampling_params

MAX_PROMPTS = 64  # prompts in one /v1/completions batch
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity


class OpenAIRequestError(ValueError):
    """A 400 for a field the schema accepts but the request may not use."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False


class _SamplingRequest(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    priority: int = 0

    def _sampling_params(self, limits: ServingLimits, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Shared limits and types (validation.py), then SamplingParams; errors name the field."""
        if self.logit_bias:
            raise OpenAIRequestError("logit_bias", "is not supported")
        fields = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
        )
        params = build_sampling_params(limits, **fields)
        # Absent max_tokens means "until the context ends" (the engine fills it in), not 16.
        return params if max_tokens is not None else params.clone(max_tokens=None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def max_tokens_field(self) -> str:
        """The name under which the client gave its token budget (for error messages)."""
        return "max_tokens"


PromptInput = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16  # the OpenAI default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise OpenAIRequestError("prompt", "must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise OpenAIRequestError("prompt", f"may hold at most {MAX_PROMPTS} prompts, got {len(prompts)}")
        return prompts

    def to_sampling_params(self, limits: ServingLimits) -> SamplingParams:
        if self.echo:
            raise OpenAIRequestError("echo", "is not supported")
        if self.suffix:
            raise OpenAIRequestError("suffix", "is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIRequestError("best_of", "is not supported (other than best_of == n)")
        return self._sampling_params(limits, self.max_tokens, self.logprobs)


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        conversation = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise OpenAIRequestError(f"messages[{i}].content", "only text parts are supported")
                content = "".join(part.text or "" for part in content)
            conversation.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
        return conversation

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, limits: ServingLimits) -> SamplingParams:
        if self.tools:
            raise OpenAIRequestError("tools", "are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIRequestError("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs and not self.logprobs:
            raise OpenAIRequestError("top_logprobs", "requires logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(limits, max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


def check_unicode(body: BaseModel) -> None:
    """400 naming the first string of the body that is not valid Unicode: JSON may carry a lone surrogate
    ("\\ud800"), which no tokenizer, stop-string match or UTF-8 response can hold."""
    path = _first_unencodable(body, "")
    if path is not None:
        raise OpenAIRequestError(path, "is not valid Unicode (it holds a lone surrogate)")


def _first_unencodable(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return None if is_encodable(value) else (path or "body")
    if isinstance(value, BaseModel):
        items: Any = ((f"{path}.{k}" if path else k, v) for k, v in value.__dict__.items())
    elif isinstance(value, dict):
        items = [(f"{path}.{k}", k) for k in value] + [(f"{path}.{k}", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) and value and not isinstance(value[0], int):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:  # numbers, None, and token-id lists (typed list[int]: nothing to check)
        return None
    return next((found for p, v in items if (found := _first_unencodable(v, p)) is not None), None)


# ---------------------------------------------------------------- responses


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _top(entries: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(((t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= num), key=lambda e: e[1].rank)
    return ranked[:num]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num: int, text_offset: int) -> dict:
    """The /v1/completions `logprobs` object for a run of tokens starting at `text_offset`."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id, Logprob(float("-inf")))
        token = sampled.decoded_token or ""
        tokens.append(token)
        token_logprobs.append(_finite(sampled.logprob))
        top_logprobs.append({lp.decoded_token or "": _finite(lp.logprob) for _, lp in _top(entries, num)} or None)
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num: int) -> dict:
    """The /v1/chat/completions `logprobs` object: {"content": [...]} per generated token."""
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id, Logprob(float("-inf")))
        entry = _chat_entry(sampled.decoded_token or "", sampled.logprob)
        entry["top_logprobs"] = [_chat_entry(lp.decoded_token or "", lp.logprob) for _, lp in _top(entries, num)]
        content.append(entry)
    return {"content": content}


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Choice:
    """One output sequence (prompt i, completion j) as it accumulates."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ResponseBuilder:
    """Turns deltas into OpenAI completion or chat objects (full responses and stream chunks)."""

    def __init__(self, model_name: str, chat: bool, request_id: str, n: int, num_logprobs: int | None) -> None:
        self.model_name, self.chat, self.id, self.n, self.num_logprobs = model_name, chat, request_id, n, num_logprobs
        self.object = "chat.completion" if chat else "text_completion"
        self.choices: dict[int, Choice] = {}
        self.prompt_tokens = self.cached_tokens = 0

    def add(self, prompt_index: int, out: RequestOutput, first: bool) -> list[tuple[int, Any, Choice]]:
        """Record a delta; returns (choice index, completion delta, choice state) per touched choice."""
        if first:
            self.prompt_tokens += len(out.prompt_token_ids)
        if out.finished:
            self.cached_tokens += out.num_cached_tokens
        touched = []
        for completion in out.outputs:
            index = prompt_index * self.n + completion.index
            choice = self.choices.setdefault(index, Choice())
            choice.text.append(completion.text)
            choice.num_tokens += len(completion.token_ids)
            choice.token_ids += completion.token_ids
            choice.logprobs += completion.logprobs or []
            choice.finish_reason = completion.finish_reason or choice.finish_reason
            choice.stop_reason = completion.stop_reason if completion.finish_reason else choice.stop_reason
            touched.append((index, completion, choice))
        return touched

    def logprobs(self, token_ids: list[int], logprobs: list | None, text_offset: int) -> dict | None:
        if self.num_logprobs is None or logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.num_logprobs)
        return completion_logprobs(token_ids, logprobs, self.num_logprobs, text_offset)

    def usage(self) -> dict:
        completion_tokens = sum(c.num_tokens for c in self.choices.values())
        return usage_body(self.prompt_tokens, completion_tokens, self.cached_tokens)

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": choices}

    def full_choice(self, index: int, choice: Choice) -> dict:
        text = "".join(choice.text)
        body: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
                                "logprobs": self.logprobs(choice.token_ids, choice.logprobs, 0)}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["text"] = text
        return body

    def delta_choice(self, index: int, completion: Any, choice: Choice) -> dict | None:
        text, finish = completion.text, completion.finish_reason
        if not text and not finish and not completion.token_ids:
            return None
        offset = choice.num_chars
        choice.num_chars += len(text)
        body: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": self.logprobs(completion.token_ids, completion.logprobs, offset)}
        if finish:
            body["stop_reason"] = completion.stop_reason
        if self.chat:
            body["delta"] = {"content": text} if text else {}
        else:
            body["text"] = text
        return body
