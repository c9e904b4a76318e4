"""The engine on CUDA (issue 9): greedy float32 equals transformers generate(do_sample=False) on the GPU
(TF32 off) token for token, in the default configuration (Triton attention, CUDA-graph decode), with small
prefill chunks, prefix-cache hits, preemption and either attention backend; CUDA-graph decode equals eager
decode over batches that land in several padded graph sizes; bfloat16 follows the bfloat16 oracle up to
near-ties; device="cuda"/"auto" run on the GPU; gpu_memory_utilization bounds the KV cache.

A tiny random Llama with head_dim 64 (the Triton kernels' real tile shapes) and the default model's
tokenizer (the carried copy on the GPU machine: $DISTINFER_TEST_TOKENIZER). Needs CUDA.
"""
from __future__ import annotations

import gc
import logging
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch

from distinfer import LLM, SamplingParams
from tests.conftest import save_tiny_llama

logger = logging.getLogger(__name__)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]

DEVICE = "cuda"
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False)
LM_HEAD_SCALE = 4.0
MAX_TOKENS = 16
PROMPT_LENS = [1, 5, 16, 17, 33, 64, 100, 150, 260]  # block edges (16), single-token, multi-chunk prompts
# Engines other than the default one: an explicit pool (not sized from free memory) and 32 sequences at most
# (7 decode graphs to capture instead of 19).
SMALL = dict(num_kv_blocks=512, max_num_seqs=32)
# bf16: the engine's token must be the bf16 oracle's argmax or within this fraction of the step's logit
# range (max - min) of it. Two bf16 implementations round differently: the CPU kernels measured <= 0.93% of
# the range (22 of 960 steps not the argmax) on this model; a real bug misses by a good part of the range.
BF16_NEAR_TIE = 0.03
BF16_MIN_ARGMAX = 0.8  # ... and at least this share of its tokens must be the oracle's argmax outright

Oracle = Callable[[list[int], int], list[int]]


