"""Moving a running request between two engine instances in one process (engine.mover: pre-copy stages,
then the snapshot of every owner of request state plus the rest of its KV blocks). Migrated at any step,
a request produces what it would have without moving: greedy tokens equal to transformers on the real
model; seeded samples, logprobs, text and the client's delta stream identical on a tiny model. Both
instances end with every block free."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distinfer import LLM, SamplingParams
from distinfer.engine.engine import LLMEngine
from distinfer.engine.output_processor import RequestOutputKind
from distinfer.messages import RequestOutput
from distinfer.worker.kv_transfer import KVShard
from tests.conftest import hf_greedy, save_tiny_llama

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, default_model_dir):
    path = save_tiny_llama(str(tmp_path_factory.mktemp("tiny-migration")), default_model_dir, **TINY)
    pair = [LLM(path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8,
                max_num_batched_tokens=24) for _ in range(2)]
    yield [llm.engine for llm in pair]
    for llm in pair:
        llm.shutdown()


def _drive(engine: LLMEngine, outputs: list[RequestOutput], steps: int | None = None) -> None:
    """Step until nothing is left (or `steps` steps), collecting outputs."""
    taken = 0
    while engine.has_unfinished_requests() and (steps is None or taken < steps):
        outputs.extend(engine.step())
        taken += 1


def run(src: LLMEngine, dst: LLMEngine, prompt: list[int], params: SamplingParams, move_after: int | None,
        request_id: str = "r", stages: int = 0) -> list[RequestOutput]:
    """The request's DELTA outputs; with `move_after`, it moves from src to dst after that many steps: first
    `stages` pre-copy stages (each copies the blocks filled since the last, then src runs one more step),
    then the last stage (the rest of the blocks and the request's state)."""
    outputs: list[RequestOutput] = []
    src.add_request(request_id, {"prompt_token_ids": prompt}, params.clone(), output_kind=RequestOutputKind.DELTA)
    _drive(src, outputs, move_after)
    sent = 0
    for _ in range(stages if move_after is not None else 0):
        if not src.has_unfinished_requests():
            break
        kv, end = src.mover.export_blocks(request_id, sent)
        assert dst.mover.reserve(request_id, end)
        dst.mover.import_blocks(request_id, sent, kv)
        sent = end
        _drive(src, outputs, 1)
    if move_after is not None and src.has_unfinished_requests():
        snapshot, kv = src.mover.export_request(request_id, sent)
        assert not src.has_unfinished_requests() and src.get_stats().num_free_blocks == src.get_stats().num_total_blocks
        assert dst.mover.commit(snapshot, kv, sent)
    else:
        dst.mover.cancel(request_id)  # it finished on the source during the stages
    _drive(dst if move_after is not None else src, outputs)
    return outputs


def _stream(outputs: list[RequestOutput]) -> tuple[list[int], str, list, float | None]:
    """What the client received, concatenated: token ids, text, logprobs, the last cumulative logprob."""
    tokens, text, logprobs = [], "", []
    for out in outputs:
        completion = out.outputs[0]
        tokens += completion.token_ids
        text += completion.text
        logprobs += completion.logprobs or []
    return tokens, text, logprobs, outputs[-1].outputs[0].cumulative_logprob


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=10, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                   presence_penalty=0.5),
], ids=["greedy", "seeded-logprobs", "seeded-penalties"])
def test_moving_at_any_step_changes_nothing_the_client_sees(tiny_pair, params):
    src, dst = tiny_pair
    prompt = list(range(1000, 1050))  # 50 tokens: prefill takes 3 chunked steps of 24
    expected = _stream(run(src, dst, prompt, params, None))
    assert len(expected[0]) == 10
    for move_after in range(0, 13):  # 0: still waiting (no KV moves); 1-2: mid-prefill; then decoding
        for stages in (0, 1, 3):
            got = _stream(run(src, dst, prompt, params, move_after, f"m{move_after}-{stages}", stages))
            assert got == expected, f"moved after {move_after} steps, {stages} pre-copy stages"
    for engine in tiny_pair:
        stats = engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks and not engine.has_unfinished_requests()


