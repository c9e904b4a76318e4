"""OutputProcessor: EngineCoreOutputs (token ids) -> RequestOutputs (text, logprobs, metrics).

Runs in the engine process next to the scheduler. Per request it detokenizes incrementally, checks
stop strings (the engine then aborts the request in the scheduler), holds back text that may start a
stop string while streaming, and fans a request with n > 1 out into n child requests whose
completions report into one parent RequestOutput (outputs[i].index == i).
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from distinfer.engine.detokenizer import (
    IncrementalDetokenizer,
    TokenDecoder,
    find_stop_string,
    new_detokenizer,
    partial_stop_len,
)
from distinfer.messages import (
    CompletionOutput,
    EngineCoreOutput,
    EngineRequest,
    FinishReason,
    Logprob,
    OutputSnapshot,
    RequestMetrics,
    RequestOutput,
    TokenLogprobs,
)
from distinfer.sampling_params import SamplingParams, child_seed

logger = logging.getLogger(__name__)

# Child ids are f"{parent_id}{CHILD_ID_SEP}{index}"; user ids may not contain the separator,
# so a child id can never equal a user id (nor another parent's child id).
CHILD_ID_SEP = "\x1f"


def child_request_id(parent_id: str, index: int) -> str:
    return f"{parent_id}{CHILD_ID_SEP}{index}"


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries everything generated so far
    DELTA = "delta"  # every output carries only what is new since the previous one
    FINAL_ONLY = "final_only"  # one output, when the request (all n children) finished


DETOKENIZE_FAILED = "internal error while detokenizing (details are in the server log)"


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput] = field(default_factory=list)
    reqs_to_abort: list[str] = field(default_factory=list)  # internal ids a stop string finished
    reqs_to_fail: list[str] = field(default_factory=list)  # internal ids ended by an error here (or a sibling's)


def _to_logprob_dict(lp: TokenLogprobs, decode: TokenDecoder | None) -> dict[int, Logprob]:
    """Sampled token first (its own rank), then the top-N alternatives ranked 1..N."""
    def text(token_id: int) -> str | None:
        return decode(token_id) if decode is not None else None

    entry = {lp.sampled_token_id: Logprob(lp.sampled_logprob, lp.sampled_rank, text(lp.sampled_token_id))}
    for rank, (token_id, value) in enumerate(zip(lp.top_token_ids, lp.top_logprobs), start=1):
        entry.setdefault(token_id, Logprob(value, rank, text(token_id)))
    return entry


class _ChildState:
    """One sequence of a request: its tokens, text, logprobs and what was already sent (DELTA)."""

    def __init__(self, req_id: str, index: int, params: SamplingParams, detok: IncrementalDetokenizer | None, decode: TokenDecoder | None) -> None:
        self.req_id, self.index, self.params = req_id, index, params
        self.detok = detok
        self.decode = decode if params.detokenize else None
        self.stops: list[str] = list(params.stop) if detok is not None else []  # type: ignore[arg-type]
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.sent_tokens = self.sent_chars = self.sent_logprobs = 0
        self.dirty = False  # changed since the last RequestOutput

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: EngineCoreOutput) -> int:
        """Apply one step's output; returns the number of tokens kept. Stop strings finish the child."""
        stopped_by_token = out.finish_reason == FinishReason.STOP
        last = len(out.new_token_ids) - 1
        for j, token_id in enumerate(out.new_token_ids):
            self._append_token(token_id, out.new_logprobs[j] if out.new_logprobs else None)
            # Like vLLM, the stop token itself is not detokenized unless asked to.
            if self.detok is None or (stopped_by_token and j == last and not self.params.include_stop_str_in_output):
                continue
            piece = self.detok.decode_next(token_id)
            self.text += piece
            if piece and len(self.token_ids) > self.params.min_tokens and self._check_stop(len(piece)):
                return j + 1
        if out.finish_reason is not None:
            self.finish(out.finish_reason.value, out.stop_reason)
        return len(out.new_token_ids)

    def fail(self, reason: str) -> None:
        self.finish(FinishReason.ERROR.value, None)
        self.error = reason

    def _append_token(self, token_id: int, lp: TokenLogprobs | None) -> None:
        self.token_ids.append(token_id)
        self.dirty = True
        if self.logprobs is not None and lp is not None:
            self.logprobs.append(_to_logprob_dict(lp, self.decode))
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + lp.sampled_logprob

    def _check_stop(self, new_chars: int) -> bool:
        hit = find_stop_string(self.text, new_chars, self.stops, self.params.include_stop_str_in_output)
        if hit is None:
            return False
        stop, keep = hit
        self.text = self.text[:keep]
        self.finish(FinishReason.STOP.value, stop)
        return True

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.dirty = True

    def _visible_len(self) -> int:
        """Text the user may see: all of it once finished, else minus a possible stop-string start."""
        if self.finished or not self.stops or self.params.include_stop_str_in_output:
            return len(self.text)
        return len(self.text) - partial_stop_len(self.text, self.stops)

    def completion(self, delta: bool) -> CompletionOutput:
        visible = self._visible_len()
        if delta:
            text = self.text[self.sent_chars:visible]
            token_ids = self.token_ids[self.sent_tokens:]
            logprobs = self.logprobs[self.sent_logprobs:] if self.logprobs is not None else None
        else:
            text, token_ids = self.text[:visible], list(self.token_ids)
            logprobs = list(self.logprobs) if self.logprobs is not None else None
        self.sent_chars, self.sent_tokens = max(self.sent_chars, visible), len(self.token_ids)
        self.sent_logprobs = len(self.logprobs) if self.logprobs is not None else 0
        self.dirty = False
        return CompletionOutput(self.index, text, token_ids, self.cumulative_logprob, logprobs, self.finish_reason, self.stop_reason)


