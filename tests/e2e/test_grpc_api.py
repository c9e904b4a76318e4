"""The gRPC server and client SDK on the real model over loopback: exact streaming, batching,
cancel / deadline / abort freeing KV blocks, n > 1, logprobs, info RPCs and their `model` field."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from distinfer import AsyncLLM, LLM, SamplingParams
from distinfer.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    GenerateDelta,
    NotFoundError,
    ResourceExhaustedError,
)
from distinfer.serving.grpc_server import GrpcServerThread
from distinfer.v1 import inference_pb2 as pb
from distinfer.v1 import inference_pb2_grpc as pb_grpc

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Emoji test: 🚀🚀 and 東京", "1, 2, 3,"]
ENGINE_KWARGS = dict(dtype="float32", max_model_len=2048, num_kv_blocks=512)
LONG = dict(max_tokens=1500, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(**ENGINE_KWARGS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with GrpcServerThread(engine, model_name="smollm2") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=120) as client:
        yield client


def wait_idle(client: Client, baseline_free: int) -> None:
    """Bounded wait until nothing runs and every KV block is free again."""
    for _ in range(500):
        load = client.server_info().load
        if load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == baseline_free:
            return
        time.sleep(0.02)
    load = client.server_info().load
    assert (load.num_running, load.num_waiting, load.num_free_blocks) == (0, 0, baseline_free)


def test_streams_equal_offline_generate(client):
    kwargs = dict(temperature=0, max_tokens=24)

    def stream(prompt: str) -> tuple[str, list[int], GenerateDelta, int]:
        deltas = list(client.generate_stream(prompt, **kwargs))
        assert deltas[-1].usage is not None and all(d.usage is None for d in deltas[:-1])
        return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1], len(deltas)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent streams, batched by the engine
        streamed = list(pool.map(stream, PROMPTS))
    assert all(n > 1 for *_, n in streamed), "deltas are streamed, not delivered at the end"
    by_ids = client.generate(client.tokenize(PROMPTS[0]).token_ids, **kwargs)
    llm = LLM(**ENGINE_KWARGS)
    try:
        offline = llm.generate(PROMPTS, SamplingParams(**kwargs), use_tqdm=False)
    finally:
        llm.shutdown()
    for (text, ids, last, _), expected in zip(streamed, offline):
        assert ids == list(expected.outputs[0].token_ids)
        assert text == expected.outputs[0].text
        assert last.finish_reason == expected.outputs[0].finish_reason
        assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert last.usage.completion_tokens == len(ids)
    assert by_ids.token_ids == list(offline[0].outputs[0].token_ids)


async def test_32_concurrent_streams_finish_and_are_batched(server, client):
    baseline = client.server_info().load.num_free_blocks
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    peak = 0
    async with AsyncClient(server.target, timeout=300) as aclient:
        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, (await aclient.server_info()).load.num_running)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(aclient.generate(p, temperature=0, max_tokens=16, ignore_eos=True)
                                             for p in prompts))
        finally:
            watcher.cancel()
    assert all(r.finish_reason == "length" and len(r.token_ids) == 16 and r.usage.completion_tokens == 16
               for r in results)
    assert len({r.request_id for r in results}) == 32
    assert peak > 1, "concurrent streams share engine steps"
    wait_idle(client, baseline)


def test_cancel_mid_stream_frees_blocks(client):
    baseline = client.server_info().load.num_free_blocks
    with client.generate_stream("Tell me a very long story.", **LONG) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                assert client.server_info().load.num_free_blocks < baseline
                break
    wait_idle(client, baseline)


async def test_async_cancel_of_the_consuming_task_frees_blocks(server, client):
    baseline = client.server_info().load.num_free_blocks
    started = asyncio.Event()
    async with AsyncClient(server.target) as aclient:
        async def consume() -> None:
            async for _ in aclient.generate_stream("Another long story", **LONG):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.to_thread(wait_idle, client, baseline)


def test_deadline_exceeded_aborts_the_request(client):
    baseline = client.server_info().load.num_free_blocks
    with pytest.raises(DeadlineExceededError):
        client.generate("Write a long essay about the sea.", timeout=1.0, **LONG)
    wait_idle(client, baseline)


def test_abort_rpc_ends_the_stream(client):
    baseline = client.server_info().load.num_free_blocks
    deltas = []
    with client.generate_stream("Count to one thousand:", request_id="to-abort", **LONG) as stream:
        for delta in stream:
            deltas.append(delta)
            if len(deltas) == 2:
                assert client.abort("to-abort") is True
    assert deltas[-1].finish_reason == "abort" and deltas[-1].usage is not None
    assert client.abort("to-abort") is False
    wait_idle(client, baseline)


def test_duplicate_running_request_id(client):
    with client.generate_stream("A long one", request_id="dup", **LONG) as stream:
        next(stream)
        with pytest.raises(AlreadyExistsError, match="dup"):
            client.generate("Hi", request_id="dup", max_tokens=2)
    assert client.generate("Hi", request_id="dup", max_tokens=2).token_ids  # free again once finished


def test_queue_full_is_resource_exhausted(engine, client):
    saved = engine.max_pending_requests
    engine.max_pending_requests = 0
    try:
        with pytest.raises(ResourceExhaustedError, match="too many requests"):
            client.generate("Hi", max_tokens=2)
    finally:
        engine.max_pending_requests = saved
    assert len(client.generate("Hi", max_tokens=2).token_ids) == 2


def test_n_seeded_sampling_logprobs_and_stop(client):
    kwargs = dict(n=3, temperature=0.9, seed=7, max_tokens=12, logprobs=2)
    first, again = client.generate("My favourite colour is", **kwargs), client.generate("My favourite colour is", **kwargs)
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs], "seeded: reproducible"
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in first.outputs)
    for out in first.outputs:
        assert len(out.logprobs) == len(out.token_ids)
        for token_id, position in zip(out.token_ids, out.logprobs):
            assert position[0].token_id == token_id and 2 <= len(position) <= 3
    greedy = client.generate("The capital of France is", temperature=0, max_tokens=24)
    word = greedy.text.split()[1]
    stopped = client.generate("The capital of France is", temperature=0, max_tokens=24, stop=[word])
    assert stopped.finish_reason == "stop" and stopped.outputs[0].stop_reason == word
    assert word not in stopped.text


def test_info_and_tokenize(engine, client):
    info = client.model_info()
    assert info.model_name == "smollm2" and info.max_model_len == 2048 and info.model_type == "llama"
    assert info.vocab_size == engine.engine.hf_config.vocab_size and info.eos_token_ids and info.max_n == 16
    server_info = client.server_info()
    assert server_info.version and server_info.parallel_config.world_size == 1
    assert server_info.load.num_total_blocks == 512 and not server_info.draining and not server_info.dead
    tokens = client.tokenize("Hello world")
    assert tokens.token_ids == engine.tokenizer.encode("Hello world", add_special_tokens=True)
    assert len(tokens.tokens) == len(tokens.token_ids) and tokens.max_model_len == 2048
    assert client.health() == "SERVING"


def test_sync_client_is_thread_safe(client):
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(client.generate("Hi there", temperature=0, max_tokens=6).token_ids))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(r == results[0] for r in results)


def test_cancel_before_reading_raises_nothing(client):
    stream = client.generate_stream("Hi", max_tokens=4)
    stream.cancel()
    assert list(stream) == []


MODEL_FIELD_REQUESTS = {  # RPC -> a request naming `model` (DrainInstance: an id that would pass its own checks)
    "GetModelInfo": lambda model: pb.GetModelInfoRequest(model=model),
    "GetServerInfo": lambda model: pb.GetServerInfoRequest(model=model),
    "DrainInstance": lambda model: pb.DrainInstanceRequest(instance_id="instance-0", timeout_s=0, model=model),
}


@pytest.mark.parametrize("method", sorted(MODEL_FIELD_REQUESTS))
def test_info_and_drain_rpcs_check_the_model_field(server, method):
    """Raw stubs (no SDK): a name the server does not serve is refused as the other RPCs refuse it
    (validate_model_name: NOT_FOUND naming `model`, as HTTP's 404); the served name and the empty one pass the check
    (DrainInstance then meets the single engine: FAILED_PRECONDITION)."""
    with grpc.insecure_channel(server.target) as channel:
        call = getattr(pb_grpc.InferenceServiceStub(channel), method)
        with pytest.raises(grpc.RpcError) as refused:
            call(MODEL_FIELD_REQUESTS[method]("gpt-17"), timeout=60)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert refused.value.details().startswith("model ") and "'gpt-17' is not served" in refused.value.details()
        for model in ("smollm2", ""):
            if method == "DrainInstance":
                with pytest.raises(grpc.RpcError) as single:
                    call(MODEL_FIELD_REQUESTS[method](model), timeout=60)
                assert single.value.code() == grpc.StatusCode.FAILED_PRECONDITION, single.value.details()
            else:
                assert call(MODEL_FIELD_REQUESTS[method](model), timeout=60).model_name == "smollm2"


def test_sync_client_sends_the_model(client):
    assert client.model_info(model="smollm2").model_name == "smollm2"
    assert client.server_info(model="smollm2").model_name == "smollm2"
    assert client.tokenize("Hi", model="smollm2").token_ids == client.tokenize("Hi").token_ids
    with pytest.raises(FailedPreconditionError):  # past the model check, to the single engine's refusal
        client.drain_instance("instance-0", 0, model="smollm2")
    wrong = [lambda: client.model_info(model="gpt-17"), lambda: client.server_info(model="gpt-17"),
             lambda: client.tokenize("Hi", model="gpt-17"), lambda: client.drain_instance("instance-0", 0, model="gpt-17")]
    for call in wrong:
        with pytest.raises(NotFoundError, match="'gpt-17' is not served"):
            call()


async def test_async_client_sends_the_model(server):
    async with AsyncClient(server.target, timeout=60) as aclient:
        assert (await aclient.model_info(model="smollm2")).model_name == "smollm2"
        assert (await aclient.server_info(model="smollm2")).model_name == "smollm2"
        assert (await aclient.tokenize("Hi", model="smollm2")).token_ids == (await aclient.tokenize("Hi")).token_ids
        with pytest.raises(FailedPreconditionError):
            await aclient.drain_instance("instance-0", 0, model="smollm2")
        wrong = [aclient.model_info(model="gpt-17"), aclient.server_info(model="gpt-17"),
                 aclient.tokenize("Hi", model="gpt-17"), aclient.drain_instance("instance-0", 0, model="gpt-17")]
        for call in wrong:
            with pytest.raises(NotFoundError, match="'gpt-17' is not served"):
                await call
