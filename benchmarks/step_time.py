"""Decode step time on CPU for tp=1, tensor parallel and pipeline parallel, split into compute,
collectives and control, with ratios against tp=1 measured in the same run.

    python benchmarks/step_time.py [--models dummy,default] [--batch-sizes 1,32] [--steps 20]

Models: `dummy` is a Llama shape whose heads divide by 2 and 3 (12 heads, 4 KV heads, 12 layers,
hidden 768; random weights via load_format="dummy") run at tp=1, tp=2, pp=2; `default` is the real
SmolLM2-135M (9 heads, 3 KV heads) run at tp=1, tp=3, pp=2. Each configuration decodes `batch`
requests together (one batch in flight) and reports the median over `--steps` decode steps of:

- step: the engine's whole step (schedule, execute, update, detokenize)
- compute: model work on the critical path (per pipeline stage the slowest rank, summed over stages)
- collective: the rest of the busiest rank's step (all-reduce, all-gather, send/recv, waiting on peers)
- control: driver <-> workers (pickling the SchedulerOutput diff, Ray calls, the driver's wait)
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
from transformers import LlamaConfig

from distinfer.config import ModelConfig
from distinfer.engine.engine import LLMEngine
from distinfer.engine.llm import build_config
from distinfer.model.loader import resolve_model_path
from distinfer.sampling_params import SamplingParams

logger = logging.getLogger("benchmarks.step_time")

DUMMY_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, max_position_embeddings=2048, vocab_size=49152, tie_word_embeddings=True)
CONFIGS = {"dummy": [(1, 1), (2, 1), (1, 2)], "default": [(1, 1), (3, 1), (1, 2)]}


@dataclass
class StepRow:
    model: str
    tp: int
    pp: int
    batch: int
    step_ms: float
    compute_ms: float
    collective_ms: float
    control_ms: float
    engine_ms: float
    diff_bytes: int
    step_ratio: float = 1.0  # vs tp=1 of the same model and batch, this run


def dummy_model_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="distinfer-dummy-"))
    LlamaConfig(**DUMMY_SHAPE).save_pretrained(str(path))
    return str(path)


def _engine(model: str, tp: int, pp: int, batch: int, prompt_len: int, steps: int) -> LLMEngine:
    dummy = model != "default"
    config = build_config(
        model if dummy else None, tokenizer=resolve_model_path(ModelConfig().model) if dummy else None,
        load_format="dummy" if dummy else "auto", tensor_parallel_size=tp, pipeline_parallel_size=pp,
        max_num_seqs=max(batch, 1), max_num_batched_tokens=max(batch * prompt_len, 2048),
        max_model_len=prompt_len + steps + 16, enable_prefix_caching=False)
    return LLMEngine(config)


def measure(engine: LLMEngine, batch: int, prompt_len: int, steps: int, warmup: int, seed: int) -> dict[str, float]:
    """Median timings over `steps` decode steps of `batch` requests decoding together."""
    rng = np.random.default_rng(seed)
    vocab = engine.hf_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", rng.integers(100, vocab, size=prompt_len).tolist(), params)
    executor = engine.executor
    sent: list[int] = []
    submit = executor.submit
    executor.submit = lambda so: (sent.append(len(pickle.dumps(so))), submit(so))[1]
    samples: dict[str, list[float]] = {k: [] for k in ("step", "compute", "collective", "control", "engine", "bytes")}
    decode_steps = 0
    while engine.has_unfinished_requests() and decode_steps < warmup + steps:
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        if engine.last_step.num_tokens != batch:
            continue  # prefill, or a pipeline-parallel step without the full batch
        decode_steps += 1
        if decode_steps <= warmup:
            continue
        compute, collective, control, executor_wall = _split(executor)
        for key, value in (("step", wall), ("compute", compute), ("collective", collective),
                           ("control", control), ("engine", wall - executor_wall), ("bytes", sent[-1])):
            samples[key].append(value)
    executor.submit = submit
    engine.abort_request([f"r{i}" for i in range(batch)])
    while engine.has_unfinished_requests():
        engine.step()
    return {key: statistics.median(values) for key, values in samples.items()}


def _split(executor) -> tuple[float, float, float, float]:
    """(compute, collective, control, executor wall) of the last step, in seconds."""
    control = getattr(executor, "last_control", None)
    if control is not None:  # RayExecutor
        return control.worker_compute, control.worker_collective, control.control_overhead, control.wall
    t = executor.last_step_timings()  # LocalExecutor: no control plane
    busy = t.prepare + t.forward + t.sample
    return busy - t.collective, t.collective, 0.0, busy


def run(models: list[str], batch_sizes: list[int], prompt_len: int, steps: int, warmup: int, seed: int) -> list[StepRow]:
    rows: list[StepRow] = []
    for model in models:
        path = dummy_model_dir() if model == "dummy" else "default"
        for tp, pp in CONFIGS[model]:
            for batch in batch_sizes:
                engine = _engine(path, tp, pp, batch, prompt_len, steps)
                try:
                    m = measure(engine, batch, prompt_len, steps, warmup, seed)
                finally:
                    engine.shutdown()
                row = StepRow(model, tp, pp, batch, *(1e3 * m[k] for k in ("step", "compute", "collective", "control", "engine")),
                              int(m["bytes"]))
                base = next((r for r in rows if (r.model, r.tp, r.pp, r.batch) == (model, 1, 1, batch)), None)
                row.step_ratio = row.step_ms / base.step_ms if base else 1.0
                rows.append(row)
                logger.info("%s", _format(row))
    return rows


def _format(r: StepRow) -> str:
    return (f"| {r.model} | tp={r.tp} pp={r.pp} | {r.batch} | {r.step_ms:.1f} | {r.compute_ms:.1f} | {r.collective_ms:.1f} "
            f"| {r.control_ms:.1f} | {r.engine_ms:.1f} | {r.diff_bytes} | {r.step_ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="dummy,default")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    rows = run(args.models.split(","), [int(b) for b in args.batch_sizes.split(",")], args.prompt_len,
               args.steps, args.warmup, args.seed)
    print("| model | config | batch | step ms | compute ms | collective ms | control ms | engine ms | diff bytes | step vs tp=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_format(row))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    sys.exit(main())
