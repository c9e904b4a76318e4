"""Plain dataclasses the client returns (converted from the distinfer.v1 protobuf messages)."""
from __future__ import annotations

from dataclasses import dataclass, field

from distinfer.v1 import inference_pb2 as pb

_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class GenerateDelta:
    """What one streamed message adds to sequence `index` of a request."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[list[TokenLogprob]] | None = None  # per token: the sampled one first, then the top-N
    finish_reason: str | None = None  # "stop", "length", "abort"; None while the sequence runs
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    usage: Usage | None = None  # on the last message of the stream only

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> "GenerateDelta":
        which = msg.WhichOneof("stop_reason")
        return cls(
            request_id=msg.request_id,
            index=msg.index,
            text=msg.text,
            token_ids=list(msg.token_ids),
            logprobs=[[TokenLogprob(e.token_id, e.logprob, e.rank, e.decoded_token) for e in p.entries]
                      for p in msg.logprobs] or None,
            finish_reason=_FINISH_REASONS.get(msg.finish_reason),
            stop_reason=getattr(msg, which) if which else None,
            cumulative_logprob=msg.cumulative_logprob if msg.HasField("cumulative_logprob") else None,
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.total_tokens,
                        msg.usage.cached_tokens) if msg.HasField("usage") else None,
        )


@dataclass
class Completion:
    """One finished sequence of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None

    def add(self, delta: GenerateDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class GenerateResult:
    """A whole request: `outputs[i]` is sequence i (n > 1); `text` etc. are those of sequence 0."""

    request_id: str
    outputs: list[Completion]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[list[TokenLogprob]] | None:
        return self.outputs[0].logprobs


class ResultBuilder:
    """Accumulates streamed deltas into a GenerateResult."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._outputs: dict[int, Completion] = {}
        self.usage: Usage | None = None

    def add(self, delta: GenerateDelta) -> None:
        self.request_id = delta.request_id or self.request_id
        self._outputs.setdefault(delta.index, Completion(delta.index)).add(delta)
        if delta.usage is not None:
            self.usage = delta.usage

    def result(self) -> GenerateResult:
        outputs = [self._outputs[i] for i in sorted(self._outputs)] or [Completion(0)]
        return GenerateResult(self.request_id, outputs, self.usage)


@dataclass
class ModelInfo:
    model_name: str
    model_type: str
    max_model_len: int
    vocab_size: int
    dtype: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    max_logprobs: int
    max_n: int
    max_stop_strings: int
    has_chat_template: bool

    @classmethod
    def from_proto(cls, msg: pb.GetModelInfoResponse) -> "ModelInfo":
        return cls(msg.model_name, msg.model_type, msg.max_model_len, msg.vocab_size, msg.dtype,
                   list(msg.eos_token_ids), msg.bos_token_id if msg.HasField("bos_token_id") else None,
                   msg.max_logprobs, msg.max_n, msg.max_stop_strings, msg.has_chat_template)


@dataclass
class ParallelConfig:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    sequence_parallel_size: int
    world_size: int


@dataclass
class Load:
    num_running: int
    num_waiting: int
    num_pending: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


def _load(load: pb.Load) -> Load:
    return Load(load.num_running, load.num_waiting, load.num_pending, load.kv_cache_usage, load.num_free_blocks,
                load.num_total_blocks, load.prefix_cache_queries, load.prefix_cache_hits, load.num_preemptions)


@dataclass
class InstanceStatus:
    """One engine instance behind the server's router (ServerInfo.instances)."""

    instance_id: str
    draining: bool
    load: Load  # its num_pending counts its running and waiting requests


@dataclass
class ServerInfo:
    version: str
    model_name: str
    parallel_config: ParallelConfig
    load: Load
    max_pending_requests: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    draining: bool
    dead: bool
    uptime_seconds: float
    instances: list[InstanceStatus] = field(default_factory=list)  # empty: a single engine

    @classmethod
    def from_proto(cls, msg: pb.GetServerInfoResponse) -> "ServerInfo":
        p = msg.parallel_config
        return cls(
            msg.version, msg.model_name,
            ParallelConfig(p.tensor_parallel_size, p.pipeline_parallel_size, p.sequence_parallel_size, p.world_size),
            _load(msg.load), msg.max_pending_requests, msg.max_num_seqs, msg.max_num_batched_tokens, msg.block_size,
            msg.draining, msg.dead, msg.uptime_seconds,
            [InstanceStatus(i.instance_id, i.draining, _load(i.load)) for i in msg.instances])


@dataclass
class DrainResult:
    """What DrainInstance did: requests moved to other instances, those still on it (0: removable), and
    those that ended where they were while their move was under way."""

    instance_id: str
    moved: int
    remaining: int
    finished_in_place: int = 0

    @classmethod
    def from_proto(cls, msg: pb.DrainInstanceResponse) -> "DrainResult":
        return cls(msg.instance_id, msg.moved, msg.remaining, msg.finished_in_place)


@dataclass
class TokenizeResult:
    token_ids: list[int]
    tokens: list[str]
    max_model_len: int
