"""Decode step time on CPU for tp=1, tensor parallel and pipeline parallel, split into compute,
collectives and control, with ratios against tp=1 measured in the same run.

    python benchmarks/step_time.py [--models dummy,default] [--batch-sizes 1,32] [--rounds 3]

Models: `dummy` is a Llama shape whose heads divide by 2 and 3 (12 heads, 4 KV heads, 12 layers,
hidden 768; random weights via load_format="dummy") run at tp=1, tp=2, pp=2; `default` is the real
SmolLM2-135M (9 heads, 3 KV heads) run at tp=1, tp=3, pp=2. tp=1 runs in-process with torch's default
threads and with 1 thread (each Ray rank gets cores // world size threads). pp=2 runs twice: with its two batches
in flight (each step carries half the running requests, the stages overlap) and forced to a single
batch (the stages take turns). `batch` requests decode together; per setup, the mean over
`--steps` decode steps of (best of `--rounds` round-robin rounds, by decode tok/s):

- step: the engine's whole step (schedule, execute, update, detokenize); tokens/step, decode tok/s
- compute: model work on the critical path (per pipeline stage the slowest rank, summed over stages)
- collective: the rest of the busiest rank's step (all-reduce, all-gather, send/recv, waiting on peers)
- control: driver <-> workers (pickling the SchedulerOutput diff, Ray calls, the driver's wait); with
  two pipeline batches in flight it also holds the time a batch queues behind the other one
- engine: scheduling and output processing in the driver, outside the executor
- diff bytes: the pickled SchedulerOutput each rank receives per decode step
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig

from distinfer.config import ModelConfig
from distinfer.engine.engine import LLMEngine
from distinfer.engine.llm import build_config
from distinfer.executor.ray import ensure_ray
from distinfer.model.loader import resolve_model_path
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger("benchmarks.step_time")

DUMMY_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, max_position_embeddings=2048, vocab_size=49152, tie_word_embeddings=True)


@dataclass
class StepRow:
    model: str
    config: str
    batch: int
    step_ms: float
    tokens_per_step: float
    decode_tok_s: float
    compute_ms: float
    collective_ms: float
    control_ms: float
    engine_ms: float
    diff_bytes: int
    step_ratio: float = 1.0  # vs the faster tp=1 of the same model and batch, this run
    tok_s_ratio: float = 1.0


@dataclass(frozen=True)
class Setup:
    tp: int
    pp: int
    batches_in_flight: int = 1  # pp > 1: 1 forces a single batch (stages take turns), for comparison
    threads: int | None = None  # tp=1 in-process: torch threads (None: torch's default, one per core)

    @property
    def name(self) -> str:
        extra = f", {self.batches_in_flight} batch in flight" if self.pp > 1 and self.batches_in_flight < self.pp else ""
        extra += f", {self.threads} thread" if self.threads else ""
        return f"tp={self.tp} pp={self.pp}{extra}"


# Ray workers run cores // world size torch threads per rank (1 on a 2-core machine); "1 thread"
# shows tp=1 on the same footing.
SETUPS = {"dummy": [Setup(1, 1), Setup(1, 1, threads=1), Setup(2, 1), Setup(1, 2, 2), Setup(1, 2, 1)],
          "default": [Setup(1, 1), Setup(1, 1, threads=1), Setup(3, 1), Setup(1, 2, 2), Setup(1, 2, 1)]}


def dummy_model_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="distinfer-dummy-"))
    LlamaConfig(**DUMMY_SHAPE).save_pretrained(str(path))
    return str(path)


def _engine(model: str, setup: Setup, max_batch: int, prompt_len: int, steps: int) -> LLMEngine:
    dummy = model != "default"
    config = build_config(
        model if dummy else None, tokenizer=resolve_model_path(ModelConfig().model) if dummy else None,
        load_format="dummy" if dummy else "auto", tensor_parallel_size=setup.tp, pipeline_parallel_size=setup.pp,
        max_num_seqs=max_batch, max_num_batched_tokens=max(max_batch * prompt_len, 2048),
        max_model_len=prompt_len + steps + 16, enable_prefix_caching=False,
        num_kv_blocks=max_batch * -(-(prompt_len + steps + 16) // 16) + 16)  # what the batch needs, not 2 GiB/rank
    engine = LLMEngine(config)
    engine.scheduler.max_concurrent_batches = setup.batches_in_flight
    return engine


def measure(engine: LLMEngine, batch: int, prompt_len: int, steps: int, warmup: int, seed: int,
            threads: int | None = None) -> dict[str, float]:
    """Means over `steps` decode steps while `batch` requests decode together, and decode tok/s."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        return _measure(engine, batch, prompt_len, steps, warmup, seed)
    finally:
        torch.set_num_threads(default_threads)


