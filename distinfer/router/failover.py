"""Failover: when an instance dies, each of its requests resumes on another instance by computing again its
prompt plus the tokens its caller already received (no KV survives the instance). The resumed request
samples on from there: greedy and seeded outputs are the ones it would have produced (a seeded request's
generator is advanced by one draw per token already sampled, as the sampler draws), and its caller gets
nothing twice (the snapshot says what was delivered: tokens, text, logprobs)."""
from __future__ import annotations

from distinfer.messages import OutputSnapshot, RequestMetrics, RequestSnapshot
from distinfer.router.state import Delivered, RequestStream
from distinfer.sampling_params import SamplingType
from distinfer.worker.sampler import generator_state_after


def resume_snapshot(stream: RequestStream) -> RequestSnapshot:
    """The snapshot a request resumes from elsewhere, made from what the router delivered (n = 1 only)."""
    request = stream.request
    params = request.sampling_params
    if params.n != 1:
        raise ValueError(f"request {request.request_id!r} has n={params.n}; only n=1 requests fail over")
    sent = stream.delivered.get(0, Delivered())
    generator_state = None
    if params.sampling_type == SamplingType.RANDOM_SEED:
        generator_state = generator_state_after(params.seed, len(sent.token_ids))
    wants_logprobs = params.logprobs is not None
    output = OutputSnapshot(
        output_kind=stream.output_kind.value, text=None,
        logprobs=list(sent.logprobs) if wants_logprobs else None,
        cumulative_logprob=(sent.cumulative_logprob or 0.0) if wants_logprobs else None,
        sent_tokens=len(sent.token_ids), sent_chars=len(sent.text), sent_logprobs=len(sent.logprobs),
        metrics=RequestMetrics(arrival_time=request.arrival_time, num_prompt_tokens=len(request.prompt_token_ids)))
    return RequestSnapshot(request, list(sent.token_ids), num_computed_tokens=0, num_cached_tokens=0,
                           num_preemptions=0, first_scheduled_time=None, generator_state=generator_state,
                           output=output)
