"""Per-request state a worker keeps between steps, updated only from SchedulerOutput diffs.

Workers never append their own samples: every token reaches them through the scheduler's
`new_token_ids`, so every rank (any TP/PP position) holds the same state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distinfer.messages import CachedRequestData, NewRequestData, SchedulerOutput
from distinfer.sampling_params import SamplingParams
from distinfer.worker.sampler import SamplingRow, make_generator


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs

    @classmethod
    def from_new(cls, new: NewRequestData) -> "CachedRequestState":
        generator = make_generator(new.sampling_params.seed)
        if generator is not None and new.generator_state is not None:  # a migrated request goes on drawing
            generator.set_state(torch.frombuffer(bytearray(new.generator_state), dtype=torch.uint8))
        return cls(
            req_id=new.req_id,
            prompt_token_ids=list(new.prompt_token_ids),
            sampling_params=new.sampling_params,
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            generator=generator,
            output_token_ids=list(new.output_token_ids),
            token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
        )

    def apply(self, diff: CachedRequestData) -> None:
        self.output_token_ids.extend(diff.new_token_ids)
        self.token_ids.extend(diff.new_token_ids)
        if diff.resumed_from_preemption:
            self.block_ids = list(diff.new_block_ids)
        else:
            self.block_ids.extend(diff.new_block_ids)
        self.num_computed_tokens = diff.num_computed_tokens

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(self.sampling_params, self.prompt_token_ids, self.output_token_ids, self.generator)


@dataclass
class StepInputs:
    """Plain-list view of one step, in batch order; tensors are built from it by the runner."""

    req_ids: list[str]
    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # batch indices of requests that sample this step

    @property
    def is_pure_decode(self) -> bool:
        return len(self.input_ids) == len(self.req_ids)


class InputBatch:
    """All request states of one worker."""

    def __init__(self) -> None:
        self.states: dict[str, CachedRequestState] = {}

    def update(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.states.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.states[new.req_id] = CachedRequestState.from_new(new)
        for diff in scheduler_output.scheduled_cached_reqs:
            self.states[diff.req_id].apply(diff)

    def prepare(self, scheduler_output: SchedulerOutput) -> StepInputs:
        inputs = StepInputs([], [], [], [], [], [], [])
        for index, (req_id, num_tokens) in enumerate(scheduler_output.num_scheduled_tokens.items()):
            state = self.states[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_tokens
            if end > len(state.token_ids):
                raise RuntimeError(f"request {req_id}: scheduled up to token {end} but only {len(state.token_ids)} known")
            inputs.req_ids.append(req_id)
            inputs.input_ids.extend(state.token_ids[start:end])
            inputs.positions.extend(range(start, end))
            inputs.query_lens.append(num_tokens)
            inputs.seq_lens.append(end)
            inputs.block_tables.append(state.block_ids)
            if end == len(state.token_ids):
                inputs.sample_rows.append(index)
        return inputs
