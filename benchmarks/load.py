"""Loopback load with faults (issue 8): many concurrent streams against `distinfer serve` over both APIs,
mixing normal greedy streams, streams the client cancels after 1-3 tokens, and bad requests.

The server runs as a subprocess (benchmarks/serving.py's start_server: its own interpreter, so the
client does not share its GIL) with a small KV pool, so that the pool, not only max_num_seqs, limits
the batch. The mix and its accounting are distinfer/serving/loadmix.py, shared with
tests/e2e/test_load.py: every stream is launched at once; each normal stream's tokens are compared with
the transformers greedy oracle (lost and extra tokens are counted, 0 expected), each bad request must
get 400 / INVALID_ARGUMENT naming its field, each cancelled stream must be aborted by the engine; at the
end the server must be idle with every KV block free. Exit status 1 when any of that fails.

    .venv/bin/python benchmarks/load.py --streams 200 --protocol mix --max-tokens 12
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import torch
from transformers import AutoTokenizer

from distinfer.client import AsyncClient
from distinfer.config import ModelConfig
from distinfer.model.loader import resolve_model_path
from distinfer.serving.loadmix import (
    PROMPTS,
    MixSpec,
    Oracle,
    finished_by_reason,
    format_summary,
    is_idle,
    run_mix,
    wait_idle,
)

# Neighbours in benchmarks/ (a script's own directory is on sys.path).
from common import hf_reference_model
from serving import start_server, stop_server

logger = logging.getLogger("benchmarks.load")
MODEL = "bench"  # the name benchmarks/serving.py's start_server serves


def build_oracle(max_tokens: int, threads: int) -> Oracle:
    """transformers generate(do_sample=False) per prompt, before the server starts (no contention)."""
    start = time.monotonic()
    torch.set_num_threads(threads)
    hf_model, _ = hf_reference_model("float32")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig().model))
    ids = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            prompt_ids = tokenizer(prompt).input_ids
            out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
            ids.append(out[0, len(prompt_ids):].tolist())
    logger.info("oracle: %d prompts x %d tokens in %.1f s", len(PROMPTS), max_tokens, time.monotonic() - start)
    return Oracle.from_ids(tokenizer, ids)


async def measure(args: argparse.Namespace, oracle: Oracle, http_port: int, grpc_port: int) -> dict:
    http_url, grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    async with AsyncClient(grpc_target, timeout=30) as client:
        vocab_size = (await client.model_info()).vocab_size
    spec = MixSpec(streams=args.streams, protocol=args.protocol, max_tokens=args.max_tokens,
                   cancel_fraction=args.cancel_fraction, bad_fraction=args.bad_fraction, seed=args.seed, model=MODEL,
                   max_model_len=args.max_model_len, vocab_size=vocab_size, timeout_s=args.timeout)
    # Warm-up: connection set-up and first-batch costs stay out of the figures.
    warm_plan = MixSpec(**{**asdict(spec), "streams": 16, "seed": spec.seed + 1})
    await run_mix(warm_plan, http_url, grpc_target)
    await wait_idle(grpc_target, args.timeout)
    before = await finished_by_reason(http_url)
    loadavg_before = os.getloadavg()
    report = await run_mix(spec, http_url, grpc_target)
    loadavg_after = os.getloadavg()
    idle = await wait_idle(grpc_target, 60.0)
    await asyncio.sleep(0.5)  # the engine counts an abort right after it frees the request's blocks
    after = await finished_by_reason(http_url)
    summary = report.summary(oracle)
    summary.update(
        finished_by_reason={k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))},
        kv_blocks_free=idle.num_free_blocks, kv_blocks_total=idle.num_total_blocks, idle=is_idle(idle),
        num_preemptions=idle.num_preemptions, loadavg_before=loadavg_before, loadavg_after=loadavg_after,
        spec=asdict(spec), cpus=os.cpu_count())
    return summary


def passed(s: dict, cancelled: int) -> bool:
    expected_outcomes = all(k in ("normal/ok", "cancel/cancelled", "bad/rejected") for k in s["counts"])
    aborts_match = s["finished_by_reason"].get("abort", 0) == cancelled
    return expected_outcomes and aborts_match and s["lost_tokens"] == s["extra_tokens"] == 0 and s["idle"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--protocol", default="mix", choices=["mix", "http", "grpc"])
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens per normal stream")
    parser.add_argument("--cancel-fraction", type=float, default=0.2)
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--num-kv-blocks", type=int, default=96)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="launch order")
    parser.add_argument("--timeout", type=float, default=300.0, help="per stream, seconds")
    parser.add_argument("--oracle-threads", type=int, default=1, help="torch threads for the transformers oracle")
    parser.add_argument("--json", default=None, help="write the summary here")
    parser.add_argument("serve_args", nargs="*", help="extra `distinfer serve` arguments (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    oracle = build_oracle(args.max_tokens, args.oracle_threads)
    args.serve_args = ["--max-model-len", str(args.max_model_len), "--num-kv-blocks", str(args.num_kv_blocks),
                       "--max-num-seqs", str(args.max_num_seqs), *args.serve_args]
    server, http_port, grpc_port = start_server(args)
    try:
        summary = asyncio.run(measure(args, oracle, http_port, grpc_port))
    finally:
        stop_server(server)
    cancelled = summary["counts"].get("cancel/cancelled", 0)
    print(format_summary(summary))
    print(f"  engine: finished by reason {summary['finished_by_reason']}, {summary['num_preemptions']} preemptions "
          f"since start; KV blocks free at the end {summary['kv_blocks_free']}/{summary['kv_blocks_total']}")
    loadavg = {k: " ".join(f"{x:.2f}" for x in summary[f"loadavg_{k}"]) for k in ("before", "after")}
    print(f"  load average (1/5/15 min) before {loadavg['before']}, after {loadavg['after']}; {summary['cpus']} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    ok = passed(summary, cancelled)
    print("PASS" if ok else "FAIL: see the outcomes, token counts and KV blocks above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
