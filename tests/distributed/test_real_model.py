"""The real default model (SmolLM2-135M: 9 query heads, 3 KV heads, 30 layers) with tp=3 and with
pp=2 gives the same greedy tokens as transformers, for prompts of mixed length batched together."""
from __future__ import annotations

import inspect
import json

import pytest

from distinfer import LLM, SamplingParams
from tests.conftest import hf_greedy

MAX_NEW_TOKENS = 16
PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    " ".join(inspect.getdoc(json).split()[:120]) + "\nIn short,",  # ~170 tokens: prefilled in chunks
]
ENGINE_ARGS = dict(max_num_batched_tokens=64, max_model_len=512, num_kv_blocks=256)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert min(map(len, ids)) <= 2 and max(map(len, ids)) > 2 * ENGINE_ARGS["max_num_batched_tokens"]
    return ids


@pytest.fixture(scope="module")
def oracle(hf_model, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompt_ids]


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_real_model_matches_transformers(tp, pp, ray_session, prompt_ids, oracle):
    llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE_ARGS)
    try:
        outputs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS), use_tqdm=False)
    finally:
        llm.shutdown()
    ours = [list(o.outputs[0].token_ids) for o in outputs]
    mismatched = [i for i, (a, b) in enumerate(zip(ours, oracle)) if a != b]
    assert not mismatched, f"prompts {mismatched} differ: ours={ours[mismatched[0]]} oracle={oracle[mismatched[0]]}"


def test_tp_that_does_not_divide_the_heads_is_refused_before_any_worker_starts(ray_session):
    with pytest.raises(ValueError, match="tensor_parallel_size 2 must divide the model's num_attention_heads 9"):
        LLM(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size 31 exceeds the model's 30 layers"):
        LLM(pipeline_parallel_size=31)
    with pytest.raises(ValueError, match="pipeline_layer_partition 20,5 sums to 25, not the model's 30 layers"):
        LLM(pipeline_parallel_size=2, pipeline_layer_partition=(20, 5))
