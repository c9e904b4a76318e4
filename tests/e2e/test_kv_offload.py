"""The host KV tier on the real model against transformers (greedy float32): requests swapped out to
host DRAM under a device budget far too small come back token-identical, and both tiers are empty at
the end."""
from __future__ import annotations

import inspect
import json

import pytest

from distinfer import LLM, SamplingParams
from tests.conftest import hf_greedy, llm_greedy

MAX_NEW_TOKENS = 16
WORDS = inspect.getdoc(json).split()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """Twelve prompts of about 40 to 250 tokens, no two sharing a prefix block."""
    return [tokenizer.encode(f"Note {i}: " + " ".join(WORDS[i * 7: i * 7 + 20 + 6 * i]) + "\nSummary:")
            for i in range(12)]


@pytest.fixture(scope="module")
def oracle(hf_model, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompt_ids]



@pytest.mark.slow
def test_swap_preemption_under_a_tiny_device_budget_matches_transformers(prompt_ids, oracle):
    # 48 blocks x 16 tokens: a quarter of the working set (~2,500 tokens of prompts and outputs)
    llm = LLM(dtype="float32", max_model_len=512, num_kv_blocks=48, kv_offloading_size=0.05,
              enable_prefix_caching=False)
    try:
        ours = llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS)
        host = llm.engine.scheduler.kv.host
        assert host.stats.swapped_out_blocks > 0, "the device budget was meant to force swaps"
        assert host.stats.swapped_in_blocks == host.stats.swapped_out_blocks  # every swapped request came back
        assert llm.engine.scheduler.num_recomputed_tokens == 0  # the host tier had room for every victim
        assert ours == oracle
        stats = llm.engine.get_stats()
        assert stats.num_free_blocks == 48 and host.num_free_blocks == host.num_blocks
        assert 0 < stats.num_swapped_preemptions == stats.num_preemptions and stats.num_recomputed_tokens == 0
        block_bytes = 2 * 16 * 3 * 64 * 4 * 30  # K and V, 16 tokens, 3 KV heads of 64, float32, 30 layers
        assert stats.kv_bytes_to_host == stats.kv_bytes_to_device == host.stats.swapped_out_blocks * block_bytes
        assert stats.num_host_blocks == host.num_blocks and stats.host_kv_cache_usage == 0.0
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_second_turn_finds_its_evicted_history_in_the_host_tier(tokenizer, hf_model, prompt_ids):
    """Turn 1, then other requests push its blocks off the device (they spill to the host); turn 2
    (history + a new question) copies the history back instead of computing it again."""
    history = tokenizer.encode("Note: " + " ".join(WORDS[:150]) + "\nQuestion: what is this about?\nAnswer:")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    llm = LLM(dtype="float32", max_model_len=512, num_kv_blocks=40, kv_offloading_size=0.05)
    try:
        first = llm.generate([history], params, use_tqdm=False)[0].outputs[0]
        llm.generate(prompt_ids[:6], params, use_tqdm=False)  # 40 blocks: the history is evicted, spilled
        host = llm.engine.scheduler.kv.host
        assert host.stats.spilled_blocks > 0
        turn2 = history + list(first.token_ids) + tokenizer.encode("\nQuestion: and why?\nAnswer:")
        hits_before = llm.engine.get_stats().prefix_cache_hits
        second = llm.generate([turn2], params, use_tqdm=False)[0]
        host_hit_tokens = llm.engine.get_stats().host_prefix_cache_hits
        assert host_hit_tokens >= (len(history) // 16 - 2) * 16, "the history should come from the host tier"
        assert second.num_cached_tokens >= host_hit_tokens  # computed: only what was not cached
        assert llm.engine.get_stats().prefix_cache_hits - hits_before == second.num_cached_tokens
        assert list(first.token_ids) == hf_greedy(hf_model, history, MAX_NEW_TOKENS)
        assert list(second.outputs[0].token_ids) == hf_greedy(hf_model, turn2, MAX_NEW_TOKENS)
        assert llm.engine.get_stats().num_free_blocks == 40 and not host._swapped
    finally:
        llm.shutdown()
