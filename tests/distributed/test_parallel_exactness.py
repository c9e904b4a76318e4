"""tp=2, pp=2 and tp=2 x pp=2 on Ray give the same tokens as one device and as transformers.

Every configuration runs the same prompts submitted together, with a small token budget so long
prompts are prefilled in chunks next to other requests' decodes; a second pass hits the prefix
cache on every rank. The steps the workers receive are recorded: they must be diffs (a request's
prompt travels once; later steps carry at most the one token sampled since).
"""
from __future__ import annotations

import pickle
from collections import Counter

import pytest

from distinfer import LLM, SamplingParams
from distinfer.messages import SchedulerOutput
from tests.conftest import hf_greedy

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "List three colors:",
    " ".join(f"word{i}" for i in range(40)) + " and then",  # ~120 tokens: several prefill chunks
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,",
    "Once upon a time",
]
MAX_TOKENS = [10, 14, 8, 12, 10, 16, 6]  # requests finish at different steps
ENGINE_ARGS = dict(max_num_batched_tokens=24, block_size=8, num_kv_blocks=256, max_model_len=512)
# (tp, pp, layers per stage): pp2 splits the 4 layers unevenly on purpose; tp2xpp2 splits evenly.
CONFIGS = {"tp2": (2, 1, None), "pp2": (1, 2, (3, 1)), "tp2xpp2": (2, 2, None)}


def _greedy() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n) for n in MAX_TOKENS]


def _seeded() -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert max(map(len, ids)) > 3 * ENGINE_ARGS["max_num_batched_tokens"]
    return ids


@pytest.fixture(scope="module")
def single_device(tiny_model_dir, prompt_ids) -> dict[str, list[list[int]]]:
    """tp=1 in-process (no Ray): greedy tokens and one seeded sampled completion."""
    llm = LLM(tiny_model_dir, **ENGINE_ARGS)
    try:
        return {"greedy": _tokens(llm.generate(prompt_ids, _greedy(), use_tqdm=False)),
                "seeded": _tokens(llm.generate([prompt_ids[1]], _seeded(), use_tqdm=False))}
    finally:
        llm.shutdown()


def test_single_device_matches_transformers(tiny_hf_model, prompt_ids, single_device):
    expected = [hf_greedy(tiny_hf_model, ids, n) for ids, n in zip(prompt_ids, MAX_TOKENS)]
    assert single_device["greedy"] == expected


def _rank_layouts(executor) -> list[dict]:
    """What each rank holds, read from the actors themselves: its layers, the rows of its fused
    q/k/v weight, and its KV cache tensors ([blocks, block_size, 2, kv_heads, head_dim], one per layer)."""
    import ray

    def layout(actor) -> dict:
        runner = actor.worker.runner
        model = runner.model.model
        qkv = model.layers[model.start_layer].self_attn.qkv_proj.weight
        return {"layers": (model.start_layer, model.end_layer), "qkv_rows": qkv.shape[0],
                "kv_caches": len(runner.kv_caches), "kv_heads": runner.kv_caches[0].shape[3]}

    return ray.get([w.__ray_call__.remote(layout) for w in executor.workers])


class StepRecorder:
    """Wraps the executor's submit(): keeps every SchedulerOutput and the most steps in flight."""

    def __init__(self, executor) -> None:
        self.steps: list[SchedulerOutput] = []
        self.in_flight = self.max_in_flight = 0
        self._submit = executor.submit
        executor.submit = self.submit

    def submit(self, scheduler_output: SchedulerOutput):
        self.steps.append(scheduler_output)
        wait = self._submit(scheduler_output)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def waited():
            try:
                return wait()
            finally:
                self.in_flight -= 1
        return waited


