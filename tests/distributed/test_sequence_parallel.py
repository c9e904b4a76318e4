"""Sequence parallelism on Ray (ring attention, KV spread over the SP ranks), tiny Llama: sp=2, sp=2 x tp=2
and sp=2 x pp=2 give the tokens of one device, with chunked prefill next to other requests' decodes, a second
pass that hits the prefix cache (sharded like the rest), and seeded sampling; a prompt longer than one rank's
KV budget runs at sp=2 and is refused at sp=1; a killed SP rank ends the requests with a clear error."""
from __future__ import annotations

import asyncio

import pytest

from distinfer import LLM, AsyncLLM, SamplingParams
from distinfer.executor.base import EngineDeadError
from tests.conftest import hf_greedy
from tests.distributed.conftest import wait_released
from tests.distributed.test_parallel_exactness import (ENGINE_ARGS, _greedy, _tokens,
                                                       assert_prefix_hits_and_seeded_match)
from tests.distributed.test_parallel_exactness import prompt_ids, single_device  # noqa: F401 (fixtures)
from tests.distributed.test_worker_failure import FAILURE_DEADLINE_S, _fail_during_streams, _inject

CONFIGS = {"sp2": (2, 1, 1), "sp2xtp2": (2, 2, 1), "sp2xpp2": (2, 1, 2)}  # (sp, tp, pp)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequence_parallel_matches_single_device(name, ray_session, tiny_model_dir, prompt_ids, single_device):
    sp, tp, pp = CONFIGS[name]
    llm = LLM(tiny_model_dir, sequence_parallel_size=sp, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              **ENGINE_ARGS)
    try:
        assert len(llm.engine.executor.workers) == sp * tp * pp
        assert _tokens(llm.generate(prompt_ids, _greedy(), use_tqdm=False)) == single_device["greedy"]
        stats = llm.engine.get_stats()  # every SP rank's blocks, all free again
        assert stats.num_total_blocks == sp * ENGINE_ARGS["num_kv_blocks"]
        assert stats.num_free_blocks == stats.num_total_blocks
        assert_prefix_hits_and_seeded_match(llm, prompt_ids, single_device)  # the prefix cache is sharded too
    finally:
        llm.shutdown()


def test_a_prompt_beyond_one_ranks_kv_budget_runs_on_two(ray_session, tiny_model_dir, tiny_hf_model):
    """8 blocks of 8 tokens per rank: one rank holds 64 tokens, two hold 128; a 110-token prompt needs both."""
    budget = dict(num_kv_blocks=8, block_size=8, max_model_len=120, max_num_batched_tokens=48)
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=120"):
        LLM(tiny_model_dir, **budget)  # the same budget on one rank refuses such a length outright
    prompt = [(7 * i) % 500 + 3 for i in range(110)]
    llm = LLM(tiny_model_dir, sequence_parallel_size=2, **budget)
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == hf_greedy(tiny_hf_model, prompt, 8)
        stats = llm.engine.get_stats()
        assert stats.num_total_blocks == 16 and stats.num_free_blocks == 16
    finally:
        llm.shutdown()


def test_a_killed_sp_rank_ends_the_requests_with_a_clear_error(ray_session, tiny_model_dir):
    engine = AsyncLLM(tiny_model_dir, sequence_parallel_size=2, num_kv_blocks=128, block_size=16, max_model_len=512)
    try:
        results, injected_at = asyncio.run(_fail_during_streams(engine, _inject("kill")))
        errors = [error for _, error, _ in results]
        assert all(isinstance(e, EngineDeadError) for e in errors), errors
        assert all(ended - injected_at < FAILURE_DEADLINE_S for _, _, ended in results)
        assert str(errors[0]).startswith("engine is dead: worker rank 1 failed in execute_model")
        workers, groups = wait_released()  # the surviving rank is not left waiting in the ring
        assert not workers and not groups
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_real_model_long_prompt_beyond_one_rank_matches_transformers(ray_session, default_model_dir, hf_model,
                                                                    tokenizer):
    """SmolLM2, sp=2, float32: a ~2,000-token prompt that one rank's KV budget (70 blocks of 16 = 1,120
    tokens) cannot hold, in chunks of 512 tokens, gives transformers' greedy tokens."""
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 23} marbles." for i in range(150))
    prompt = tokenizer.encode(text)[:2000]
    assert len(prompt) == 2000
    llm = LLM(default_model_dir, sequence_parallel_size=2, dtype="float32", num_kv_blocks=70, block_size=16,
              max_model_len=2048, max_num_batched_tokens=512)
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == hf_greedy(hf_model, prompt, 6)
    finally:
        llm.shutdown()
