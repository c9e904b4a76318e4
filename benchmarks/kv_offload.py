"""Host KV tier (CPU DRAM) benchmark: multi-turn chat TTFT and throughput under KV memory pressure, each
against a baseline in the same process with the same device block budget and prefix caching on.

    python benchmarks/kv_offload.py [--quick] [--sequential] [--passes 2] [--json out.json]

1. Chat: N conversations x T turns, each a random-token history that every turn extends by the answer and a
   new question; a turn's requests go in together (--concurrency caps those in flight). The device holds a
   quarter of the working set, so its LRU prefix cache has evicted a history before it is asked again.
2. Pressure: many requests on a device budget far too small, preemption "swap" (host tier) vs "recompute";
   KV bytes moved per second against this machine's host copy bandwidth, measured in the run.

Fairness on this shared 2-core VM: its speed drifts by 10-25% over tens of seconds, so the two engines of a
part run in lock step, each timed by its own clock (the sum of its step times; a TTFT is its engine's step time
from submission to the first token, which run alone equals RequestOutput.metrics' first token - arrival to a
few ms; --sequential runs the engines one after the other and reports the metrics' TTFT). And of two identical
engines in one process the one built first runs up to ~25% slower (measured; its memory streams slower, cause
outside this code), so each part runs --passes times with fresh engines built in alternating order, pooled.
Chat turn 1 has the same work on both engines: its per-pass ratio shows what is left of both effects.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

# The checkout this file is in, not whichever distinfer the virtualenv was installed from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distinfer import LLM, SamplingParams  # noqa: E402
from distinfer.config import ModelConfig  # noqa: E402
from distinfer.messages import EngineStats, RequestOutput  # noqa: E402
from distinfer.model.loader import load_hf_config  # noqa: E402

logger = logging.getLogger("benchmarks.kv_offload")
_ids = itertools.count()
_SUMMED = ("seconds", "output_tokens", "steps", "scheduled_tokens")


@dataclass
class RunResult:
    label: str
    seconds: float = 0.0  # the engine's own time: the sum of its step durations
    output_tokens: int = 0
    steps: int = 0
    scheduled_tokens: int = 0  # tokens the model ran: prefill (recomputed ones too) + decode
    ttft_by_turn: list[list[float]] = field(default_factory=list)  # chat only, on the engine's own clock
    wall_ttft_by_turn: list[list[float]] = field(default_factory=list)  # RequestOutput.metrics: first token - arrival
    stats: dict = field(default_factory=dict)  # EngineStats deltas, and chat prompt/cached token totals

    def merge(self, other: RunResult) -> None:
        """Pool another pass of the same configuration into this one."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("ttft_by_turn", "wall_ttft_by_turn"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([] for _ in range(len(theirs) - len(mine)))
            for turn, values in enumerate(theirs):
                mine[turn].extend(values)
        for key, value in other.stats.items():
            sizes = key.endswith("_blocks")  # pool sizes, not counts
            self.stats[key] = value if sizes else self.stats.get(key, 0) + value


class Lane:
    """One engine in a run: prompts not yet submitted, finished outputs, and the engine's own clock (the sum
    of its step durations), on which a request's TTFT is its engine's step time from its submission to the end
    of the step that produced its first token."""

    def __init__(self, llm: LLM, label: str) -> None:
        self.llm, self.result = llm, RunResult(label)
        self.before = llm.engine.get_stats()
        self.pending: deque[tuple[str, list[int], SamplingParams]] = deque()
        self.outputs: dict[str, RequestOutput] = {}
        self.submitted_at: dict[str, float] = {}  # own clock
        self._step_ends: list[float] = []  # wall clock (time.time(), as in RequestMetrics)
        self._clock_at_end: list[float] = []

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        ids = [f"r{next(_ids)}" for _ in prompts]
        self.pending.extend((i, p, params) for i, p in zip(ids, prompts))
        return ids

    def busy(self) -> bool:
        return bool(self.pending) or self.llm.engine.has_unfinished_requests()

    def step(self, concurrency: int) -> None:
        engine = self.llm.engine
        while self.pending and engine.get_num_unfinished_requests() < concurrency:
            request_id, prompt, params = self.pending.popleft()
            self.submitted_at[request_id] = self.result.seconds
            engine.add_request(request_id, prompt, params)
        start = time.perf_counter()
        outputs = engine.step()
        self.result.seconds += time.perf_counter() - start
        self._step_ends.append(time.time())
        self._clock_at_end.append(self.result.seconds)
        self.result.steps += 1
        self.result.scheduled_tokens += engine.last_step.num_tokens
        for output in outputs:
            if output.finished:
                self.outputs[output.request_id] = output
                self.result.output_tokens += len(output.outputs[0].token_ids)

    def ttft(self, request_id: str) -> float:
        step = bisect_left(self._step_ends, self.outputs[request_id].metrics.first_token_time)
        return self._clock_at_end[step] - self.submitted_at[request_id]

    def close(self) -> RunResult:
        self.result.stats.update(stats_delta(self.before, self.llm.engine.get_stats()))
        self.llm.shutdown()
        return self.result