def test_a_destination_without_room_refuses_and_changes_nothing(tiny_pair):
    src, dst = tiny_pair
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    src.add_request("mover", {"prompt_token_ids": list(range(2000, 2040))}, params)
    _drive(src, [], 3)
    snapshot, kv = src.mover.export_request("mover")
    assert dst.scheduler.kv.allocate_slots("blocker", 60 * 8)  # the fault: the destination is (nearly) full
    before = dst.get_stats()
    assert before.num_free_blocks < len(kv[0].tensors[0])
    assert dst.mover.commit(snapshot, kv) is False
    assert dst.get_stats().num_free_blocks == before.num_free_blocks and "mover" not in dst.scheduler.requests
    assert not dst.has_unfinished_requests()
    dst.scheduler.kv.free("blocker")
    assert dst.mover.commit(snapshot, kv) is True  # room again: it goes on
    outputs: list[RequestOutput] = []
    _drive(dst, outputs)
    assert outputs[-1].finished and dst.get_stats().num_free_blocks == dst.get_stats().num_total_blocks


def test_bad_snapshots_are_refused_without_leaking_blocks(tiny_pair):
    src, dst = tiny_pair
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    src.add_request("x", {"prompt_token_ids": list(range(5000, 5030))}, params)
    _drive(src, [], 3)
    snapshot, kv = src.mover.export_request("x")
    deeper = [KVShard(replace(shard.layout, total_layers=3), shard.tensors) for shard in kv]
    with pytest.raises(ValueError, match="3 layers"):  # another model's KV
        dst.mover.commit(snapshot, deeper)
    truncated = [KVShard(shard.layout, [layer[:-1] for layer in shard.tensors]) for shard in kv]
    with pytest.raises(ValueError, match="KV blocks"):
        dst.mover.commit(snapshot, truncated)
    wrong_shape = [KVShard(shard.layout, [layer[:, :4] for layer in shard.tensors]) for shard in kv]
    with pytest.raises(ValueError, match="expected"):
        dst.mover.commit(snapshot, wrong_shape)
    assert "x" not in dst.scheduler.requests and not dst.output_processor.has_request("x")
    assert dst.get_stats().num_free_blocks == dst.get_stats().num_total_blocks
    src.add_request("pair", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(n=2, max_tokens=2))
    with pytest.raises(ValueError, match="n=2"):
        src.mover.export_request("pair")
    src.abort_request("pair")
    assert src.get_stats().num_free_blocks == src.get_stats().num_total_blocks


@pytest.mark.slow
def test_greedy_on_the_real_model_matches_transformers_wherever_it_moves(hf_model, tokenizer):
    pair = [LLM(dtype="float32", max_model_len=512, num_kv_blocks=32) for _ in range(2)]
    try:
        src, dst = (llm.engine for llm in pair)
        prompt = tokenizer.encode("Write a short note about the history of the printing press and its effects:")
        expected = hf_greedy(hf_model, prompt, 12)
        params = SamplingParams(temperature=0.0, max_tokens=12)
        for move_after in (1, 6, 11):
            tokens = _stream(run(src, dst, prompt, params, move_after, request_id=f"real{move_after}"))[0]
            assert tokens == expected, f"moved after {move_after} steps"
            src, dst = dst, src  # and back the other way next time
    finally:
        for llm in pair:
            llm.shutdown()


