"""The balance migration policy on two instances (real Ray actors, the tiny Llama): round-robin puts every
long request on one instance and every short one on the other; once the short ones are done the router
moves long requests over on its own, and every output is still the oracle's."""
from __future__ import annotations

import asyncio

from distinfer import SamplingParams
from tests.conftest import hf_greedy
from tests.distributed.test_router import ENGINE_ARGS, stop_engine, wait_idle


def test_balance_moves_requests_off_the_loaded_instance(ray_session, tiny_model_dir, tiny_hf_model):
    import ray

    from distinfer.router import RouterEngine

    engine = RouterEngine(tiny_model_dir, num_instances=2, dispatch_policy="round_robin",
                          migration_policy="balance", **ENGINE_ARGS)
    try:
        long, short = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (160, 2))
        prompts = [[i + 1] + list(range(200, 240)) for i in range(8)]  # even: long, odd: short

        async def one(i: int) -> list[int]:
            tokens = []
            async for out in engine.generate({"prompt_token_ids": prompts[i]}, (long if i % 2 == 0 else short).clone(),
                                             f"b{i}"):
                tokens += out.outputs[0].token_ids
            return tokens

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(one(i) for i in range(8)))

        results = asyncio.run(run())
        for i, tokens in enumerate(results):
            assert tokens == hf_greedy(tiny_hf_model, prompts[i], 160 if i % 2 == 0 else 2), f"request {i}"
        state = ray.get(engine.router.state.remote())
        assert state.migrations.get("finished", 0) >= 1, state.migrations
        wait_idle(engine)
    finally:
        stop_engine(engine)