class _ParentState:
    """A user request: its children, output kind and metrics."""

    def __init__(self, request: EngineRequest, kind: RequestOutputKind, children: list[_ChildState]) -> None:
        self.request, self.kind, self.children = request, kind, children
        self.metrics = RequestMetrics(arrival_time=request.arrival_time, num_prompt_tokens=len(request.prompt_token_ids))

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)

    @property
    def error(self) -> str | None:
        return next((c.error for c in self.children if c.error is not None), None)

    def record(self, out: EngineCoreOutput, num_new_tokens: int, now: float) -> None:
        m = self.metrics
        m.num_cached_tokens = max(m.num_cached_tokens, out.num_cached_tokens)
        if num_new_tokens:
            m.num_generation_tokens += num_new_tokens
            m.first_token_time = m.first_token_time if m.first_token_time is not None else now
            m.last_token_time = now
        if self.finished:
            m.finished_time = now

    def make_output(self) -> RequestOutput | None:
        finished = self.finished
        if not any(c.dirty for c in self.children) or (self.kind == RequestOutputKind.FINAL_ONLY and not finished):
            return None
        if self.kind == RequestOutputKind.DELTA:
            outputs = [c.completion(delta=True) for c in self.children if c.dirty]
        else:
            outputs = [c.completion(delta=False) for c in self.children]
        req = self.request
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished,
                             replace(self.metrics), self.metrics.num_cached_tokens, self.error)


