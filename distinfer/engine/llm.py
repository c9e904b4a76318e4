"""LLM: the offline batch API (vLLM-compatible names)."""
from __future__ import annotations

import itertools
import logging
import sys
from typing import Any, Sequence

from tqdm import tqdm

from distinfer.config import CacheConfig, DistInferConfig, ModelConfig, ParallelConfig, SchedulerConfig
from distinfer.engine.engine import LLMEngine
from distinfer.engine.input_processor import PromptType
from distinfer.engine.output_processor import RequestOutputKind
from distinfer.messages import RequestOutput
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def build_config(
    model: str | None = None,
    *,
    tokenizer: str | None = None,
    dtype: str = "auto",
    load_format: str = "auto",
    max_model_len: int | None = None,
    seed: int = 0,
    device: str = "auto",
    attention_backend: str = "auto",
    enforce_eager: bool = False,
    max_num_seqs: int = 128,
    max_num_batched_tokens: int = 2048,
    scheduling_policy: str = "fcfs",
    max_waiting_requests: int = 4096,
    step_timeout_s: float = 120.0,
    preemption_mode: str = "auto",
    block_size: int = 16,
    num_kv_blocks: int | None = None,
    kv_cache_bytes: int = 2 << 30,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.9,
    kv_offloading_size: float = 0.0,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    pipeline_layer_partition: Sequence[int] | str | None = None,
) -> DistInferConfig:
    """One place that maps the flat keyword API (LLM, AsyncLLM, CLI) onto the config tree."""
    return DistInferConfig(
        model=ModelConfig(model, tokenizer, dtype, load_format, max_model_len, seed, device, attention_backend,
                          enforce_eager),
        cache=CacheConfig(block_size, num_kv_blocks, kv_cache_bytes, enable_prefix_caching, gpu_memory_utilization,
                          kv_offloading_size),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, scheduling_policy, max_waiting_requests,
                                  step_timeout_s, preemption_mode),
        parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size, sequence_parallel_size,
                                pipeline_layer_partition),
    )


class LLM:
    """`LLM(model=None, dtype=..., ...)`; `generate(prompts, sampling_params)`; `chat(messages)`."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(build_config(model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        # Validate every prompt before any is queued, so a bad one leaves nothing behind.
        requests = [
            self.engine.input_processor.process(str(next(self._counter)), prompt, params, priority=prio)
            for prompt, params, prio in zip(prompt_list, params_list, priorities)
        ]
        for request in requests:
            self.engine.add_processed_request(request, RequestOutputKind.FINAL_ONLY)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.apply_chat_template(conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ------------------------------------------------------------ helpers

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not (use_tqdm and sys.stderr.isatty()))
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    @staticmethod
    def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(p, int) for p in prompts):
            return [prompts]  # a single token-id list
        return prompts

    @staticmethod
    def _as_params_list(params, count: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"sampling_params has {len(params)} entries but there are {count} prompts")
        return params
