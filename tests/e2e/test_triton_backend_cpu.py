"""The engine on the Triton attention backend, its kernels interpreted on the CPU (TRITON_INTERPRET=1),
against transformers: the CUDA path's attention, KV writes and decode-graph input buffers checked
without a GPU. Greedy float32 must match token for token in the default, chunked-prefill, prefix-hit
and preemption configurations, and through the padded persistent buffers a CUDA graph replays.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from distinfer import LLM, SamplingParams  # noqa: E402
from distinfer.worker.cuda_graphs import DecodeGraphs  # noqa: E402
from tests.conftest import hf_greedy, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# head_dim 16: the smallest tl.dot operand; two KV heads for four query heads (GQA 2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)
PROMPTS = ["The capital of France is", "Once upon a time there was a dragon who", "def add(a, b):",
           "1, 2, 3, 4, 5,"]
SHARED = "You are a helpful assistant. Answer briefly and precisely. "
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-triton")), default_model_dir, **TINY)


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)

    def expected(prompts: list[str]) -> list[list[int]]:
        return [hf_greedy(model, tokenizer(p).input_ids, MAX_TOKENS) for p in prompts]

    return expected


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _run(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy(), use_tqdm=False)]


def _llm(tiny_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 256)
    return LLM(tiny_dir, device="cpu", dtype="float32", attention_backend="triton", **kwargs)


def test_batched_prompts_match_transformers(tiny_dir, oracle):
    llm = _llm(tiny_dir, num_kv_blocks=64)
    try:
        assert _run(llm, PROMPTS) == oracle(PROMPTS)
    finally:
        llm.shutdown()


def test_chunked_prefill_prefix_hits_and_preemption_match_transformers(tiny_dir, oracle):
    """Prompts cut into 7-token chunks, a shared prefix served from the cache, and a pool too small for
    every request at once (so requests are preempted and recomputed)."""
    prompts = [SHARED + p for p in PROMPTS]
    llm = _llm(tiny_dir, num_kv_blocks=12, block_size=4, max_num_batched_tokens=7, max_num_seqs=4, max_model_len=48)
    try:
        assert _run(llm, prompts[:1]) == oracle(prompts[:1])  # fills the prefix cache
        hits_before = llm.engine.get_stats().prefix_cache_hits
        assert _run(llm, prompts) == oracle(prompts)
        stats = llm.engine.get_stats()
        assert stats.prefix_cache_hits > hits_before, "the shared prefix was meant to hit the cache"
        assert stats.num_preemptions > 0, "the pool was meant to be too small"
        assert stats.num_free_blocks == 12  # nothing leaked
    finally:
        llm.shutdown()


def test_decode_through_padded_graph_buffers_matches_transformers(tiny_dir, oracle):
    """The decode steps run through DecodeGraphs' persistent buffers, padded to the capture sizes
    (eagerly: graphs need CUDA): padding rows write no KV and do not disturb the real rows."""
    llm = _llm(tiny_dir, num_kv_blocks=64, max_num_seqs=8)
    runner = llm.engine.executor.worker.runner
    runner.graphs = DecodeGraphs(runner._decode_forward, runner.block_size, 8, runner.max_model_len,
                                 runner.device, use_graphs=False)
    try:
        for count in (1, 3, 4):  # padded to 1, 4, 4 rows
            steps_before = runner.graphs.steps_run
            assert _run(llm, PROMPTS[:count]) == oracle(PROMPTS[:count]), count
            assert runner.graphs.steps_run - steps_before >= MAX_TOKENS - 1  # every decode step went through it
    finally:
        llm.shutdown()