def _measure(engine: LLMEngine, batch: int, prompt_len: int, steps: int, warmup: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 4, ignore_eos=True)
    ids = [f"b{batch}-{seed}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, rng.integers(100, engine.hf_config.vocab_size, size=prompt_len).tolist(), params)
    executor = engine.executor
    sent: list[int] = []
    submit = executor.submit
    executor.submit = lambda so: (sent.append(len(pickle.dumps(so))), submit(so))[1]
    while not all(r.num_output_tokens >= warmup for r in engine.scheduler.requests.values()):
        engine.step()  # prefill and warm-up decode steps
    samples: dict[str, list[float]] = {k: [] for k in ("step", "tokens", "compute", "collective", "control", "engine", "bytes")}
    started = time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        compute, collective, control, in_process = _split(executor)
        engine_time = wall - engine.last_step.wait - in_process  # schedule, submit, update, detokenize
        for key, value in (("step", wall), ("tokens", engine.last_step.num_tokens), ("compute", compute),
                           ("collective", collective), ("control", control), ("engine", engine_time),
                           ("bytes", sent[-1])):
            samples[key].append(value)
    elapsed = time.perf_counter() - started
    executor.submit = submit
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    result = {key: statistics.fmean(values) for key, values in samples.items()}
    result["tok_s"] = sum(samples["tokens"]) / elapsed
    return result


def _split(executor) -> tuple[float, float, float, float]:
    """(compute, collective, control, model time inside the engine's own thread) of the last step."""
    control = getattr(executor, "last_control", None)
    if control is not None:  # RayExecutor: the model runs in the workers
        return control.worker_compute, control.worker_collective, control.control_overhead, 0.0
    t = executor.last_step_timings()  # LocalExecutor: no control plane, the model runs in submit()
    busy = t.prepare + t.forward + t.sample
    return busy - t.collective, t.collective, 0.0, busy


def run(model: str, batch_sizes: list[int], prompt_len: int, steps: int, warmup: int, rounds: int) -> list[StepRow]:
    """All setups of a model stay up; rounds go round-robin over them so that load from other
    processes hits them alike, and each keeps its best (fastest) round."""
    path = dummy_model_dir() if model == "dummy" else "default"
    ensure_ray(world_size=sum(s.tp * s.pp for s in SETUPS[model]))  # every setup's workers at once
    engines = {setup: _engine(path, setup, max(batch_sizes), prompt_len, warmup + steps) for setup in SETUPS[model]}
    best: dict[tuple[Setup, int], dict[str, float]] = {}
    try:
        for round_index in range(rounds):
            for batch in batch_sizes:
                for setup, engine in engines.items():
                    m = measure(engine, batch, prompt_len, steps, warmup, round_index, setup.threads)
                    key = (setup, batch)
                    if key not in best or m["tok_s"] > best[key]["tok_s"]:
                        best[key] = m
                    logger.info("round %d %s %s batch %d: %.1f ms/step, %.1f tok/s", round_index, model, setup.name,
                                batch, 1e3 * m["step"], m["tok_s"])
    finally:
        for engine in engines.values():
            engine.shutdown()
    rows = []
    for (setup, batch), m in best.items():
        row = StepRow(model, setup.name, batch, 1e3 * m["step"], m["tokens"], m["tok_s"],
                      *(1e3 * m[k] for k in ("compute", "collective", "control", "engine")), int(m["bytes"]))
        # Baseline: the faster tp=1 (default threads or 1 thread; on a loaded machine torch's threads
        # can spin against other processes and make tp=1 look far slower than it is).
        base = max((best[(s, batch)] for s in SETUPS[model] if s.tp * s.pp == 1), key=lambda x: x["tok_s"])
        row.step_ratio, row.tok_s_ratio = m["step"] / base["step"], m["tok_s"] / base["tok_s"]
        rows.append(row)
    return sorted(rows, key=lambda r: (r.batch, SETUPS[model].index(next(s for s in SETUPS[model] if s.name == r.config))))


HEADER = ("| model | config | batch | step ms | tokens/step | decode tok/s | compute ms | collective ms | control ms "
          "| engine ms | diff bytes | step vs tp=1 | tok/s vs tp=1 |")


def _format(r: StepRow) -> str:
    return (f"| {r.model} | {r.config} | {r.batch} | {r.step_ms:.1f} | {r.tokens_per_step:.0f} | {r.decode_tok_s:.1f} "
            f"| {r.compute_ms:.1f} | {r.collective_ms:.1f} | {r.control_ms:.1f} | {r.engine_ms:.1f} | {r.diff_bytes} "
            f"| {r.step_ratio:.2f}x | {r.tok_s_ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="dummy,default")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="round-robin repetitions; the best round is kept")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = [row for model in args.models.split(",")
            for row in run(model, batch_sizes, args.prompt_len, args.steps, args.warmup, args.rounds)]
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for row in rows:
        print(_format(row))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    sys.exit(main())
