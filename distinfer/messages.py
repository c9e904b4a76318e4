"""Every dataclass that crosses a layer or a process boundary.

Plain lists, ints and strings only (no tensors), so messages pickle cheaply to Ray workers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distinfer.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token id or stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"
    ERROR = "error"


@dataclass
class EngineRequest:
    """A request as it enters the engine: already tokenized and validated."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first under the priority policy (vLLM semantics)
    prompt: str | None = None


# ---------------------------------------------------------------- scheduler -> workers


class KVCopyDirection(str, enum.Enum):
    SWAP_OUT = "swap_out"  # device -> host
    SWAP_IN = "swap_in"  # host -> device


@dataclass
class KVBlockCopy:
    """Copy whole KV blocks between the device cache and the host tier, on every rank (its own layers)."""

    direction: KVCopyDirection
    device_block_ids: list[int]
    host_block_ids: list[int]  # same length; pairs (device_block_ids[i], host_block_ids[i])


@dataclass
class NewRequestData:
    """First time the workers see a request: everything needed to build its state."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the blocks (prefix-cache hits, or migrated)
    output_token_ids: list[int] = field(default_factory=list)  # a migrated request's tokens so far
    generator_state: bytes | None = None  # a migrated seeded request's sampler state (torch.Generator)


@dataclass
class CachedRequestData:
    """Per-step change to a request the workers already hold."""

    req_id: str
    new_token_ids: list[int]  # tokens appended (sampled) since the workers last saw the request
    new_block_ids: list[int]  # appended to the block table; the whole table when resumed
    num_computed_tokens: int
    resumed_from_preemption: bool = False


@dataclass
class SchedulerOutput:
    """One step for the workers, as a diff against the previous steps."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # workers drop these states
    preempted_req_ids: set[str] = field(default_factory=set)  # blocks freed; state kept
    kv_ops: list[KVBlockCopy] = field(default_factory=list)  # run in order, before the forward

    @property
    def is_empty(self) -> bool:
        """No tokens scheduled (there may still be kv_ops; see has_work)."""
        return self.total_num_scheduled_tokens == 0

    @property
    def has_work(self) -> bool:
        """Something for the workers to do: tokens to compute or KV blocks to copy."""
        return self.total_num_scheduled_tokens > 0 or bool(self.kv_ops)


# ---------------------------------------------------------------- workers -> scheduler


@dataclass
class TokenLogprobs:
    """Logprobs at one generated position: the sampled token plus the top-N alternatives."""

    sampled_token_id: int
    sampled_logprob: float
    sampled_rank: int  # 1-based rank of the sampled token in the distribution
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, one list per request in req_ids order (empty for partial prefill)."""

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None] | None = None
    # Requests that could not be sampled this step (non-finite logits, a sampler error) -> the reason,
    # safe to show the client. The scheduler ends each with FinishReason.ERROR; the others go on.
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What the scheduler reports for one request after a step (new tokens and/or finish)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id that finished it, if any
    num_cached_tokens: int = 0
    error: str | None = None  # why it finished with FinishReason.ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------- engine -> user


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What the user sees. In streaming (delta) mode text/token_ids hold only what is new."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # Set when the request failed inside the engine (finish_reason "error"); its other sequences were
    # aborted. AsyncLLM raises RequestFailedError with it instead of returning this output.
    error: str | None = None


@dataclass
class EngineStats:
    """Scheduler and cache counters, read by metrics and the router."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    # the host KV tier (zero without one)
    host_kv_cache_usage: float = 0.0
    num_host_blocks: int = 0
    host_prefix_cache_hits: int = 0  # tokens, of prefix_cache_hits, copied back from the host tier
    kv_bytes_to_host: int = 0  # swapped out + spilled, over every rank
    kv_bytes_to_device: int = 0  # swapped in + host prefix hits
    num_swapped_preemptions: int = 0  # of num_preemptions: swapped out (the rest recomputed)
    num_recomputed_tokens: int = 0  # computed tokens given up by recompute preemptions
    # load, for the router's dispatch
    num_queued_tokens: int = 0  # tokens the waiting requests still have to compute
    num_free_host_blocks: int = 0  # host blocks a swap-out could take now
    # moving requests between instances (engine.mover)
    num_migrated_in: int = 0  # requests committed here from another instance (moves, hand-offs, failovers)
    num_migrated_out: int = 0  # requests released here after they committed on another instance


# ---------------------------------------------------------------- migration (between engine instances)


@dataclass
class OutputSnapshot:
    """The output processor's state of one unfinished sequence: text so far and what the client has had."""

    output_kind: str  # RequestOutputKind value
    text: str | None  # None: decode the tokens again (failover: the router knows only what it delivered)
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    sent_tokens: int
    sent_chars: int
    sent_logprobs: int
    metrics: RequestMetrics


@dataclass
class RequestSnapshot:
    """Everything needed to resume a request on another engine instance (RequestSnapshot in the design):
    taken between steps, from each owner of request state. Its KV blocks travel beside it (per rank)."""

    request: EngineRequest  # as it entered: prompt, params, arrival, priority
    output_token_ids: list[int]
    num_computed_tokens: int  # tokens whose KV the blocks hold
    num_cached_tokens: int
    num_preemptions: int
    first_scheduled_time: float | None
    generator_state: bytes | None  # the sampling rank's torch.Generator state (seeded requests)
    output: OutputSnapshot

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids
