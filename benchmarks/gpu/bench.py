"""Issue 9 GPU benchmark: distinfer vs transformers (eager) on a Llama-3-8B-shaped model, same process.

    python benchmarks/gpu/bench.py --out /tmp/gpu_bench.json                 # one GPU, ~3-4 minutes
    python benchmarks/gpu/bench.py --tiny --device cpu --out /tmp/smoke.json # logic check, tiny model, CPU

Dummy bfloat16 weights (distinfer: load_format="dummy"; transformers: from_config on the device), prompts
as random token ids, greedy with ignore_eos so both sides produce exactly the requested tokens. Figures:
device copy bandwidth and the batch-1 decode bound it gives; batch-1 and batch-64 decode tok/s (prefill
removed by differencing two runs); offline throughput of 128 x 512-token prompts / 128 outputs and of a
ShareGPT-like mix; the GPU busy fraction of batch-64 decode steps (torch.profiler); start-up time and KV
blocks at gpu_memory_utilization=0.9. Both models do not fit next to a 0.9 KV cache, so transformers runs
first and is freed (empty_cache) before distinfer starts. Results go to --out as JSON after every phase.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gpu_measure import (busy_fraction, copy_bandwidth, decode_rate, fixed_workload, random_prompts,  # noqa: E402
                         sharegpt_like, timed, write_model_dir)
from hf_baseline import build_hf_model, hf_generate, hf_throughput, try_cache, weight_bytes  # noqa: E402

from distinfer import LLM, SamplingParams  # noqa: E402

logger = logging.getLogger("benchmarks.gpu")

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = {"batch1_fraction_of_bound": 0.70, "batch64_ratio": 4.0, "fixed_ratio": 8.0, "busy_fraction": 0.85}


@dataclass(frozen=True)
class Sizes:
    decode_prompt: int  # prompt tokens of the decode-rate runs
    ours_b1: tuple[int, int]  # (short, long) max_tokens; their difference is the decode steps timed
    hf_b1: tuple[int, int]
    big_batch: int
    ours_big: tuple[int, int]
    hf_big: tuple[int, int]
    fixed: tuple[int, int, int]  # requests, prompt tokens, output tokens
    mix_requests: int
    mix_prompt: tuple[int, int]
    mix_output: tuple[int, int]
    hf_batch_sizes: tuple[int, ...]
    busy_steps: int
    bandwidth_bytes: int
    prompt_vocab: int  # prompt token ids are drawn from [100, prompt_vocab)


FULL = Sizes(32, (16, 144), (8, 40), 64, (8, 72), (4, 36), (128, 512, 128), 128, (16, 1024), (16, 512),
             (64, 128), 10, 4 << 30, 49152)
TINY = Sizes(8, (4, 24), (4, 12), 4, (4, 12), (4, 12), (8, 32, 8), 8, (8, 64), (4, 16), (4, 8), 3, 64 << 20, 49152)


class Results(dict):
    """The JSON report, rewritten after every phase (a run cut short keeps what it measured)."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self, indent=2, default=str))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def run_ours(llm: LLM, prompts: list[list[int]], max_tokens: int | list[int]) -> int:
    lens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    outputs = llm.generate(prompts, [greedy(n) for n in lens], use_tqdm=False)
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(lens), (produced, sum(lens))
    return produced


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = torch.cuda.mem_get_info(device)[1] / 2**30
    return env


def hf_decode_rate(model, batch: int, steps: tuple[int, int], sizes: Sizes, rng: np.random.Generator,
                   device: torch.device, cache: str | None) -> float:
    run = functools.partial(hf_generate, model, pad_id=0, cache=cache)
    return decode_rate(run, batch, sizes.decode_prompt, *steps, sizes.prompt_vocab, rng, device)


def hf_decode(hf: dict, model, sizes: Sizes, device: torch.device, rng: np.random.Generator) -> None:
    """Batch-1 and batch-N decode rates with the dynamic and the static cache; the faster one counts."""
    for key, batch, steps in (("batch1", 1, sizes.hf_b1), ("big", sizes.big_batch, sizes.hf_big)):
        rates = {}
        for cache in (None, "static"):
            measure = functools.partial(hf_decode_rate, model, batch, steps, sizes, rng, device)
            rates[cache or "dynamic"] = try_cache(measure, cache)
        best = max((c for c in rates if rates[c] is not None), key=lambda c: rates[c])
        hf[f"{key}_decode_tok_s"], hf[f"{key}_cache"], hf[f"{key}_by_cache"] = rates[best], best, rates
        logger.info("transformers %s decode: %s tok/s", key, {c: r and round(r, 1) for c, r in rates.items()})


def guarded(hf: dict, what: str, fn):
    """fn(), or None with the error recorded (an OOM or failure of the baseline must not cost our figures)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        logger.exception("transformers %s failed", what)
        hf.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {e}"[:500])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def hf_offline(hf: dict, res: Results, model, sizes: Sizes, rng: np.random.Generator, fixed, mix,
               deadline: float) -> None:
    """Both offline workloads with the cache that decoded faster at batch N; runs past `deadline` are skipped."""
    cache = None if hf["big_cache"] == "dynamic" else hf["big_cache"]
    hf["throughput_cache"] = hf["big_cache"]
    hf_generate(model, random_prompts(rng, [sizes.fixed[1]] * 8, sizes.prompt_vocab), 8, 0, cache)  # warm-up
    by_batch = {}
    for bs in sizes.hf_batch_sizes:
        if time.perf_counter() > deadline:
            hf.setdefault("skipped", []).append(f"fixed workload at batch {bs} (time)")
            continue
        run = functools.partial(hf_throughput, model, fixed, bs, 0, cache)
        rate = guarded(hf, f"fixed workload at batch {bs}", run)
        if rate is not None:
            by_batch[bs] = rate
            logger.info("transformers fixed workload, batch %d: %.1f tok/s", bs, rate)
        res.save()
    if not by_batch:
        return
    best_bs = max(by_batch, key=by_batch.get)
    hf["fixed_tok_s"], hf["fixed_batch_size"], hf["fixed_by_batch"] = by_batch[best_bs], best_bs, by_batch
    if time.perf_counter() > deadline:
        hf.setdefault("skipped", []).append("ShareGPT-like mix (time)")
        return
    hf["mix_batch_size"] = best_bs
    hf["mix_tok_s"] = guarded(hf, "ShareGPT-like mix", functools.partial(hf_throughput, model, mix, best_bs, 0, cache))
    logger.info("transformers ShareGPT-like mix, batch %d: %s tok/s", best_bs, hf["mix_tok_s"])


def hf_phase(res: Results, model_dir: str, sizes: Sizes, dtype: torch.dtype, device: torch.device,
             rng: np.random.Generator, fixed, mix, deadline: float) -> None:
    """transformers first, then freed (del, gc, empty_cache) so distinfer can take its share of the card."""
    hf = res["transformers"] = {}
    started = time.perf_counter()
    model = build_hf_model(model_dir, dtype, device)
    hf["build_s"] = time.perf_counter() - started
    hf["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    hf_decode(hf, model, sizes, device, rng)
    res.save()
    hf_offline(hf, res, model, sizes, rng, fixed, mix, deadline)
    res.save()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        hf["memory_allocated_after_free_gib"] = torch.cuda.memory_allocated(device) / 2**30


def engine_kwargs(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    kwargs = dict(load_format="dummy", dtype=str(dtype).removeprefix("torch."), device=str(device),
                  max_num_seqs=128, max_num_batched_tokens=args.max_num_batched_tokens)
    if device.type == "cuda":
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kwargs["num_kv_blocks"] = 4096  # the CPU smoke run: a small explicit pool
    return kwargs


def ours_busy(llm: LLM, sizes: Sizes, rng: np.random.Generator, device: torch.device) -> dict:
    """Profile decode steps of a full batch: add the requests, run their prefill and two decode steps, then
    profile `busy_steps` steps; abort them afterwards."""
    engine = llm.engine
    ids = [f"busy-{i}" for i in range(sizes.big_batch)]
    params = greedy(sizes.busy_steps + 16)
    for rid, prompt in zip(ids, random_prompts(rng, [sizes.decode_prompt] * len(ids), sizes.prompt_vocab)):
        engine.add_request(rid, prompt, params)
    for _ in range(3):
        engine.step()
    stats = engine.get_stats()
    result = busy_fraction(engine.step, sizes.busy_steps, device)
    result.update(batch=sizes.big_batch, running=stats.num_running, waiting=stats.num_waiting)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return result


def ours_start(ours: dict, args, model_dir: str, dtype: torch.dtype, device: torch.device) -> LLM:
    """Construct the engine (load + profile + KV allocation + graph capture), timed; its KV and weight figures."""
    kwargs = ours["engine_kwargs"] = engine_kwargs(args, dtype, device)
    started = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    ours["startup_s"] = time.perf_counter() - started
    ours["kv_blocks"] = llm.engine.get_stats().num_total_blocks
    model = llm.engine.executor.worker.runner.model
    ours["kv_gib"] = ours["kv_blocks"] * model.kv_cache_bytes_per_block(16) / 2**30
    ours["weight_bytes"], ours["weight_bytes_read_per_token"] = weight_bytes(model, tied=False)
    if device.type == "cuda":
        ours["memory_reserved_gib"] = torch.cuda.memory_reserved(device) / 2**30
    logger.info("distinfer up in %.1f s: %d KV blocks (%.1f GiB)", ours["startup_s"], ours["kv_blocks"], ours["kv_gib"])
    return llm


def ours_phase(res: Results, args, model_dir: str, sizes: Sizes, dtype: torch.dtype, device: torch.device,
               rng: np.random.Generator, fixed, mix) -> None:
    ours = res["distinfer"] = {}
    llm = ours_start(ours, args, model_dir, dtype, device)
    res.save()
    # Warm-up: the Triton kernels compile on first use of each shape class (long, short, odd prompt lengths).
    warm_lens = [sizes.fixed[1]] * 8 + [min(n, sizes.mix_prompt[1]) for n in (17, 100, 333, 1000)]
    ours["warmup_s"] = timed(lambda: run_ours(llm, random_prompts(rng, warm_lens, sizes.prompt_vocab), 8), device)
    run = lambda prompts, n: run_ours(llm, prompts, n)  # noqa: E731
    for key, batch, (short, long) in (("batch1", 1, sizes.ours_b1), ("big", sizes.big_batch, sizes.ours_big)):
        ours[f"{key}_decode_tok_s"] = decode_rate(run, batch, sizes.decode_prompt, short, long, sizes.prompt_vocab,
                                                  rng, device, repeats=2)
        logger.info("distinfer batch-%d decode: %.1f tok/s", batch, ours[f"{key}_decode_tok_s"])
        res.save()
    for key, work in (("fixed", fixed), ("mix", mix)):
        seconds = timed(lambda: run_ours(llm, work.prompts, work.output_lens), device)
        ours[f"{key}_tok_s"] = work.num_output_tokens / seconds
        logger.info("distinfer %s workload: %.1f tok/s (%.1f s)", key, ours[f"{key}_tok_s"], seconds)
        res.save()
    busy = ours["busy"] = ours_busy(llm, sizes, rng, device)
    # The same kernel time against an unprofiled step (the decode-rate run's step time): tracing slows the host.
    step_ms = 1e3 * sizes.big_batch / ours["big_decode_tok_s"]
    busy["busy_fraction_vs_unprofiled_step"] = (busy["kernel_busy_ms"] / busy["steps"] / step_ms
                                                if busy["kernel_events"] else None)
    logger.info("distinfer busy fraction: %s", busy)
    llm.shutdown()


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(res: Results, sizes: Sizes) -> list[tuple[str, object, object, object, object]]:
    """(figure, distinfer, baseline, ratio or fraction, target) rows; also stored under res["summary"]."""
    ours, hf, bw = res.get("distinfer", {}), res.get("transformers", {}), res.get("bandwidth", {})
    copy = bw.get("copy_bytes_per_s")
    bound = copy / ours["weight_bytes_read_per_token"] if copy and "weight_bytes_read_per_token" in ours else None
    if bound:
        bw["batch1_bound_tok_s"], bw["batch1_bound_all_weights_tok_s"] = bound, copy / ours["weight_bytes"]
    b1 = ours.get("batch1_decode_tok_s")
    busy = ours.get("busy", {}).get("busy_fraction")
    big = sizes.big_batch
    rows = [
        ("device copy bandwidth, GB/s (read + written)", copy and copy / 1e9, None, None, None),
        ("batch-1 decode bound, tok/s (bandwidth / weight bytes read)", bound, None, None, None),
        ("batch-1 decode, tok/s", b1, hf.get("batch1_decode_tok_s"), ratio(b1, hf.get("batch1_decode_tok_s")), None),
        ("batch-1 decode, fraction of bound", ratio(b1, bound), None, None, TARGETS["batch1_fraction_of_bound"]),
        (f"batch-{big} decode, tok/s", ours.get("big_decode_tok_s"), hf.get("big_decode_tok_s"),
         ratio(ours.get("big_decode_tok_s"), hf.get("big_decode_tok_s")), TARGETS["batch64_ratio"]),
        ("offline %d x %d/%d, output tok/s" % sizes.fixed, ours.get("fixed_tok_s"), hf.get("fixed_tok_s"),
         ratio(ours.get("fixed_tok_s"), hf.get("fixed_tok_s")), TARGETS["fixed_ratio"]),
        ("offline ShareGPT-like mix, output tok/s", ours.get("mix_tok_s"), hf.get("mix_tok_s"),
         ratio(ours.get("mix_tok_s"), hf.get("mix_tok_s")), None),
        (f"GPU busy fraction, batch-{big} decode steps", busy, None, None, TARGETS["busy_fraction"]),
        ("start-up s (load + profile + graph capture)", ours.get("startup_s"), None, None, None),
        ("KV blocks (16 tokens) at gpu_memory_utilization", ours.get("kv_blocks"), None, None, None),
    ]
    res["summary"] = [dict(zip(("figure", "distinfer", "transformers", "ratio", "target"), r)) for r in rows]
    return rows


def print_table(rows) -> None:
    fmt = lambda v: "-" if v is None else (f"{v:,.3f}" if isinstance(v, float) and abs(v) < 10 else  # noqa: E731
                                           f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
    print("\n| figure | distinfer | transformers | ratio | target |\n|---|---|---|---|---|")
    for name, ours, hf, r, target in rows:
        mark = "" if target is None or (r if r is not None else ours) is None else (
            " (met)" if (r if r is not None else ours) >= target else " (MISSED)")
        print(f"| {name} | {fmt(ours)} | {fmt(hf)} | {fmt(r)} | {fmt(target)}{mark} |")


def default_tokenizer() -> str:
    if os.environ.get("DISTINFER_TEST_TOKENIZER"):
        return os.environ["DISTINFER_TEST_TOKENIZER"]
    from distinfer.model.loader import resolve_model_path

    return resolve_model_path(None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results here as JSON (after every phase)")
    parser.add_argument("--tiny", action="store_true", help="a tiny config and few tokens: checks the logic")
    parser.add_argument("--shape", choices=("llama3-8b", "tiny"), default=None, help="override --tiny's model shape")
    parser.add_argument("--sizes", choices=("full", "tiny"), default=None, help="override --tiny's token counts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files (default: $DISTINFER_TEST_TOKENIZER, "
                        "else the default model's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--hf-deadline-s", type=float, default=120.0,
                        help="skip transformers' remaining offline runs after this many seconds of the benchmark")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    sizes = {"full": FULL, "tiny": TINY}[args.sizes or ("tiny" if args.tiny else "full")]
    shape = {"llama3-8b": LLAMA3_8B, "tiny": TINY_SHAPE}[args.shape or ("tiny" if args.tiny else "llama3-8b")]
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rng = np.random.default_rng(args.seed)
    res = Results(args.out)
    res.update(env=environment(device), shape=shape, dtype=str(dtype), sizes=asdict(sizes), targets=TARGETS,
               order="bandwidth; transformers (then freed: del, gc, empty_cache); distinfer at "
                     f"gpu_memory_utilization={args.gpu_memory_utilization}")
    tokenizer = args.tokenizer or default_tokenizer()
    model_dir = str(write_model_dir(Path(tempfile.mkdtemp(prefix="distinfer-bench-")), tokenizer, shape))
    fixed = fixed_workload(rng, *sizes.fixed, sizes.prompt_vocab)
    mix = sharegpt_like(rng, sizes.mix_requests, sizes.prompt_vocab, sizes.mix_prompt, sizes.mix_output)
    res["workloads"] = {"fixed": fixed.describe(), "mix": mix.describe()}
    res["bandwidth"] = {"copy_bytes_per_s": copy_bandwidth(device, sizes.bandwidth_bytes),
                        "bytes": sizes.bandwidth_bytes}
    logger.info("copy bandwidth %.1f GB/s; workloads %s", res["bandwidth"]["copy_bytes_per_s"] / 1e9, res["workloads"])
    res.save()
    try:
        hf_phase(res, model_dir, sizes, dtype, device, rng, fixed, mix, deadline=t0 + args.hf_deadline_s)
        res["transformers"]["phase_s"] = time.perf_counter() - t0
        ours_phase(res, args, model_dir, sizes, dtype, device, rng, fixed, mix)
    except BaseException as e:  # keep (and print) what was measured, then fail
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        rows = summarize(res, sizes)
        res["elapsed_s"] = time.perf_counter() - t0
        res.save()
        print_table(rows)
        print(f"\nelapsed {res['elapsed_s']:.1f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