def run_lanes(lanes: list[Lane], concurrency: int, lockstep: bool) -> None:
    """Until every lane is done: in lock step (one step of each busy lane in turn) or one after the other."""
    for group in [lanes] if lockstep else [[lane] for lane in lanes]:
        while any(lane.busy() for lane in group):
            for lane in group:
                if lane.busy():
                    lane.step(concurrency)


def stats_delta(before: EngineStats, after: EngineStats) -> dict:
    keys = ("prefix_cache_hits", "host_prefix_cache_hits", "num_preemptions", "num_swapped_preemptions",
            "num_recomputed_tokens", "kv_bytes_to_host", "kv_bytes_to_device")
    delta = {k: getattr(after, k) - getattr(before, k) for k in keys}
    delta["device_prefix_cache_hits"] = delta["prefix_cache_hits"] - delta["host_prefix_cache_hits"]
    delta["num_host_blocks"], delta["num_device_blocks"] = after.num_host_blocks, after.num_total_blocks
    return delta


def kv_block_bytes(dtype: str, block_size: int) -> tuple[int, int]:
    """(bytes of one KV block over all layers, vocab size) of the default model, from its config."""
    config = ModelConfig(dtype=dtype)
    hf = load_hf_config(config)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    element = torch.empty(0, dtype=config.torch_dtype).element_size()
    return hf.num_hidden_layers * block_size * 2 * hf.num_key_value_heads * head_dim * element, hf.vocab_size


def build_pair(common: dict, host_blocks: int, host_kwargs: dict, base_kwargs: dict,
               host_first: bool) -> tuple[LLM, LLM, int]:
    """(baseline engine, host-tier engine with room for `host_blocks` x 1.25, vocab size)."""
    block_bytes, vocab = kv_block_bytes(common["dtype"], common["block_size"])
    builders = [lambda: LLM(**common, kv_offloading_size=0, **base_kwargs),
                lambda: LLM(**common, kv_offloading_size=1.25 * host_blocks * block_bytes / (1 << 30), **host_kwargs)]
    order = [1, 0] if host_first else [0, 1]
    built = {i: builders[i]() for i in order}
    assert built[1].engine.scheduler.kv_block_bytes == block_bytes, "KV block layout changed: fix kv_block_bytes"
    assert built[1].engine.get_stats().num_host_blocks >= host_blocks
    return built[0], built[1], vocab


