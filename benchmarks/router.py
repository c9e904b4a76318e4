"""Router benchmarks (issue 11): several engine instances behind one RouterEngine (real Ray actors), a tiny
random Llama, this machine's CPU. Every comparison runs its configurations in the same run, each on a fresh
RouterEngine, on the same workload (same seed, same arrival times).

    .venv/bin/python benchmarks/router.py imbalance [--instances 2] [--configs round_robin least_load+balance ...]
                                                    [--track-moves] [--quick] [--json out.json]
    .venv/bin/python benchmarks/router.py pd [--quick]
    .venv/bin/python benchmarks/router.py downtime [--lengths 128 512 2048 8192] [--repeats 5] [--quick]
    .venv/bin/python benchmarks/router.py all [--quick]      # ~5.5 min (--quick: ~3 min)

- imbalance: a Poisson stream of short and long requests (skewed sizes: a few long prompts with many output
  tokens among many short ones) on a KV budget per instance that holds about one long request, so piling
  long requests on one instance makes the others queue or be preempted there. Round-robin vs least-load vs
  least-load + the "balance" migration policy (--configs: any "dispatch[+migration]" policies; ratios against
  the first): TTFT percentiles (client side: first output - send), total time, preemptions (summed over the
  instances), migrations by result; --track-moves also asks the router where each request runs every 0.1 s.
- pd: 1 prefill + 1 decode instance vs 2 colocated (least-load), the same kind of workload: TTFT and
  inter-token latency percentiles (a delta of k tokens after a gap g counts as k gaps of g / k).
- downtime: one request alone, moved mid-decode with the router's default multi-stage pre-copy vs
  stop-and-copy (MigrationConfig(max_stages=0)) at several sequence lengths. Downtime = the largest gap in the
  client's token stream from the migrate() call until a few tokens after it returned, minus the median gap of
  the tokens before the call; MigrationResult.paused_s is reported with it.

The model: a random Llama (4 layers, hidden 256, 4 heads / 2 KV heads, the default model's tokenizer), built
once into a temporary directory (--model-dir to keep it). Ray's per-token streaming (instance -> router ->
client, three processes on two cores) dominates its step time, not the model.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distinfer import SamplingParams  # noqa: E402
from distinfer.router import RouterEngine  # noqa: E402
from distinfer.router.migration import MigrationConfig, MigrationResult  # noqa: E402
from distinfer.router.policies import check_dispatch_policy  # noqa: E402
from distinfer.router.rebalance import check_migration_policy  # noqa: E402

logger = logging.getLogger("benchmarks.router")
TINY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=False)
BLOCK_SIZE = 16
IMBALANCE_CONFIGS = ["round_robin", "least_load", "least_load+balance"]
TTFT_COLUMNS = ("ttft_p90", "ttft_p99", "ttft_mean", "short_ttft_p99", "long_ttft_p99")


def build_tiny_model(path: str) -> str:
    """A random Llama of TINY_SHAPE (seed 0) with the default model's tokenizer, saved at `path` once."""
    if (Path(path) / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distinfer.config import ModelConfig
    from distinfer.model.loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig().model))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 150
    rate: float = 4.0  # requests per second (Poisson arrivals)
    long_fraction: float = 0.2
    long_prompt: tuple[int, int] = (640, 1024)  # uniform, inclusive
    long_output: tuple[int, int] = (128, 256)
    short_prompt: tuple[int, int] = (16, 128)
    short_output: tuple[int, int] = (8, 32)
    seed: int = 0


@dataclass
class Req:
    request_id: str
    arrival_s: float  # after the start of the replay
    prompt: list[int]
    max_tokens: int
    long: bool


def make_workload(spec: WorkloadSpec) -> list[Req]:
    rng = np.random.default_rng(spec.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / spec.rate, size=spec.num_requests))
    reqs = []
    for i, arrival in enumerate(arrivals):
        long = bool(rng.random() < spec.long_fraction)
        prompt_range, output_range = (spec.long_prompt, spec.long_output) if long else (spec.short_prompt,
                                                                                          spec.short_output)
        prompt = rng.integers(100, 40000, size=int(rng.integers(prompt_range[0], prompt_range[1] + 1))).tolist()
        reqs.append(Req(f"r{i}", float(arrival - arrivals[0]), prompt,
                        int(rng.integers(output_range[0], output_range[1] + 1)), long))
    return reqs


def describe(reqs: list[Req]) -> str:
    longs = [r for r in reqs if r.long]
    return (f"{len(reqs)} requests over {reqs[-1].arrival_s:.1f} s ({len(longs)} long), "
            f"{sum(len(r.prompt) for r in reqs)} prompt + {sum(r.max_tokens for r in reqs)} output tokens")


# ---------------------------------------------------------------- replay


