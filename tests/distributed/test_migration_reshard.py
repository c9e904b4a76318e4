"""Moving a running request between instances of different tensor / pipeline parallel sizes (real Ray
workers, gloo, the tiny model): the destination re-shards the source's KV by layer and KV head. A request
moved tp=2 -> tp=1 -> tp=2 (a pre-copy stage each time, then the last stage), pp=2 -> tp=2 and tp=1 -> tp=4
(2 KV heads: replicated) -> tp=2 continues exactly: greedy tokens equal transformers, seeded samples equal
the request never moved. Every block is free at the end on every instance."""
from __future__ import annotations

from distinfer import LLM, SamplingParams
from distinfer.engine.engine import LLMEngine
from distinfer.engine.output_processor import RequestOutputKind
from tests.conftest import hf_greedy
from tests.unit.test_kv_reshard import layouts

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8, max_num_batched_tokens=24)
PROMPT = list(range(1000, 1045))  # 45 tokens: 5 full blocks and a partial one after prefill
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)


def _steps(engine: LLMEngine, tokens: list[int], steps: int | None = None) -> None:
    taken = 0
    while engine.has_unfinished_requests() and (steps is None or taken < steps):
        tokens += [t for out in engine.step() for t in out.outputs[0].token_ids]
        taken += 1


def _move(src: LLMEngine, dst: LLMEngine, request_id: str, tokens: list[int]) -> None:
    """One pre-copy stage (the full blocks so far; the request decodes one more step at the source), then
    the last stage (the rest of its blocks and its state)."""
    kv, sent = src.mover.export_blocks(request_id, 0)
    assert sent > 0 and len(kv) == src.config.parallel.world_size
    assert dst.mover.reserve(request_id, sent)
    dst.mover.import_blocks(request_id, 0, kv)
    _steps(src, tokens, 1)
    snapshot, kv = src.mover.export_request(request_id, sent)
    assert dst.mover.commit(snapshot, kv, sent)


def _generate(engines: list[LLMEngine], params: SamplingParams, request_id: str, moves_after: list[int]) -> list[int]:
    """The request's tokens, started on engines[0] and moved to engines[i + 1] after moves_after[i] more steps."""
    tokens: list[int] = []
    engines[0].add_request(request_id, {"prompt_token_ids": PROMPT}, params.clone(),
                           output_kind=RequestOutputKind.DELTA)
    for src, dst, steps in zip(engines, engines[1:], moves_after):
        _steps(src, tokens, steps)
        assert 0 < len(tokens) < params.max_tokens  # it moves while decoding
        _move(src, dst, request_id, tokens)
        assert not src.has_unfinished_requests()
    _steps(engines[len(moves_after)], tokens)
    return tokens


def _all_free(*engines: LLMEngine) -> None:
    for engine in engines:
        stats = engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks and not engine.has_unfinished_requests()


def test_moves_between_tensor_and_pipeline_parallel_sizes(ray_session, tiny_model_dir, tiny_hf_model):
    built: list[LLM] = []
    try:
        for tp, pp, partition in [(2, 1, None), (1, 1, None), (1, 2, (3, 1))]:
            built.append(LLM(tiny_model_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                             pipeline_layer_partition=partition, **ENGINE_ARGS))
        tp2, tp1, pp2 = (llm.engine for llm in built)
        assert type(tp2.executor).__name__ == type(pp2.executor).__name__ == "RayExecutor"
        # What the ranks report is what the model split: layers per stage, KV heads per TP rank.
        assert tp2.mover.kv_layouts == layouts(2, 1) and pp2.mover.kv_layouts == layouts(1, 2, (3, 1))
        assert tp1.mover.kv_layouts == layouts(1, 1)

        expected = hf_greedy(tiny_hf_model, PROMPT, GREEDY.max_tokens)
        assert _generate([tp2, tp1, tp2], GREEDY, "greedy", [3, 3]) == expected  # mid-decode, twice
        assert _generate([pp2, tp2], GREEDY, "greedy-pp", [4]) == expected
        unmoved = _generate([tp1], SEEDED, "seeded-ref", [])
        assert _generate([tp2, tp1, tp2], SEEDED, "seeded", [2, 4]) == unmoved
        assert _generate([pp2, tp2], SEEDED, "seeded-pp", [5]) == unmoved
        _all_free(tp2, tp1, pp2)

        built.pop().shutdown()  # room on the Ray cluster for 4 more ranks
        built.append(LLM(tiny_model_dir, tensor_parallel_size=4, **ENGINE_ARGS))
        tp4 = built[-1].engine
        assert tp4.mover.kv_layouts == layouts(4, 1)  # 2 KV heads over 4 ranks: each held twice
        assert _generate([tp1, tp4, tp2], GREEDY, "greedy-tp4", [2, 3]) == expected
        _all_free(tp2, tp1, tp4)
    finally:
        for llm in built:
            llm.shutdown()
