"""Prefill/decode disaggregation through the router, one prefill and one decode instance (real Ray actors,
the tiny Llama): every request computes its prompt and first token on the prefill instance, then moves to
the decode instance and finishes there, token-identical to transformers; when the hand-off fails (the
decode instance is full) it decodes where it is, unchanged."""
from __future__ import annotations

import asyncio

import pytest

from distinfer import SamplingParams
from tests.conftest import hf_greedy
from tests.distributed.test_router import ENGINE_ARGS, actors, stop_engine, wait_idle

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], list(range(40, 90)), [1, 1, 2, 3, 5, 8, 13, 21, 34]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def pd(ray_session, tiny_model_dir):
    from distinfer.router import RouterEngine

    engine = RouterEngine(tiny_model_dir, prefill_instances=1, decode_instances=1, **ENGINE_ARGS)
    yield engine
    stop_engine(engine)


async def run_tracking(engine, prompt: list[int], request_id: str) -> tuple[list[int], list[str]]:
    """The tokens, and the instance that held the request after each output."""
    tokens, places = [], []
    async for out in engine.generate({"prompt_token_ids": prompt}, GREEDY.clone(), request_id):
        tokens += out.outputs[0].token_ids
        place = None if out.finished else await engine.where(request_id)
        if place is not None:  # None: the router had already seen it finish
            places.append(place)
    return tokens, places


def test_requests_prefill_on_one_instance_and_decode_on_the_other(pd, tiny_hf_model):
    async def run() -> list[tuple[list[int], list[str]]]:
        return await asyncio.gather(*(run_tracking(pd, p, f"pd-{i}") for i, p in enumerate(PROMPTS)))

    results = asyncio.run(run())
    for prompt, (tokens, places) in zip(PROMPTS, results):
        assert tokens == hf_greedy(tiny_hf_model, prompt, GREEDY.max_tokens)
        assert places[-1] == "decode-0", places  # handed off after the first token, never back
        assert places == sorted(places, key=lambda p: p != "prefill-0"), places
    wait_idle(pd)


def test_a_failed_hand_off_keeps_decoding_on_the_prefill_instance(pd, tiny_hf_model):
    import ray

    decode = actors(pd)["decode-0"]
    assert ray.get(decode.reserve.remote("blocker", 64))  # the fault: no block free for the hand-off
    try:
        tokens, places = asyncio.run(run_tracking(pd, PROMPTS[0], "pd-full"))
    finally:
        ray.get(decode.cancel_reservation.remote("blocker"))
    assert tokens == hf_greedy(tiny_hf_model, PROMPTS[0], GREEDY.max_tokens)
    assert set(places) == {"prefill-0"}
    wait_idle(pd)


def test_the_split_is_validated():
    from distinfer.router.router import RouterConfig

    with pytest.raises(ValueError, match="1 prefill"):
        RouterConfig(num_instances=2, prefill_instances=2, decode_instances=0)
    with pytest.raises(ValueError, match="prefill_instances"):
        RouterConfig(num_instances=2, prefill_instances=-1, decode_instances=3)
    RouterConfig(num_instances=3, prefill_instances=1, decode_instances=2)


def test_a_refused_hand_off_is_tried_again_once_the_decode_instance_has_room(pd, tiny_hf_model):
    import ray

    decode = actors(pd)["decode-0"]
    long = GREEDY.clone(max_tokens=200)
    assert ray.get(decode.reserve.remote("blocker", 64))  # the first try finds no room

    async def run() -> tuple[list[int], list[str]]:
        tokens, places = [], []
        async for out in pd.generate({"prompt_token_ids": PROMPTS[1]}, long.clone(), "pd-retry"):
            tokens += out.outputs[0].token_ids
            if len(tokens) == 2:  # decoding on the prefill instance: room comes back for the next try
                await asyncio.to_thread(ray.get, decode.cancel_reservation.remote("blocker"))
            place = None if out.finished else await pd.where("pd-retry")
            if place is not None:
                places.append(place)
        return tokens, places

    try:
        tokens, places = asyncio.run(run())
    finally:
        ray.get(decode.cancel_reservation.remote("blocker"))
    assert tokens == hf_greedy(tiny_hf_model, PROMPTS[1], 200)
    assert places[0] == "prefill-0" and places[-1] == "decode-0", places
    wait_idle(pd)