@dataclass
class Trace:
    request_id: str
    long: bool
    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in the delta)
    error: str = ""
    places: list[str] = field(default_factory=list)  # instances seen running it (--track-moves)

    @property
    def ttft(self) -> float:
        return self.arrivals[0][0] - self.sent

    def gaps(self) -> list[float]:
        """Inter-token gaps: a delta of k tokens after a gap g counts as k gaps of g / k."""
        out: list[float] = []
        timed = [(t, n) for t, n in self.arrivals if n]
        for (prev, _), (now, n) in itertools.pairwise(timed):
            out += [(now - prev) / n] * n
        return out


async def run_request(engine: RouterEngine, req: Req, start: float, in_flight: dict[str, Trace]) -> Trace:
    await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
    trace = Trace(req.request_id, req.long, time.perf_counter())
    params = SamplingParams(temperature=0, max_tokens=req.max_tokens, ignore_eos=True)
    in_flight[req.request_id] = trace
    try:
        async for out in engine.generate({"prompt_token_ids": req.prompt}, params, req.request_id):
            trace.arrivals.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    except Exception as exc:  # counted and reported, never hidden
        trace.error = f"{type(exc).__name__}: {exc}"
    finally:
        del in_flight[req.request_id]
    return trace


async def track_moves(engine: RouterEngine, in_flight: dict[str, Trace], interval_s: float = 0.1) -> None:
    """Where each request in flight runs, every interval (a move and back within one interval is missed)."""
    while True:
        traces = list(in_flight.values())
        for trace, place in zip(traces, await asyncio.gather(*(engine.where(t.request_id) for t in traces))):
            if place is not None and (not trace.places or trace.places[-1] != place):
                trace.places.append(place)
        await asyncio.sleep(interval_s)


async def replay(engine: RouterEngine, reqs: list[Req], track: bool = False) -> tuple[list[Trace], float]:
    start, in_flight = time.perf_counter() + 0.2, {}
    tracker = asyncio.ensure_future(track_moves(engine, in_flight)) if track else None
    traces = await asyncio.gather(*(run_request(engine, r, start, in_flight) for r in reqs))
    if tracker is not None:
        tracker.cancel()
    return list(traces), max(t.arrivals[-1][0] for t in traces if t.arrivals) - start


def final_state(engine: RouterEngine) -> Any:
    """The router's state after the last load report that follows the run."""
    import ray

    time.sleep(3 * engine.router_config.load_interval_s)
    return ray.get(engine.router.state.remote(), timeout=30)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(name: str, traces: list[Trace], wall: float, state: Any) -> dict:
    done = [t for t in traces if t.arrivals and not t.error]
    ttft = [t.ttft for t in done]
    short_ttft, long_ttft = [t.ttft for t in done if not t.long], [t.ttft for t in done if t.long]
    gaps = [g for t in done for g in t.gaps()]
    return {"config": name, "requests": len(traces), "errors": sum(bool(t.error) for t in traces),
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
            "ttft_mean": float(np.mean(ttft)), "short_ttft_p99": pct(short_ttft, 99),
            "long_ttft_p99": pct(long_ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "total_s": wall, "preemptions": state.stats.num_preemptions, "migrations": dict(state.migrations),
            "moves_seen": sum(max(0, len(t.places) - 1) for t in traces),
            "moved_twice_or_more": sorted(t.request_id for t in traces if len(t.places) > 2),
            "per_request": [(t.request_id, t.long, round(t.ttft, 4) if t.arrivals else None, t.places) for t in traces]}


def run_config(name: str, model: str, reqs: list[Req], router_kwargs: dict, engine_kwargs: dict,
               track: bool = False) -> dict:
    """A fresh RouterEngine for one configuration: replay the workload, summarize, shut it down."""
    logger.info("%s: starting %s", name, router_kwargs)
    engine = RouterEngine(model, **router_kwargs, **engine_kwargs)
    try:
        load_before = os.getloadavg()[0]
        traces, wall = asyncio.run(replay(engine, reqs, track))
        row = summarize(name, traces, wall, final_state(engine))
        row["loadavg"] = (round(load_before, 1), round(os.getloadavg()[0], 1))  # 1-min, this shared machine
    finally:
        engine.shutdown()
    for trace in traces:
        if trace.error:
            logger.warning("%s: request %s failed: %s", name, trace.request_id, trace.error)
    logger.info("%s: %s", name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                                 if k != "per_request"})
    return row


# ---------------------------------------------------------------- the three parts


