"""The host KV tier on the real model against transformers (greedy float32): requests swapped out to
host DRAM under a device budget far too small come back token-identical, and both tiers are empty at
the end."""
from __future__ import annotations

import inspect
import json

import pytest

from distinfer import LLM, SamplingParams
from tests.conftest import hf_greedy

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


def _generate(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompt_ids, params, use_tqdm=False)]


@pytest.mark.slow
def test_swap_preemption_under_a_tiny_device_budget_matches_transformers(prompt_ids, oracle):
    # 48 blocks x 16 tokens: a quarter of the working set (~2,500 tokens of prompts and outputs)
    llm = LLM(dtype="float32", max_model_len=512, num_kv_blocks=48, kv_offloading_size=0.05,
              enable_prefix_caching=False)
    try:
        ours = _generate(llm, prompt_ids)
        host = llm.engine.scheduler.host
        assert host.num_swapped_out > 0, "the device budget was meant to force swaps"
        assert host.num_swapped_in == host.num_swapped_out  # every swapped request came back
        assert llm.engine.scheduler.num_recomputed_tokens == 0  # the host tier had room for every victim
        assert ours == oracle
        assert llm.engine.get_stats().num_free_blocks == 48 and host.num_free_blocks == host.num_blocks
    finally:
        llm.shutdown()
