"""The scheduler's view of one sequence: tokens, progress, status."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distinfer.messages import EngineRequest, FinishReason
from distinfer.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after this line is finished (see is_finished).
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _STATUS_TO_REASON.get(self)

    @staticmethod
    def from_finish_reason(reason: FinishReason) -> "RequestStatus":
        return _REASON_TO_STATUS[reason]


_STATUS_TO_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
_REASON_TO_STATUS = {reason: status for status, reason in _STATUS_TO_REASON.items()}


@dataclass(eq=False)  # identity semantics: queues compare and remove by object
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first under the priority policy
    group_id: str | None = None  # shared by the n>1 siblings of one user request
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the blocks
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Tokens the workers already hold (prompt + outputs sent so far); 0: the workers never saw it.
    # Worker state survives preemption, so this is not reset then.
    num_synced_tokens: int = 0
    generator_state: bytes | None = None  # a migrated request's sampler state, until the workers have it

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must not be empty")

    @classmethod
    def from_engine_request(cls, request: EngineRequest, group_id: str | None = None) -> "Request":
        return cls(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling_params=request.sampling_params,
            arrival_time=request.arrival_time,
            priority=request.priority,
            group_id=group_id,
        )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def known_to_workers(self) -> bool:
        return self.num_synced_tokens > 0

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    def tokens_since_sync(self) -> list[int]:
        """Tokens appended since the workers last saw the request."""
        offset = self.num_synced_tokens - len(self.prompt_token_ids)
        if offset >= 0:
            return self.output_token_ids[offset:]
        return self.all_token_ids[self.num_synced_tokens:]