def serving_kwargs(args: argparse.Namespace, spec: WorkloadSpec) -> dict:
    """KV budget per instance: --kv-blocks (default: one longest request, rounded up to blocks)."""
    max_len = spec.long_prompt[1] + spec.long_output[1]
    blocks = args.kv_blocks or -(-max_len // BLOCK_SIZE)
    return dict(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=blocks, max_model_len=max_len,
                enable_prefix_caching=False)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    spec = WorkloadSpec(num_requests=args.requests, rate=args.rate, long_fraction=args.long_fraction, seed=args.seed)
    return replace(spec, num_requests=min(spec.num_requests, 30)) if args.quick else spec


def policies(config: str) -> dict[str, str]:
    """"dispatch[+migration]", e.g. "least_load+balance" -> RouterEngine's policy arguments (checked)."""
    dispatch, _, migration = config.partition("+")
    check_dispatch_policy(dispatch)
    check_migration_policy(migration or "none")
    return {"dispatch_policy": dispatch, "migration_policy": migration or "none"}


def imbalance(args: argparse.Namespace, model: str) -> list[dict]:
    spec = workload_spec(args)
    reqs, engine_kwargs = make_workload(spec), serving_kwargs(args, spec)
    logger.info("imbalance workload: %s; %s; engine %s", describe(reqs), spec, engine_kwargs)
    rows = [run_config(name, model, reqs, dict(policies(name), num_instances=args.instances), engine_kwargs,
                       args.track_moves) for name in args.configs]
    base = rows[0]
    for row in rows:
        row["p99_vs_first"] = base["ttft_p99"] / row["ttft_p99"]
        row["p50_vs_first"] = base["ttft_p50"] / row["ttft_p50"]
    return rows


def pd(args: argparse.Namespace, model: str) -> list[dict]:
    spec = workload_spec(args)
    reqs, engine_kwargs = make_workload(spec), serving_kwargs(args, spec)
    logger.info("pd workload: %s; %s; engine %s", describe(reqs), spec, engine_kwargs)
    configs = [("colocated 2 (least_load)", dict(num_instances=2, dispatch_policy="least_load")),
               ("1 prefill + 1 decode", dict(prefill_instances=1, decode_instances=1))]
    return [run_config(name, model, reqs, kw, engine_kwargs, args.track_moves) for name, kw in configs]


# ---------------------------------------------------------------- downtime through the router

WARM_TOKENS = 16  # tokens streamed before the move; the normal gap is their median
AFTER_TOKENS = 8  # tokens read after migrate() returned, then the request is aborted


async def one_move(engine: RouterEngine, request_id: str, prompt: list[int], config: MigrationConfig) -> dict:
    """Stream a request, move it after WARM_TOKENS tokens, read AFTER_TOKENS more, abort it."""
    params = SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)
    times: list[float] = []
    move: asyncio.Future | None = None
    moved_at = (0.0, 0.0)
    after = 0
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        if out.outputs[0].token_ids:
            times.append(time.perf_counter())
        if len(times) == WARM_TOKENS and move is None:
            called = time.perf_counter()
            move = asyncio.ensure_future(engine.migrate(request_id, None, config))
        if move is not None and move.done():
            after += 1
            if after == 1:
                moved_at = (called, time.perf_counter())
            if after > AFTER_TOKENS:
                break
    assert move is not None
    result: MigrationResult = move.result()
    normal = float(statistics.median(np.diff(times[:WARM_TOKENS])))
    gap, gap_start = max((b - a, a) for a, b in itertools.pairwise(times) if moved_at[0] <= b and a <= moved_at[1])
    return {"downtime_s": gap - normal, "inter_token_s": normal, "paused_s": result.paused_s,
            "status": result.status.value, "stage_blocks": result.stage_blocks, "stage_s": result.stage_seconds,
            "migrate_s": moved_at[1] - moved_at[0], "gap_after_call_s": gap_start - moved_at[0]}


