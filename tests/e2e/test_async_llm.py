"""AsyncLLM on the real model: streaming, concurrent callers batched together, abort, CLI."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from distinfer import AsyncLLM, LLM, SamplingParams
from distinfer.engine.output_processor import RequestOutputKind

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Emoji test: 🚀🚀 and 東京", "1, 2, 3,"]


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(dtype="float32", max_model_len=2048)
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncLLM, prompt: str, params: SamplingParams, request_id: str) -> tuple[str, list[int], int]:
    text, ids, chunks = "", [], 0
    async for out in engine.generate(prompt, params, request_id):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        chunks += 1
    return text, ids, chunks


async def test_streams_equal_offline_generate_and_are_batched(engine):
    params = SamplingParams(temperature=0, max_tokens=24)
    steps_before = engine.engine.get_stats()
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, engine.get_stats().num_running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(_collect(engine, p, params, f"s{i}") for i, p in enumerate(PROMPTS)))
    watcher.cancel()
    offline = LLM(dtype="float32", max_model_len=2048).generate(PROMPTS, params, use_tqdm=False)
    for (text, ids, chunks), expected in zip(results, offline):
        assert ids == list(expected.outputs[0].token_ids)
        assert text == expected.outputs[0].text
        assert "\ufffd" not in text
        assert chunks > 1, "outputs are streamed, not delivered at the end"
    assert peak > 1, "concurrent callers share steps"
    assert steps_before.num_running == 0


async def test_abort_frees_blocks_and_ends_stream(engine):
    baseline = engine.get_stats().num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    seen = 0
    async for out in engine.generate("Tell me a very long story.", params, "to-abort"):
        seen += 1
        if seen == 3:
            await engine.abort("to-abort")
        if out.finished:
            assert out.outputs[0].finish_reason == "abort"
            break
    for _ in range(200):
        if engine.get_stats().num_free_blocks == baseline and engine.get_stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.get_stats().num_free_blocks == baseline


async def test_breaking_out_of_the_stream_aborts(engine):
    baseline = engine.get_stats().num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    async for _ in engine.generate("Another long story", params, "to-cancel"):
        break
    for _ in range(200):
        if engine.get_stats().num_running == 0 and engine.get_stats().num_free_blocks == baseline:
            break
        await asyncio.sleep(0.01)
    assert engine.get_stats().num_running == 0 and engine.get_stats().num_free_blocks == baseline


async def test_bad_request_does_not_reach_the_loop(engine):
    with pytest.raises(ValueError, match="prompt"):
        async for _ in engine.generate("", SamplingParams(), "bad"):
            pass
    text, ids, _ = await _collect(engine, "Hello", SamplingParams(temperature=0, max_tokens=4), "after-bad")
    assert len(ids) == 4 and not engine.is_dead


async def test_cumulative_output_kind(engine):
    outs = [o async for o in engine.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), "cum", output_kind=RequestOutputKind.CUMULATIVE)]
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 6


def test_cli_generate_streams_text():
    result = subprocess.run(
        [sys.executable, "-m", "distinfer.cli", "generate", "The capital of France is", "--max-tokens", "8", "--max-model-len", "512"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