def warm_up(llm: LLM, vocab: int, prompt_len: int) -> None:
    """A few requests shaped like the workload's (own tokens), so the first measured run does not pay for
    first-time allocations and kernel set-up; then both tiers' prefix caches are emptied."""
    rng = np.random.default_rng(12345)
    prompts = [rng.integers(100, vocab, size=prompt_len).tolist() for _ in range(4)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.engine.scheduler.reset_prefix_cache()


def run_passes(passes: int, one_pass: Callable[[int], tuple[RunResult, RunResult]]) -> tuple[RunResult, RunResult,
                                                                                           list]:
    """Pool `passes` passes (pass p builds the host-tier engine first when p is even); also each pass's pair."""
    pairs = [one_pass(p) for p in range(passes)]
    pooled = [RunResult(pairs[0][0].label), RunResult(pairs[0][1].label)]
    for pair in pairs:
        for total, part in zip(pooled, pair):
            total.merge(part)
    return pooled[0], pooled[1], pairs


# ------------------------------------------------------------------ 1. multi-turn chat


@dataclass
class ChatSpec:
    conversations: int
    turns: int
    history_tokens: int
    question_tokens: int
    output_tokens: int
    concurrency: int
    block_size: int = 16

    @property
    def seq_blocks(self) -> int:
        """Blocks of one conversation at its last turn, answer included."""
        return -(-(self.history_tokens + self.turns * (self.question_tokens + self.output_tokens)) // self.block_size)

    @property
    def working_set_blocks(self) -> int:
        return self.conversations * self.seq_blocks

    @property
    def device_blocks(self) -> int:
        """A quarter of the working set (at least one whole sequence)."""
        return max(-(-self.working_set_blocks // 4), self.seq_blocks + 1)


def chat_inputs(spec: ChatSpec, vocab: int, seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per conversation: a history, then one question per turn (random ids, distinct per conversation)."""
    rng = np.random.default_rng(seed)
    histories = [rng.integers(100, vocab, size=spec.history_tokens).tolist() for _ in range(spec.conversations)]
    questions = [[rng.integers(100, vocab, size=spec.question_tokens).tolist() for _ in range(spec.turns)]
                 for _ in range(spec.conversations)]
    return histories, questions


def record_turn(lane: Lane, contexts: list[list[int]], prompts: list[list[int]], ids: list[str]) -> None:
    """TTFTs of one turn; each conversation's context becomes its prompt plus the answer."""
    outputs = [lane.outputs[i] for i in ids]
    lane.result.ttft_by_turn.append([lane.ttft(i) for i in ids])
    lane.result.wall_ttft_by_turn.append([o.metrics.first_token_time - o.metrics.arrival_time for o in outputs])
    for c, output in enumerate(outputs):
        contexts[c] = prompts[c] + output.outputs[0].token_ids
    stats, cached = lane.result.stats, sum(o.num_cached_tokens for o in outputs)
    stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + sum(map(len, prompts))
    stats["used_cached_tokens"] = stats.get("used_cached_tokens", 0) + cached
    logger.info("%s turn %d: %.1f s so far, %.0f%% of prompt tokens cached", lane.result.label,
                len(lane.result.ttft_by_turn), lane.result.seconds, 100 * cached / sum(map(len, prompts)))


def chat_pass(args: argparse.Namespace, spec: ChatSpec, host_first: bool) -> tuple[RunResult, RunResult]:
    """Each turn on both engines (lock step, or one after the other, which goes first alternating)."""
    common = {"dtype": args.dtype, "max_model_len": (spec.seq_blocks + 1) * spec.block_size,
              "num_kv_blocks": spec.device_blocks, "enable_prefix_caching": True, "block_size": spec.block_size}
    off_llm, on_llm, vocab = build_pair(common, spec.working_set_blocks, {"preemption_mode": "auto"}, {}, host_first)
    histories, questions = chat_inputs(spec, vocab, args.seed)
    for llm in (off_llm, on_llm):
        warm_up(llm, vocab, spec.history_tokens)
    lanes = [Lane(off_llm, "host tier off"), Lane(on_llm, "host tier on")]
    contexts = [[list(h) for h in histories] for _ in lanes]
    params = SamplingParams(temperature=0, max_tokens=spec.output_tokens, ignore_eos=True)
    for turn in range(spec.turns):
        prompts = [[ctx + questions[c][turn] for c, ctx in enumerate(contexts[k])] for k in range(len(lanes))]
        ids = [lane.submit(prompts[k], params) for k, lane in enumerate(lanes)]
        run_lanes(lanes if turn % 2 == 0 else lanes[::-1], spec.concurrency, not args.sequential)
        for k, lane in enumerate(lanes):
            record_turn(lane, contexts[k], prompts[k], ids[k])
    return lanes[0].close(), lanes[1].close()


def p50_ratio(off: list[float], on: list[float]) -> float:
    return float(np.percentile(off, 50) / np.percentile(on, 50))


def ttft_row(name: str, off: list[float], on: list[float]) -> tuple[tuple, dict]:
    p = {f"{side}_p{q}_s": float(np.percentile(values, q))
         for q in (50, 99) for side, values in (("off", off), ("on", on))}
    row = (name, f"{p['off_p50_s']:.3f}", f"{p['on_p50_s']:.3f}", f"{p['off_p50_s'] / p['on_p50_s']:.2f}x",
           f"{p['off_p99_s']:.3f}", f"{p['on_p99_s']:.3f}", f"{p['off_p99_s'] / p['on_p99_s']:.2f}x")
    return row, {"turns": name, **p}


def chat_table(off: RunResult, on: RunResult, pairs: list, spec: ChatSpec, lockstep: bool) -> tuple[str, dict]:
    """TTFT percentiles per turn and over turns 2.. (turn 1 is cold in both), pooled over passes; each pass's
    p50 ratios; then the totals."""
    key = "ttft_by_turn" if lockstep else "wall_ttft_by_turn"
    rows = [("turn", "off p50", "on p50", "p50 ratio", "off p99", "on p99", "p99 ratio")]
    n = len(off.ttft_by_turn)
    summary: dict = {"ttft_source": "engine clock, lock step" if lockstep else "RequestOutput.metrics", "ttft": []}
    for name, turns in [(f"{t + 1}", [t]) for t in range(n)] + [(f"2-{n}", list(range(1, n)))]:
        row, entry = ttft_row(name, [x for t in turns for x in getattr(off, key)[t]],
                              [x for t in turns for x in getattr(on, key)[t]])
        rows.append(row)
        summary["ttft"].append(entry)
    text = (f"Chat TTFT (s, {summary['ttft_source']}) by turn, {len(pairs)} pass(es) pooled: {spec.conversations} "
            f"conversations, at most {spec.concurrency} requests in flight, {spec.device_blocks} device blocks for a "
            f"{spec.working_set_blocks}-block working set; host tier off vs on (ratio = off / on)\n")
    text += format_rows(rows)
    summary["passes"] = [{"host_tier_engine_built_first": p % 2 == 0,
                          "turn1_p50_ratio": p50_ratio(getattr(a, key)[0], getattr(b, key)[0]),
                          "turns2plus_p50_ratio": p50_ratio(sum(getattr(a, key)[1:], []), sum(getattr(b, key)[1:], []))}
                         for p, (a, b) in enumerate(pairs)]
    for p, e in enumerate(summary["passes"]):
        built = "first" if e["host_tier_engine_built_first"] else "second"
        text += (f"\n  pass {p + 1} (host-tier engine built {built}): p50 ratio turn 1 (same work) "
                 f"{e['turn1_p50_ratio']:.2f}x, turns 2-{n} {e['turns2plus_p50_ratio']:.2f}x")
    note = ("* EngineStats counts each admitted request's prefix lookup once; 'cached (used)' sums "
            "RequestOutput.num_cached_tokens (what requests were admitted with)")
    return text + "\n\n" + format_rows(totals_rows(off, on, chat=True)) + "\n" + note, summary


def totals_rows(a: RunResult, b: RunResult, chat: bool) -> list[tuple]:
    sa, sb = a.stats, b.stats
    rows = [("", a.label, b.label, "speedup"),
            ("engine time (s)", f"{a.seconds:.1f}", f"{b.seconds:.1f}", f"{a.seconds / b.seconds:.2f}x"),
            ("output tok/s", f"{a.output_tokens / a.seconds:.1f}", f"{b.output_tokens / b.seconds:.1f}",
             f"{(b.output_tokens / b.seconds) / (a.output_tokens / a.seconds):.2f}x"),
            ("tokens run by the model", a.scheduled_tokens, b.scheduled_tokens, ""),
            ("engine steps", a.steps, b.steps, "")]
    if chat:
        rows += [("prompt tokens", sa["prompt_tokens"], sb["prompt_tokens"], ""),
                 ("  of which cached (used)", sa["used_cached_tokens"], sb["used_cached_tokens"], "")]
        rows += [(f"{name}*", sa[k], sb[k], "") for name, k in
                 (("device prefix hits", "device_prefix_cache_hits"), ("host prefix hits", "host_prefix_cache_hits"))]
    rows += [(k, sa[k], sb[k], "") for k in ("num_preemptions", "num_swapped_preemptions", "num_recomputed_tokens")]
    rows += [(f"{k} (MB)", f"{sa[k] / 1e6:.0f}", f"{sb[k] / 1e6:.0f}", "")
             for k in ("kv_bytes_to_host", "kv_bytes_to_device")]
    return rows


def format_rows(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows)


# ------------------------------------------------------------------ 2. throughput under memory pressure


def measure_copy_bandwidth(block_bytes: int, num_blocks: int, repeats: int = 5) -> float:
    """Host copy bandwidth in bytes read + written per second: the best of several index_copy_ of
    `num_blocks` whole blocks into a permuted destination (the CPU path's scatter)."""
    src, index = torch.randn(num_blocks, block_bytes // 4), torch.randperm(num_blocks)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.index_copy_(0, index, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def pressure_pass(args: argparse.Namespace, round_: int, host_first: bool) -> tuple[RunResult, RunResult]:
    """Recompute vs swap on the same device budget, the same new prompts. Prefix caching is on in both (a
    recomputed victim may reuse its blocks not yet reused)."""
    seq_blocks = -(-(args.pressure_prompt + args.pressure_output) // 16)
    device_blocks = max(args.pressure_requests * seq_blocks // args.pressure_squeeze, seq_blocks + 1)
    common = {"dtype": args.dtype, "max_model_len": seq_blocks * 16, "num_kv_blocks": device_blocks,
              "enable_prefix_caching": True, "block_size": 16}
    recompute, swap, vocab = build_pair(common, args.pressure_requests * seq_blocks, {"preemption_mode": "swap"},
                                        {"preemption_mode": "recompute"}, host_first)
    for llm in (recompute, swap):
        warm_up(llm, vocab, args.pressure_prompt)
    lanes = [Lane(recompute, "recompute"), Lane(swap, "swap")]
    rng = np.random.default_rng([args.seed, round_])
    prompts = [rng.integers(100, vocab, size=args.pressure_prompt).tolist() for _ in range(args.pressure_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.pressure_output, ignore_eos=True)
    for lane in lanes:
        lane.submit(prompts, params)
    run_lanes(lanes[::-1 if round_ % 2 else 1], len(prompts), not args.sequential)
    for lane in lanes:
        assert lane.result.output_tokens == args.pressure_requests * args.pressure_output
    logger.info("pressure pass %d: %s", round_ + 1,
                ", ".join(f"{lane.result.label} {lane.result.seconds:.1f} s" for lane in lanes))
    return lanes[0].close(), lanes[1].close()


def pressure_table(recompute: RunResult, swap: RunResult, pairs: list, bandwidth: float) -> str:
    """The copy bandwidth share counts each KV byte moved as read once and written once."""
    rows = totals_rows(recompute, swap, chat=False)
    for run in (recompute, swap):
        moved = run.stats["kv_bytes_to_host"] + run.stats["kv_bytes_to_device"]
        rows.append((f"{run.label}: KV MB/s moved", f"{moved / run.seconds / 1e6:.1f}",
                     f"{100 * 2 * moved / run.seconds / bandwidth:.2f}% of copy bw", ""))
    rows.append(("host copy bandwidth (GB/s, read+written)", f"{bandwidth / 1e9:.1f}", "", ""))
    per_pass = ", ".join(f"pass {p + 1} ({'swap' if p % 2 == 0 else 'recompute'} engine built first) "
                         f"{a.seconds / b.seconds:.2f}x" for p, (a, b) in enumerate(pairs))
    return (f"Throughput under KV memory pressure: recompute vs swap, {recompute.stats['num_device_blocks']} device "
            f"blocks, {len(pairs)} pass(es) pooled\n" + format_rows(rows) + f"\n  speedup by pass: {per_pass}")


# ------------------------------------------------------------------ main

# --concurrency 0: a whole turn in flight; --pressure-squeeze: the pressure working set over the device budget.
DEFAULTS = {"conversations": 16, "turns": 4, "history_tokens": 400, "question_tokens": 30, "output_tokens": 32,
            "concurrency": 0, "pressure_requests": 32, "pressure_prompt": 200, "pressure_output": 64,
            "pressure_squeeze": 6, "passes": 2, "seed": 0}
QUICK = {"conversations": 8, "turns": 3, "history_tokens": 256, "output_tokens": 16, "pressure_requests": 16,
         "pressure_prompt": 128, "pressure_output": 32, "passes": 1}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, one pass (under 2 minutes)")
    for name, default in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip", choices=["chat", "pressure"], default=None)
    parser.add_argument("--sequential", action="store_true", help="run the engines one after the other")
    parser.add_argument("--json", default=None, help="also write results here")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # explicit flags still win
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    start, results, tables = time.perf_counter(), {"args": vars(args)}, []
    if args.skip != "chat":
        spec = ChatSpec(args.conversations, args.turns, args.history_tokens, args.question_tokens,
                        args.output_tokens, args.concurrency or args.conversations)
        off, on, pairs = run_passes(args.passes, lambda p: chat_pass(args, spec, host_first=p % 2 == 0))
        text, summary = chat_table(off, on, pairs, spec, not args.sequential)
        tables.append(text)
        results["chat"] = {"spec": asdict(spec), "device_blocks": spec.device_blocks,
                           "working_set_blocks": spec.working_set_blocks, **summary, "runs": [asdict(off), asdict(on)]}
    if args.skip != "pressure":
        recompute, swap, pairs = run_passes(args.passes, lambda p: pressure_pass(args, p, host_first=p % 2 == 0))
        block_bytes = kv_block_bytes(args.dtype, 16)[0]
        bandwidth = measure_copy_bandwidth(block_bytes, (256 << 20) // block_bytes)
        tables.append(pressure_table(recompute, swap, pairs, bandwidth))
        results["pressure"] = {"runs": [asdict(recompute), asdict(swap)], "copy_bandwidth_bytes_s": bandwidth,
                               "speedup_by_pass": [a.seconds / b.seconds for a, b in pairs],
                               "swap_over_recompute_tok_s": recompute.seconds / swap.seconds}
    results["wall_seconds"] = time.perf_counter() - start
    print("\n\n".join(tables) + f"\n\nbenchmark wall time: {results['wall_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