def downtime(args: argparse.Namespace, model: str) -> list[dict]:
    lengths = [128, 512] if args.quick else args.lengths
    repeats = 1 if args.quick else args.repeats
    max_len = max(lengths) + 2048
    engine = RouterEngine(model, num_instances=2, dtype="float32", block_size=BLOCK_SIZE, max_model_len=max_len,
                          num_kv_blocks=-(-max_len // BLOCK_SIZE), enable_prefix_caching=False)
    modes = {"multi-stage": MigrationConfig(), "stop-and-copy": MigrationConfig(max_stages=0)}
    rng = np.random.default_rng(args.seed)
    rows = []
    try:
        for length in lengths:
            for mode, config in modes.items():
                moves = [asyncio.run(one_move(engine, f"{mode}-{length}-{i}",
                                              rng.integers(100, 40000, size=length).tolist(), config))
                         for i in range(repeats)]
                moves.sort(key=lambda m: m["downtime_s"])
                logger.info("%s at %d: downtimes %s ms, statuses %s", mode, length,
                            [round(1e3 * float(m["downtime_s"]), 1) for m in moves], [m["status"] for m in moves])
                rows.append(dict(moves[len(moves) // 2], length=length, mode=mode))
    finally:
        engine.shutdown()
    return rows


# ---------------------------------------------------------------- tables


def latency_table(title: str, rows: list[dict], ratios: bool) -> str:
    head = ("| config | TTFT p50 s | p90 | p99 | mean | short p99 | long p99 | ITL p50 ms | ITL p99 ms | total s "
            "| preemptions | migrations (ok / dst full / src ended) | errors | load avg |")
    head += f" p50 vs {rows[0]['config']} | p99 vs {rows[0]['config']} |" if ratios else ""
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["config"], f"{r['ttft_p50']:.3f}"] + [f"{r[k]:.2f}" for k in TTFT_COLUMNS] + [
                 f"{1e3 * r['itl_p50']:.1f}", f"{1e3 * r['itl_p99']:.1f}", f"{r['total_s']:.1f}",
                 str(r["preemptions"]), moves_cell(r["migrations"]), str(r["errors"]),
                 "{} -> {}".format(*r["loadavg"])]
        if ratios:
            cells += [f"{r['p50_vs_first']:.2f}x", f"{r['p99_vs_first']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["moves_seen"]:
            most = max(r["per_request"], key=lambda p: len(p[3]))
            lines.append(f"\n{r['config']}: {r['moves_seen']} moves seen by --track-moves; requests moved twice or "
                         f"more: {len(r['moved_twice_or_more'])} {r['moved_twice_or_more']}; the most: {most[0]} "
                         f"({'long' if most[1] else 'short'}) on {' -> '.join(most[3])}")
    return "\n".join(lines)


def moves_cell(migrations: dict[str, int]) -> str:
    """Migration results by status: finished / aborted_dst / aborted_src ("-" for none)."""
    if not migrations:
        return "-"
    return " / ".join(str(migrations.get(k, 0)) for k in ("finished", "aborted_dst", "aborted_src"))


def downtime_table(rows: list[dict]) -> str:
    lines = ["Migration downtime through the router (ms; largest stream gap around the move - normal gap)", "",
             ("| length | mode | downtime ms | gap began (ms after call) | paused_s ms | migrate() ms | normal gap ms "
              "| blocks per stage | ms per stage | status |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stage_ms = [round(1e3 * s) for s in r["stage_s"]]
        lines.append(f"| {r['length']} | {r['mode']} | {1e3 * r['downtime_s']:.1f} | "
                     f"{1e3 * r['gap_after_call_s']:.0f} | {1e3 * r['paused_s']:.1f} | {1e3 * r['migrate_s']:.1f} | "
                     f"{1e3 * r['inter_token_s']:.1f} | {r['stage_blocks']} | {stage_ms} | {r['status']} |")
    lengths = sorted({r["length"] for r in rows})
    by = {(r["length"], r["mode"]): r for r in rows}
    for mode in ("multi-stage", "stop-and-copy"):
        first, last = by[(lengths[0], mode)], by[(lengths[-1], mode)]
        lines.append(f"\n{mode}: downtime at {lengths[-1]} / at {lengths[0]} = "
                     f"{last['downtime_s'] / max(first['downtime_s'], 1e-6):.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Router benchmarks (issue 11); see the module docstring.")
    parser.add_argument("part", choices=["imbalance", "pd", "downtime", "all"])
    parser.add_argument("--quick", action="store_true", help="30 requests; downtime at 128 and 512, once")
    parser.add_argument("--instances", type=int, default=2, help="instances for the imbalance part")
    parser.add_argument("--configs", nargs="+", default=IMBALANCE_CONFIGS,
                        help="imbalance: dispatch[+migration] policies; ratios are against the first")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--long-fraction", type=float, default=0.2)
    parser.add_argument("--kv-blocks", type=int, default=0, help="KV blocks per instance (0: one longest request)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5, help="downtime: moves per length and mode (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--track-moves", action="store_true",
                        help="ask the router where each request runs every 0.1 s (adds load; diagnosis only)")
    parser.add_argument("--model-dir", default=None, help="where the tiny model is (built there if absent)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for config in args.configs:
        policies(config)  # a bad name fails here, not after the first configurations ran
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from distinfer.executor.ray import ensure_ray

    ensure_ray(world_size=7)  # one local Ray for every configuration; a logical CPU per actor, and spare
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        model = build_tiny_model(args.model_dir or tmp)
        results: dict[str, Any] = {"args": vars(args)}
        tables = []
        if args.part in ("imbalance", "all"):
            results["imbalance"] = imbalance(args, model)
            tables.append(latency_table(f"Load imbalance, {args.instances} instances", results["imbalance"], True))
        if args.part in ("pd", "all"):
            results["pd"] = pd(args, model)
            tables.append(latency_table("PD vs colocated, 2 instances", results["pd"], False))
        if args.part in ("downtime", "all"):
            results["downtime"] = downtime(args, model)
            tables.append(downtime_table(results["downtime"]))
    print("\n\n".join(tables))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
