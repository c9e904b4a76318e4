"""Scheduler: one token budget per step (vLLM v1 style), no separate prefill and decode phases.

Each step, running requests go first (in order), then waiting ones in policy order. A request
gets min(tokens it has not computed, remaining budget) tokens, so long prompts are chunked.
When blocks run out a running request is preempted: swapped out to the host KV tier (its blocks copied
there, progress kept) when the preemption policy says so and the tier has room, else recomputed (blocks
freed, progress reset). Block copies ride in SchedulerOutput.kv_ops and run before the step's forward.
The output is a diff against what the workers already hold (see messages.SchedulerOutput).

Invariants:
- num_computed_tokens only advances in update_from_output. Several steps may be in flight
  (pipeline parallel) over disjoint request sets: a request scheduled in a step that has not been
  updated yet is neither scheduled again nor preempted (its blocks are being written).
- A request preempted in a step is not scheduled again in that step.
- Finished requests leave `requests`, `waiting` and `running` and free their blocks at once;
  their ids reach the workers in the next SchedulerOutput.finished_req_ids.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from distinfer.config import CacheConfig, SchedulerConfig
from distinfer.engine.policies import make_policy, make_preemption_policy
from distinfer.engine.request import Request, RequestStatus
from distinfer.engine.scheduler_moves import SchedulerMoves
from distinfer.errors import QueueFullError
from distinfer.kv.manager import KVCacheManager
from distinfer.messages import (
    CachedRequestData,
    EngineCoreOutput,
    EngineStats,
    FinishReason,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)

logger = logging.getLogger(__name__)


@dataclass
class _StepState:
    """What one schedule() call has decided so far."""

    budget: int
    num_scheduled: dict[str, int] = field(default_factory=dict)  # in schedule order
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    resumed: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)

    def record(self, request_id: str, num_tokens: int, new_block_ids: list[int]) -> None:
        self.num_scheduled[request_id] = num_tokens
        self.new_block_ids[request_id] = new_block_ids
        self.budget -= num_tokens

    def unrecord(self, request_id: str) -> None:
        """Undo the scheduling of a request preempted later in the same step."""
        self.budget += self.num_scheduled.pop(request_id, 0)
        self.new_block_ids.pop(request_id, None)
        self.resumed.discard(request_id)


class Scheduler(SchedulerMoves):
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int, max_concurrent_batches: int = 1,
                 num_host_blocks: int = 0, kv_block_bytes: int = 0, sequence_parallel_size: int = 1) -> None:
        """`num_blocks` per rank; under sequence parallelism the pool holds every SP rank's (kv/manager.py)."""
        self.config = scheduler_config
        # Pipeline parallel keeps this many steps in flight; each then takes its share of the running
        # requests, so that in steady decoding every stage has a batch instead of one batch and idle stages.
        self.max_concurrent_batches = max_concurrent_batches
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        self.policy = make_policy(scheduler_config.policy)
        self.kv = KVCacheManager(num_blocks * sequence_parallel_size, cache_config.block_size,
                                 cache_config.enable_prefix_caching, max_model_len, num_host_blocks,
                                 num_partitions=sequence_parallel_size)
        self.preemption = make_preemption_policy(scheduler_config.preemption_mode, self.kv.host is not None)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: list[Request] = []  # WAITING and PREEMPTED, in policy order
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()  # to report in the next SchedulerOutput
        self._in_flight: set[str] = set()  # scheduled in a step whose output has not come back
        self._paused: set[str] = set()  # running but not scheduled: in the last stage of a move
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # computed tokens given up by recompute preemptions
        self.num_swapped_preemptions = 0
        self.kv_block_bytes = kv_block_bytes  # one block on every rank together (for the bytes-moved stats)

    # ------------------------------------------------------------------ queue

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        if request.num_tokens > self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting_requests} requests, "
                                 f"SchedulerConfig.max_waiting_requests)")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.policy.add_waiting(self.waiting, request)

    def finish_requests(self, request_ids: str | Iterable[str], finish_reason: FinishReason) -> None:
        """Finish requests from outside the step (abort, stop string); frees blocks at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        status = RequestStatus.from_finish_reason(finish_reason)
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                request.status = status
                self._release(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        """Anything to schedule (a request paused for a move is not: the loop may sleep)."""
        return len(self.waiting) + len(self.running) > len(self._paused)  # paused ones are among these

    def has_finished_requests(self) -> bool:
        """Finished ids not yet reported to the workers (an empty step still carries them)."""
        return bool(self._finished_req_ids)

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    def get_stats(self) -> EngineStats:
        stats = self.kv.prefix_cache_stats
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_blocks,
            prefix_cache_queries=stats.queries,
            prefix_cache_hits=stats.hits,
            num_preemptions=self.num_preemptions,
            num_queued_tokens=sum(r.num_tokens - r.num_computed_tokens for r in self.waiting),
            **self._host_stats(stats.host_hits),
        )

    def _host_stats(self, host_hit_tokens: int) -> dict[str, float | int]:
        host = self.kv.host
        if host is None:
            return {"num_recomputed_tokens": self.num_recomputed_tokens}
        moved = host.stats
        return dict(host_kv_cache_usage=host.usage, num_host_blocks=host.num_blocks,
                    num_free_host_blocks=host.num_free_blocks,
                    host_prefix_cache_hits=host_hit_tokens,
                    kv_bytes_to_host=(moved.swapped_out_blocks + moved.spilled_blocks) * self.kv_block_bytes,
                    kv_bytes_to_device=(moved.swapped_in_blocks + moved.hit_blocks) * self.kv_block_bytes,
                    num_swapped_preemptions=self.num_swapped_preemptions,
                    num_recomputed_tokens=self.num_recomputed_tokens)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        step = _StepState(budget=self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(step)
        return self._build_output(step)

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        num_computed = request.num_computed_tokens if num_computed is None else num_computed
        return min(request.num_tokens - num_computed, budget, self.max_model_len - num_computed)

    def _schedule_running(self, step: _StepState) -> None:
        share = -(-len(self.running) // self.max_concurrent_batches)  # ceil: the batches alternate
        for request in list(self.running):
            if step.budget <= 0 or len(step.num_scheduled) >= share:
                break
            if (request.status != RequestStatus.RUNNING or request.request_id in self._in_flight
                    or request.request_id in self._paused):
                continue  # preempted earlier in this step, its previous step is still running, or moving
            num_new = self._num_new_tokens(request, step.budget)
            if num_new <= 0:
                continue
            new_block_ids = self._allocate_or_preempt(request, num_new, step)
            if new_block_ids is not None:
                step.record(request.request_id, num_new, new_block_ids)

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _StepState) -> list[int] | None:
        """Allocate slots for a running request, preempting victims until it fits; None when the
        request itself was the victim."""
        while True:
            new_block_ids = self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new)
            if new_block_ids is not None:
                return new_block_ids
            victim = self._pick_victim()
            if victim is None:
                return None
            self._preempt(victim, step)
            if victim is request:
                return None

    def _schedule_waiting(self, step: _StepState) -> None:
        index = 0
        while index < len(self.waiting) and step.budget > 0:
            request = self.waiting[index]
            if request.request_id in step.preempted:
                break  # a victim keeps its place: nothing ranked after it jumps ahead this step
            if self._waits_for_sibling(request) or request.request_id in self._paused:
                index += 1  # a paused waiting request is being moved: it is not admitted here meanwhile
                continue
            if len(self.running) >= self.config.max_num_seqs and not self._preempt_for(request, step):
                break
            if not self._admit(request, step):
                break  # out of blocks: keep the queue order, try again next step

    def _admit(self, request: Request, step: _StepState) -> bool:
        """Move a waiting request to running with its first chunk scheduled; False (nothing changed, no copy
        planned) when its blocks cannot be found. A swapped-out request keeps its progress: its blocks come back
        from the host tier (less those still cached on the device)."""
        while True:
            prefix = self.kv.find_computed(request.request_id, request.all_token_ids, request.num_computed_tokens)
            num_new = self._num_new_tokens(request, step.budget, prefix.num_tokens)
            new_block_ids = self.kv.admit(request.request_id, prefix, prefix.num_tokens + num_new)
            if new_block_ids is not None:
                break
            if not self._preempt_for(request, step):  # a preemption changes both tiers: look up again
                return False
        request.num_computed_tokens = prefix.num_tokens
        self.waiting.remove(request)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.time()
            request.num_cached_tokens = prefix.num_tokens
        if request.known_to_workers:
            step.resumed.add(request.request_id)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        step.record(request.request_id, num_new, new_block_ids)
        return True

    def _waits_for_sibling(self, request: Request) -> bool:
        """An n>1 sibling waits while another sibling computes the shared prompt, so that it
        then hits the prefix cache instead of computing the prompt again."""
        if request.group_id is None or not self.kv.enable_prefix_caching:
            return False
        if (request.num_prompt_tokens - 1) // self.block_size == 0:
            return False  # no full block to share
        return any(other.group_id == request.group_id and other.num_computed_tokens < other.num_prompt_tokens
                   for other in self.running)

    def _preempt_for(self, request: Request, step: _StepState) -> bool:
        """Preempt one running request the policy lets `request` displace; False if none."""
        victim = self._pick_victim()
        if victim is None or not self.policy.may_preempt_for(request, victim):
            return False
        self._preempt(victim, step)
        return True

    def _pick_victim(self) -> Request | None:
        candidates = [r for r in self.running if r.request_id not in self._in_flight and r.request_id not in self._paused]
        return self.policy.pick_victim(candidates) if candidates else None

    def _preempt(self, victim: Request, step: _StepState) -> None:
        """Free the victim's device blocks, back to the waiting front: swapped out (the copy to the host
        runs before this step's forward, so a block reused in this step is read first; progress kept)
        or recomputed (progress reset)."""
        self.running.remove(victim)
        if self.preemption.swaps() and self.kv.swap_out(victim.request_id, victim.num_computed_tokens):
            self.num_swapped_preemptions += 1
        else:
            self.num_recomputed_tokens += victim.num_computed_tokens
            victim.num_computed_tokens = 0
        self.kv.free(victim.request_id)
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        step.unrecord(victim.request_id)
        step.preempted.add(victim.request_id)
        self.policy.add_waiting(self.waiting, victim, front=True)
        logger.debug("preempted request %s (%d tokens, preemption #%d)",
                     victim.request_id, victim.num_tokens, victim.num_preemptions)

    def _build_output(self, step: _StepState) -> SchedulerOutput:
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for request_id in step.num_scheduled:
            request = self.requests[request_id]
            if not request.known_to_workers:
                new_reqs.append(NewRequestData(
                    request_id, list(request.prompt_token_ids), request.sampling_params,
                    self.kv.get_block_ids(request_id), request.num_computed_tokens,
                    list(request.output_token_ids), request.generator_state))
                request.generator_state = None
            else:
                resumed = request_id in step.resumed
                block_ids = self.kv.get_block_ids(request_id) if resumed else step.new_block_ids[request_id]
                cached_reqs.append(CachedRequestData(
                    request_id, request.tokens_since_sync(), block_ids, request.num_computed_tokens, resumed))
            request.num_synced_tokens = request.num_tokens
        self._in_flight.update(step.num_scheduled)
        finished, self._finished_req_ids = self._finished_req_ids, set()
        preempted = {rid for rid in step.preempted if self.requests[rid].known_to_workers}
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=dict(step.num_scheduled),
            total_num_scheduled_tokens=sum(step.num_scheduled.values()),
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            kv_ops=self.kv.take_ops(),
        )

    # ------------------------------------------------------------------ update

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        self._in_flight.difference_update(scheduler_output.num_scheduled_tokens)
        index = {request_id: i for i, request_id in enumerate(model_runner_output.req_ids)}
        outputs: list[EngineCoreOutput] = []
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished (aborted) while the step ran
            error = model_runner_output.errors.get(request_id)
            if error is not None:  # this request alone could not be sampled: it ends, the others go on
                outputs.append(self._fail_request(request, error))
                continue
            i = index.get(request_id)
            sampled = model_runner_output.sampled_token_ids[i] if i is not None else []
            logprobs = model_runner_output.logprobs[i] if i is not None and model_runner_output.logprobs else None
            output = self._update_request(request, num_tokens, sampled, logprobs)
            if output is not None:
                outputs.append(output)
        return outputs

    def _update_request(self, request: Request, num_tokens: int, sampled: list[int],
                        logprobs: list[TokenLogprobs] | None) -> EngineCoreOutput | None:
        before = request.num_computed_tokens
        request.num_computed_tokens += num_tokens
        if request.num_computed_tokens // self.block_size > before // self.block_size:
            self.kv.cache_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)
        if sampled and request.num_computed_tokens < request.num_tokens:
            logger.warning("request %s: dropping %d tokens sampled from a partial prefill chunk",
                           request.request_id, len(sampled))
            sampled = []
        new_tokens: list[int] = []
        for token_id in sampled:
            request.output_token_ids.append(token_id)
            new_tokens.append(token_id)
            if self._check_stop(request):
                break
        if not new_tokens and not request.is_finished:
            return None
        if request.is_finished:
            self._release(request)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            new_logprobs=logprobs[:len(new_tokens)] if logprobs is not None else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _fail_request(self, request: Request, error: str) -> EngineCoreOutput:
        logger.warning("request %s failed: %s", request.request_id, error)
        request.status = RequestStatus.FINISHED_ERROR
        self._release(request)
        return EngineCoreOutput(request.request_id, [], finish_reason=FinishReason.ERROR,
                                num_cached_tokens=request.num_cached_tokens, error=error)

    def _check_stop(self, request: Request) -> bool:
        """Set a finished status after appending a token; stop tokens count once min_tokens is met."""
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens and token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id if token_id in params.stop_token_ids else None
            return True
        if ((params.max_tokens is not None and request.num_output_tokens >= params.max_tokens)
                or request.num_tokens >= self.max_model_len):
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _release(self, request: Request) -> None:
        """Drop a finished request everywhere and free its blocks now (a failed one's leave the prefix cache)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._paused.discard(request.request_id)
        self.kv.free(request.request_id, uncache=request.status == RequestStatus.FINISHED_ERROR)
        self.kv.free_host(request.request_id)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)
