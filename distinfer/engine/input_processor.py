"""Turns a user prompt + SamplingParams into a validated EngineRequest (ValueError names the field)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union

from distinfer.messages import EngineRequest
from distinfer.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict]


@dataclass
class ModelLimits:
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer, limits: ModelLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._check_token_ids(token_ids)
        params = params.clone(eos_token_ids=list(self.limits.eos_token_ids))
        self._check_stop_token_ids(params.stop_token_ids)
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        return EngineRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            priority=priority,
            prompt=text,
        )

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.limits.vocab_size
        for token_id in token_ids:
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab:
                raise ValueError(f"prompt_token_ids contains {token_id!r}, outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.limits.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.limits.max_model_len}: "
                "shorten the prompt (at least one token must be left to generate)"
            )

    def _check_stop_token_ids(self, stop_token_ids: list[int]) -> None:
        for token_id in stop_token_ids:
            if token_id >= self.limits.vocab_size:
                raise ValueError(f"stop_token_ids contains {token_id}, outside the vocabulary [0, {self.limits.vocab_size})")