def random_prompts(lengths: list[int], seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = MAX_TOKENS, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def runner(llm: LLM):
    """The in-process ModelRunner (world size 1: LocalExecutor -> Worker -> ModelRunner)."""
    return llm.engine.executor.worker.runner


def kv_bytes(llm: LLM) -> int:
    return sum(c.numel() * c.element_size() for c in runner(llm).kv_caches)


@contextmanager
def engine(model_dir: str, **kwargs) -> Iterator[LLM]:
    """An engine that gives its GPU memory back on exit (later engines size their KV from free memory)."""
    llm = LLM(model_dir, **kwargs)
    try:
        yield llm
    finally:
        llm.shutdown()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def assert_same(ours: list[list[int]], expected: list[list[int]], what: str) -> None:
    bad = [i for i, (a, b) in enumerate(zip(ours, expected)) if a != b]
    assert len(ours) == len(expected) and not bad, (
        f"{what}: prompts {bad} differ; first: ours={ours[bad[0]]} expected={expected[bad[0]]}" if bad else what)


@pytest.fixture(scope="module", autouse=True)
def no_tf32() -> Iterator[None]:
    """The float32 contract is against full-precision matmuls on both sides."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama-engine-cuda")), tokenizer_dir,
                           lm_head_scale=LM_HEAD_SCALE, **TINY)


def hf_model(model_dir: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(do_sample=False), one prompt at a time (no padding), stopping at EOS as we do."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def oracle(tiny_dir) -> Iterator[Oracle]:
    """float32 transformers on the GPU; answers are memoized across tests."""
    model = hf_model(tiny_dir, torch.float32)
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def answer(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in memo:
            memo[key] = hf_greedy(model, prompt, max_new_tokens)
        return memo[key]

    yield answer
    del model
    gc.collect()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(PROMPT_LENS, seed=1)


def expected(oracle: Oracle, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    return [oracle(p, max_tokens) for p in prompts]


def test_default_config_matches_transformers(tiny_dir, oracle, prompts):
    """LLM(dir, device="cuda", dtype="float32") and nothing else: Triton attention, CUDA-graph decode,
    KV sized by gpu_memory_utilization=0.9; all prompts batched together."""
    with engine(tiny_dir, device=DEVICE, dtype="float32") as llm:
        if DEVICE == "cuda":
            assert runner(llm).graphs is not None, "the default CUDA engine should capture decode graphs"
        assert_same(generate(llm, prompts, greedy()), expected(oracle, prompts), "default config")


def test_chunked_prefill_matches_transformers(tiny_dir, oracle, prompts):
    """A 32-token step budget: long prompts split over many steps, mixed with other requests' decodes."""
    with engine(tiny_dir, device=DEVICE, dtype="float32", max_num_batched_tokens=32, **SMALL) as llm:
        assert_same(generate(llm, prompts, greedy()), expected(oracle, prompts), "chunked prefill")


def test_prefix_cache_hits_match_transformers(tiny_dir, oracle):
    """Requests after the first reuse its 6 cached prefix blocks (96 tokens); the first prompt comes again too."""
    prefix = random_prompts([96], seed=2)[0]
    first, *others = [prefix + tail for tail in random_prompts([7, 9, 3], seed=3)]
    with engine(tiny_dir, device=DEVICE, dtype="float32", **SMALL) as llm:
        ours = generate(llm, [first], greedy())
        hits_before = llm.engine.get_stats().prefix_cache_hits
        ours += generate(llm, others + [first], greedy())
        assert llm.engine.get_stats().prefix_cache_hits > hits_before, "no prefix-cache hit"
    assert_same(ours, expected(oracle, [first, *others, first]), "prefix-cache hits")


def test_preemption_matches_transformers(tiny_dir, oracle):
    """20 KV blocks for 6 requests that need ~36: requests are preempted and recomputed."""
    batch = random_prompts([40, 37, 45, 33, 50, 41], seed=4)
    with engine(tiny_dir, device=DEVICE, dtype="float32", num_kv_blocks=20, max_model_len=256, max_num_seqs=32) as llm:
        ours = generate(llm, batch, greedy(48))
        assert llm.engine.get_stats().num_preemptions > 0, "the pool never ran out: no preemption was exercised"
    assert_same(ours, expected(oracle, batch, 48), "preemption")


@pytest.mark.parametrize("backend", ["triton", "torch_sdpa"])
def test_attention_backends_match_transformers(tiny_dir, oracle, prompts, backend):
    """Each CUDA attention backend, chosen explicitly, with chunked prefills in the batch."""
    with engine(tiny_dir, device=DEVICE, dtype="float32", attention_backend=backend, max_num_batched_tokens=128,
                **SMALL) as llm:
        assert_same(generate(llm, prompts, greedy()), expected(oracle, prompts), f"attention_backend={backend}")


GRAPH_BATCHES = [1, 3, 5, 9, 17]  # padded to graph sizes 1, 4, 8, 16, 24 (max_num_seqs 32)


def _graph_workload() -> list[tuple[list[list[int]], list[SamplingParams]]]:
    """Per batch: varied prompt lengths and output lengths, so the running batch shrinks step by step and
    decode steps land in every padded size at or below the batch's own."""
    rng = random.Random(5)
    work = []
    for size in GRAPH_BATCHES:
        batch = random_prompts([rng.randint(1, 80) for _ in range(size)], seed=100 + size)
        work.append((batch, [greedy(4 + 2 * i, ignore_eos=True) for i in range(size)]))
    return work


def test_cuda_graph_decode_equals_eager(tiny_dir):
    """enforce_eager=False (decode replays captured graphs, padded rows) == enforce_eager=True, token for token."""
    results = {}
    for eager in (False, True):
        with engine(tiny_dir, device=DEVICE, dtype="float32", enforce_eager=eager, **SMALL) as llm:
            assert (runner(llm).graphs is None) == eager
            results[eager] = [generate(llm, batch, params) for batch, params in _graph_workload()]
    for size, graphed, eager in zip(GRAPH_BATCHES, results[False], results[True]):
        assert_same(graphed, eager, f"batch of {size}: CUDA graphs vs eager")


def _bf16_gaps(model, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced on our tokens: per step, (oracle's best logit - its logit for our token, its logit range)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens], device=model.device)
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    best = logits.max(-1).values
    return (best - chosen).cpu(), (best - logits.min(-1).values).cpu()


def test_bfloat16_follows_bfloat16_transformers_up_to_near_ties(tiny_dir, prompts):
    """bf16 cannot match another bf16 implementation token for token everywhere (rounding flips near-ties):
    every step where our token is not the bf16 oracle's argmax must be a near-tie for the oracle, and most
    steps must agree outright; where we part from its generate(), that step too is a near-tie."""
    with engine(tiny_dir, device=DEVICE, dtype="bfloat16", **SMALL) as llm:
        ours = generate(llm, prompts, greedy(24, ignore_eos=True))
    model = hf_model(tiny_dir, torch.bfloat16)
    argmax_steps = total_steps = 0
    for prompt, tokens in zip(prompts, ours):
        assert len(tokens) == 24
        gaps, scale = _bf16_gaps(model, prompt, tokens)
        worst = int((gaps / scale).argmax())
        assert gaps[worst] <= BF16_NEAR_TIE * scale[worst], (
            f"prompt of {len(prompt)}: step {worst} token {tokens[worst]} is {gaps[worst]:.4f} below the oracle's "
            f"best (logit range {scale[worst]:.2f})")
        theirs = hf_greedy(model, prompt, 24)
        split = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), None)
        if split is not None:
            logger.info("prompt of %d: bf16 parts from transformers at step %d (gap %.4f of %.2f)", len(prompt),
                        split, gaps[split], scale[split])
        argmax_steps += int((gaps == 0).sum())
        total_steps += len(tokens)
    assert argmax_steps >= BF16_MIN_ARGMAX * total_steps, f"only {argmax_steps}/{total_steps} steps are the argmax"


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_and_auto_devices_run_on_the_gpu(tiny_dir, oracle, prompts, device):
    """Both land on the GPU: the model, the KV cache and the step's memory are CUDA; "auto" also picks
    bfloat16 (dtype="auto"), "cuda" is asked for float32 and matches the oracle."""
    before = torch.cuda.memory_allocated()
    dtype = "float32" if device == "cuda" else "auto"
    with engine(tiny_dir, device=device, dtype=dtype, **SMALL) as llm:
        run = runner(llm)
        params = {p.device.type for p in run.model.parameters()} | {c.device.type for c in run.kv_caches}
        assert run.device.type == "cuda" and params == {"cuda"}, (run.device, params)
        assert torch.cuda.memory_allocated() > before + kv_bytes(llm) // 2
        assert next(run.model.parameters()).dtype == (torch.float32 if device == "cuda" else torch.bfloat16)
        outputs = generate(llm, prompts[:3], greedy())
    assert all(len(o) > 0 for o in outputs)
    if device == "cuda":
        assert_same(outputs, expected(oracle, prompts[:3]), "device='cuda'")


def test_gpu_memory_utilization_bounds_the_kv_cache(tiny_dir):
    """gpu_memory_utilization=0.5: a KV block count that fills most of half the card and stays inside it."""
    total = torch.cuda.mem_get_info()[1]
    with engine(tiny_dir, device=DEVICE, dtype="float32", gpu_memory_utilization=0.5) as llm:
        blocks = llm.engine.get_stats().num_total_blocks
        kv = kv_bytes(llm)
        per_block = runner(llm).model.kv_cache_bytes_per_block(16)
        logger.info("gpu_memory_utilization=0.5: %d blocks, %.2f GiB KV of %.2f GiB", blocks, kv / 2**30, total / 2**30)
        assert blocks > 0 and kv == blocks * per_block
        assert 0.25 * total < kv < 0.5 * total
        assert torch.cuda.memory_reserved() < 0.5 * total + (1 << 30)  # all of ours (weights, graphs) inside the share
        assert len(generate(llm, random_prompts([20], seed=6), greedy())[0]) > 0