def _check_diffs(steps: list[SchedulerOutput], prompt_ids: list[list[int]]) -> None:
    """Each prompt reaches the workers once; a later step carries at most the token sampled since."""
    new_counts = Counter(new.req_id for step in steps for new in step.scheduled_new_reqs)
    assert set(new_counts.values()) == {1}, new_counts
    assert len(new_counts) == len(prompt_ids)
    for step in steps:
        assert all(len(c.new_token_ids) <= 1 and not c.resumed_from_preemption for c in step.scheduled_cached_reqs)
    decode_steps = [s for s in steps if not s.scheduled_new_reqs and s.total_num_scheduled_tokens]
    assert decode_steps
    for step in decode_steps:
        # A few dozen bytes per request whatever its length (the longest prompt alone pickles to ~350).
        assert len(pickle.dumps(step)) < 100 * len(step.num_scheduled_tokens) + 400


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parallel_matches_single_device(name, ray_session, tiny_model_dir, prompt_ids, single_device):
    tp, pp, partition = CONFIGS[name]
    llm = LLM(tiny_model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, pipeline_layer_partition=partition,
              **ENGINE_ARGS)
    try:
        executor = llm.engine.executor
        assert type(executor).__name__ == "RayExecutor" and len(executor.workers) == tp * pp
        stages = [(0, 3), (3, 4)] if partition else [(0, 2), (2, 4)]
        for rank, layout in enumerate(_rank_layouts(executor)):
            start, end = stages[rank // tp] if pp > 1 else (0, 4)
            # 4 query heads and 2 KV heads of 16 dims: each TP rank keeps 4/tp and 2/tp of them, weights and cache.
            assert layout == {"layers": (start, end), "qkv_rows": (4 + 2 * 2) * 16 // tp,
                              "kv_caches": end - start, "kv_heads": 2 // tp}, rank
        recorder = StepRecorder(executor)
        assert _tokens(llm.generate(prompt_ids, _greedy(), use_tqdm=False)) == single_device["greedy"]
        _check_diffs(recorder.steps, prompt_ids)
        if pp > 1:  # stages overlap: a second batch (disjoint requests) went out before the first came back
            assert recorder.max_in_flight == pp
            # ... also in steady decoding, where each step takes its share of the running requests.
            decode = [s.num_scheduled_tokens.keys() for s in recorder.steps
                      if s.total_num_scheduled_tokens and not s.scheduled_new_reqs]
            assert any(len(a) > 1 and len(b) > 1 and a.isdisjoint(b) for a, b in zip(decode, decode[1:]))
        control = executor.last_control
        assert control.wall > 0 and control.worker_compute > 0 and control.control_overhead >= 0
        assert len(control.per_rank) == tp * pp
        assert all(t.collective > 0 for t in control.per_rank)  # every rank's all-reduce / send / recv was timed

        assert_prefix_hits_and_seeded_match(llm, prompt_ids, single_device)
    finally:
        llm.shutdown()


def assert_prefix_hits_and_seeded_match(llm: LLM, prompt_ids: list[list[int]], single_device: dict) -> None:
    """A second pass of the prompts hits the prefix cache and still gives the single device's tokens, and so
    does a seeded sampled completion."""
    again = llm.generate(prompt_ids, _greedy(), use_tqdm=False)
    assert _tokens(again) == single_device["greedy"]
    assert max(o.num_cached_tokens for o in again) >= len(prompt_ids[4]) // 8 * 8 - 8
    assert _tokens(llm.generate([prompt_ids[1]], _seeded(), use_tqdm=False)) == single_device["seeded"]


def test_pipeline_parallel_with_preemption_matches_single_device(ray_session, tiny_model_dir, prompt_ids,
                                                                 single_device):
    """A KV budget far below the batch's needs: recompute preemption while two steps are in flight."""
    llm = LLM(tiny_model_dir, pipeline_parallel_size=2, max_num_batched_tokens=24, block_size=8,
              num_kv_blocks=20, max_model_len=160, enable_prefix_caching=False)
    try:
        assert _tokens(llm.generate(prompt_ids, _greedy(), use_tqdm=False)) == single_device["greedy"]
        stats = llm.engine.get_stats()
        assert stats.num_preemptions > 0
        assert stats.num_free_blocks == 20
    finally:
        llm.shutdown()


def test_failed_engine_start_releases_the_workers(ray_session, tiny_model_dir):
    """The KV budget is found too small only after the workers are up: they must not leak."""
    with pytest.raises(ValueError, match="KV cache budget"):
        LLM(tiny_model_dir, tensor_parallel_size=2, num_kv_blocks=2, max_model_len=512)


@pytest.mark.parametrize("partition, error", [("3", "needs 2 counts"), ("2,0", "needs 2 counts >= 1"),
                                              ("a,b", "layer counts like")])
def test_bad_layer_partition_is_refused(partition, error):
    from distinfer.config import ParallelConfig

    with pytest.raises(ValueError, match=error):
        ParallelConfig(pipeline_parallel_size=2, pipeline_layer_partition=partition)
    assert ParallelConfig(pipeline_parallel_size=2, pipeline_layer_partition="3, 1").pipeline_layer_partition == (3, 1)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_swap_preemption_over_ray_matches_single_device(tp, pp, ray_session, tiny_model_dir, prompt_ids,
                                                        single_device):
    """The same tiny budget with a host KV tier: victims swap out on every rank (heads or layers) and
    come back; tokens equal one device's, and both tiers are empty at the end."""
    llm = LLM(tiny_model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=24,
              block_size=8, num_kv_blocks=20, max_model_len=160, enable_prefix_caching=False,
              kv_offloading_size=0.001)
    try:
        assert _tokens(llm.generate(prompt_ids, _greedy(), use_tqdm=False)) == single_device["greedy"]
        stats = llm.engine.get_stats()
        assert stats.num_swapped_preemptions > 0 and stats.num_recomputed_tokens == 0
        assert stats.num_free_blocks == 20 and stats.host_kv_cache_usage == 0.0
    finally:
        llm.shutdown()