async def test_async_engines_hand_a_live_stream_over_without_gap_or_duplicate(tmp_path_factory, default_model_dir):
    """AsyncLLM: pre-copy stages while the request streams from the source, then the last stage; the source's
    stream ends with RequestMovedError after its last output, the destination's picks up from there."""
    from distinfer.engine.async_llm import AsyncLLM
    from distinfer.errors import RequestMovedError

    path = save_tiny_llama(str(tmp_path_factory.mktemp("tiny-async-migration")), default_model_dir, **TINY)
    src, dst = (AsyncLLM(path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8,
                         enable_prefix_caching=False)  # "live" computes its prompt as "ref" did: same bits
                for _ in range(2))
    try:
        params = SamplingParams(temperature=0.8, seed=99, max_tokens=40, logprobs=2, ignore_eos=True)
        prompt = {"prompt_token_ids": list(range(700, 760))}
        expected = _stream([out async for out in src.generate(prompt, params.clone(), "ref")])
        received: list[RequestOutput] = []
        stream = src.generate(prompt, params.clone(), "live")
        received.append(await anext(stream))  # the first token: the request is decoding on the source
        kv, sent = await src.call_between_steps(lambda e: e.mover.export_blocks("live", 0))
        assert sent > 0 and await dst.call_between_steps(lambda e: e.mover.reserve("live", sent))
        await dst.call_between_steps(lambda e: e.mover.import_blocks("live", 0, kv))
        snapshot, rest = await src.pause_request("live", sent)
        moved = await dst.import_request(snapshot, rest, sent)
        assert moved is not None
        await src.release_request("live")
        with pytest.raises(RequestMovedError):
            async for out in stream:  # what the source produced before the last stage
                received.append(out)
        received += [out async for out in moved]
        assert _stream(received) == expected and received[-1].finished
        for engine in (src, dst):
            stats = engine.get_stats()
            assert stats.num_free_blocks == stats.num_total_blocks and engine.num_pending_requests == 0
    finally:
        src.shutdown()
        dst.shutdown()


async def test_a_paused_request_resumes_on_the_source_as_if_nothing_happened(tmp_path_factory, default_model_dir):
    """The destination refused the last stage: the source resumes the paused request; its stream is unchanged."""
    from distinfer.engine.async_llm import AsyncLLM

    path = save_tiny_llama(str(tmp_path_factory.mktemp("tiny-resume")), default_model_dir, **TINY)
    engine = AsyncLLM(path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8,
                      enable_prefix_caching=False)
    try:
        params = SamplingParams(temperature=0.8, seed=5, max_tokens=20, logprobs=1, ignore_eos=True)
        prompt = {"prompt_token_ids": list(range(900, 930))}
        expected = _stream([out async for out in engine.generate(prompt, params.clone(), "ref")])
        stream = engine.generate(prompt, params.clone(), "paused")
        received = [await anext(stream)]
        await engine.pause_request("paused")
        assert not engine.engine.has_unfinished_requests()  # the loop sleeps while the move is decided
        await engine.resume_request("paused")
        received += [out async for out in stream]
        assert _stream(received) == expected
        with pytest.raises(KeyError):
            await engine.release_request("paused")  # finished meanwhile: nothing to release
    finally:
        engine.shutdown()


def test_a_reservation_never_committed_is_freed_after_its_timeout(tiny_pair):
    import time

    _, dst = tiny_pair
    total = dst.get_stats().num_total_blocks
    dst.mover.timeout_s = 0.05
    try:
        assert dst.mover.reserve("ghost", 10)
        assert dst.get_stats().num_free_blocks == total - 10
        time.sleep(0.1)
        dst.step()  # every step first frees expired reservations
        assert dst.get_stats().num_free_blocks == total
        with pytest.raises(KeyError, match="no reservation"):
            dst.mover.import_blocks("ghost", 0, [])
    finally:
        dst.mover.timeout_s = 30.0


def test_a_waiting_request_moves_without_starting_on_the_source(tiny_pair):
    """A request that has not started yet (what the router's defragmentation moves first) is paused while its
    snapshot travels: the source neither admits nor counts it meanwhile, and it runs on the destination."""
    from distinfer.engine.request import RequestStatus

    src, dst = tiny_pair
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = list(range(3000, 3020))
    expected = _stream(run(src, dst, prompt, params, None, "waiting-ref"))
    src.add_request("w", {"prompt_token_ids": prompt}, params.clone(), output_kind=RequestOutputKind.DELTA)
    assert src.scheduler.head_of_queue() == ("w", 3)  # 20 tokens in blocks of 8
    snapshot, kv = src.mover.pause("w")
    assert kv == [] and snapshot.num_computed_tokens == 0
    assert src.scheduler.head_of_queue() is None and not src.has_unfinished_requests()
    assert src.step() == [] and src.scheduler.requests["w"].status == RequestStatus.WAITING
    src.mover.release("w")
    assert dst.mover.commit(snapshot, kv)
    outputs: list[RequestOutput] = []
    _drive(dst, outputs)
    assert _stream(outputs) == expected
    for engine in tiny_pair:
        assert engine.get_stats().num_free_blocks == engine.get_stats().num_total_blocks
