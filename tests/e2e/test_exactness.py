"""Greedy float32 outputs on the real model equal transformers generate(do_sample=False).

All prompts are submitted together, so they are batched with each other; each configuration
(default, small prefill chunks, prefix-cache hits, preemption) must still match the oracle token for token.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import re

import pytest

from distinfer import LLM
from tests.conftest import hf_greedy, llm_greedy

MAX_NEW_TOKENS = 24
LONG_DOC = "\n\n".join(inspect.getdoc(module) for module in (argparse, json, logging, re))
SHORT_PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Translate to French: good morning",
    "1, 2, 3, 4,",
    "Once upon a time",
    "What is the boiling point of water?",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé ✓ 東京 🚀 is",
]


def _long_prompts(tokenizer) -> list[str]:
    """Prompts from ~200 to over 1,500 tokens; the last three share a long prefix."""
    words = LONG_DOC.split()
    prompts = [" ".join(words[:150]) + "\nSummary:", " ".join(words[:600]) + "\nIn short,"]
    prefix = " ".join(words[:800])
    prompts += [prefix + f"\nQuestion {i}: what does this describe?\nAnswer:" for i in range(4)]
    assert max(len(tokenizer.encode(p)) for p in prompts) > 1500
    return prompts


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in SHORT_PROMPTS + _long_prompts(tokenizer)]


@pytest.fixture(scope="module")
def oracle(hf_model, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompt_ids]



def _assert_same(ours: list[list[int]], oracle: list[list[int]]) -> None:
    mismatched = [i for i, (a, b) in enumerate(zip(ours, oracle)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ: ours={ours[mismatched[0]]} oracle={oracle[mismatched[0]]}"


def test_at_least_16_prompts_of_mixed_length(prompt_ids):
    lengths = sorted(len(p) for p in prompt_ids)
    assert len(prompt_ids) >= 16 and lengths[0] <= 5 and lengths[-1] > 1500


@pytest.mark.slow
def test_default_config_matches_transformers(prompt_ids, oracle):
    llm = LLM(dtype="float32")
    _assert_same(llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS), oracle)


@pytest.mark.slow
def test_small_prefill_chunks_match_transformers(prompt_ids, oracle):
    llm = LLM(dtype="float32", max_num_batched_tokens=64, enable_prefix_caching=False)
    _assert_same(llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS), oracle)


@pytest.mark.slow
def test_prefix_cache_hits_match_transformers(prompt_ids, oracle):
    llm = LLM(dtype="float32", enable_prefix_caching=True)
    first = llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS)
    hits_after_first = llm.engine.get_stats().prefix_cache_hits
    second = llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS)
    stats = llm.engine.get_stats()
    assert hits_after_first > 0, "prompts sharing a long prefix should hit within the first run"
    assert stats.prefix_cache_hits - hits_after_first > sum(len(p) for p in prompt_ids) // 2
    _assert_same(first, oracle)
    _assert_same(second, oracle)


@pytest.mark.slow
def test_preemption_under_small_kv_budget_matches_transformers(prompt_ids, oracle):
    # 140 blocks x 16 tokens hold one 2048-token sequence but nowhere near all prompts at once.
    llm = LLM(dtype="float32", max_model_len=2048, num_kv_blocks=140, enable_prefix_caching=False)
    ours = llm_greedy(llm, prompt_ids, MAX_NEW_TOKENS)
    assert llm.engine.get_stats().num_preemptions > 0
    _assert_same(ours, oracle)
    assert llm.engine.get_stats().num_free_blocks == 140, "every block is returned once all requests finish"