class OutputProcessor:
    """Turns scheduler outputs into user-facing RequestOutputs; owns per-request text state."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._decode = TokenDecoder(tokenizer) if tokenizer is not None else None
        self._parents: dict[str, _ParentState] = {}
        self._children: dict[str, tuple[_ParentState, _ChildState]] = {}  # unfinished children only

    def add_request(self, request: EngineRequest, output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> list[EngineRequest]:
        """Track a request; returns the EngineRequests to schedule (n children when n > 1)."""
        rid, params = request.request_id, request.sampling_params
        if CHILD_ID_SEP in rid:
            raise ValueError(f"request_id must not contain {CHILD_ID_SEP!r}, got {rid!r}")
        if rid in self._parents:
            raise ValueError(f"request_id {rid!r} is already in use")
        if params.n == 1:
            engine_reqs = [request]
        else:
            engine_reqs = [replace(request, request_id=child_request_id(rid, i), sampling_params=self._child_params(params, i))
                           for i in range(params.n)]
        children = [self._new_child(r, i) for i, r in enumerate(engine_reqs)]
        parent = _ParentState(request, output_kind, children)
        self._parents[rid] = parent
        for child in children:
            self._children[child.req_id] = (parent, child)
        return engine_reqs

    @staticmethod
    def _child_params(params: SamplingParams, index: int) -> SamplingParams:
        seed = child_seed(params.seed, index) if params.seed is not None else None
        return params.clone(n=1, seed=seed)

    def _new_child(self, request: EngineRequest, index: int) -> _ChildState:
        params = request.sampling_params
        detok = None
        if params.detokenize and self.tokenizer is not None:
            detok = new_detokenizer(self.tokenizer, request.prompt_token_ids, params)
        return _ChildState(request.request_id, index, params, detok, self._decode)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Apply one step of scheduler outputs; returns RequestOutputs and ids to abort."""
        result = ProcessedOutputs()
        touched: dict[str, _ParentState] = {}
        now = time.time()
        for out in outputs:
            entry = self._children.get(out.request_id)
            if entry is None:  # unknown, aborted, or finished by a stop string a step earlier
                continue
            parent, child = entry
            kept = self._update_child(child, out, result)
            if child.finished:
                del self._children[child.req_id]
                if out.finish_reason is None and child.error is None:  # a stop string ended it: the scheduler must too
                    result.reqs_to_abort.append(child.req_id)
            if child.error is not None:  # one sequence failed: the whole request ends with its error
                result.reqs_to_fail.extend(self._abort_siblings(parent))
            parent.record(out, kept, now)
            touched[parent.request.request_id] = parent
        for rid, parent in touched.items():
            request_output = parent.make_output()
            if request_output is not None:
                result.request_outputs.append(request_output)
            if parent.finished:
                del self._parents[rid]
        return result

    @staticmethod
    def _update_child(child: _ChildState, out: EngineCoreOutput, result: ProcessedOutputs) -> int:
        """Apply one output; an error here (or reported by the scheduler) ends this child alone."""
        if out.finish_reason == FinishReason.ERROR:
            child.fail(out.error or "internal error")
            return 0
        try:
            return child.update(out)
        except Exception:
            logger.exception("detokenizing request %s failed", child.req_id)
            child.fail(DETOKENIZE_FAILED)
            result.reqs_to_fail.append(child.req_id)  # the scheduler still runs it
            return 0

    def _abort_siblings(self, parent: _ParentState) -> list[str]:
        """End the unfinished siblings of a failed sequence; returns their internal ids."""
        ids = []
        for sibling in parent.children:
            if not sibling.finished:
                sibling.finish(FinishReason.ABORT.value, None)
                self._children.pop(sibling.req_id, None)
                ids.append(sibling.req_id)
        return ids

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Drop user requests; returns the internal ids the scheduler must abort."""
        internal: list[str] = []
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            for child in parent.children:
                if self._children.pop(child.req_id, None) is not None:
                    internal.append(child.req_id)
        return internal

    def check_movable(self, request_id: str) -> None:
        """Raise unless the request is unfinished here and has one sequence (only those move)."""
        parent = self._parents.get(request_id)
        if parent is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        if len(parent.children) != 1:
            raise ValueError(f"request {request_id!r} has n={len(parent.children)} sequences; only n=1 moves")

    def snapshot(self, request_id: str) -> tuple[EngineRequest, OutputSnapshot]:
        """The state of an unfinished single-sequence request, to resume it on another instance."""
        self.check_movable(request_id)
        parent = self._parents[request_id]
        child = parent.children[0]
        snapshot = OutputSnapshot(parent.kind.value, child.text, list(child.logprobs) if child.logprobs is not None
                                  else None, child.cumulative_logprob, child.sent_tokens, child.sent_chars,
                                  child.sent_logprobs, replace(parent.metrics))
        return parent.request, snapshot

    def import_request(self, request: EngineRequest, token_ids: list[int], snapshot: OutputSnapshot) -> None:
        """Go on with a request exported by another instance: its detokenizer is rebuilt by decoding its
        tokens again (the same pieces), then the exported text (if any: a failover has only the tokens) and
        delivery counters take over."""
        if request.request_id in self._parents:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.sampling_params.n != 1:
            raise ValueError("only requests with n=1 move between instances")
        child = self._new_child(request, 0)
        replayed = []
        for token_id in token_ids:
            child.token_ids.append(token_id)
            if child.detok is not None:
                replayed.append(child.detok.decode_next(token_id))
        child.text = snapshot.text if snapshot.text is not None else "".join(replayed)
        child.logprobs, child.cumulative_logprob = snapshot.logprobs, snapshot.cumulative_logprob
        child.sent_tokens, child.sent_chars, child.sent_logprobs = snapshot.sent_tokens, snapshot.sent_chars, snapshot.sent_logprobs
        parent = _ParentState(request, RequestOutputKind(snapshot.output_kind), [child])
        parent.metrics = replace(snapshot.metrics)
        self._parents[request.request_id] = parent
        self._children[child.req_id] = (parent, child)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)
