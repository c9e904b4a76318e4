"""Sequence parallelism: prefill time of long prompts at sp=1 against sp=2 with the same cores, same run.

    .venv/bin/python benchmarks/sequence_parallel.py [--lengths 2000 4000 8000] [--repeats 2]
        [--sp1-threads N] [--json out.json]

- sp=1: the default model in this process (no Ray), every core to torch: its best configuration.
- sp=2: two Ray workers, one core each (cores / world size, what the Ray executor gives a rank).
- `--sp1-threads 1`: sp=1 on one core instead (the scaling view: sp=2 adds a rank with its own core).
Both take the whole prompt in one step (max_num_batched_tokens = the longest prompt: no chunking on either
side) and generate one token, so the time is the prefill (+ one sampling). Runs alternate sp=1 / sp=2 for
each length and repeat (the host is shared and noisy); the table reports medians.

Also measured for sp=2, from rank 0's step timings (StepTimings.ring_*): the bytes it sent around the ring
(its rows' K/V, every layer), how long its transfers were in flight (posted -> received) and how much of
that it sat waiting; hidden = 1 - waiting / in flight (the rest overlapped the attention on the chunk in
hand). For scale, the time the same bytes take to cross between two idle processes over gloo alone. And each
rank's KV blocks for the prompt (after the prefill step, from the scheduler's partitioned pool) against sp=1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distinfer import LLM, SamplingParams  # noqa: E402
from distinfer.model.attention.sp_plan import zigzag_bounds  # noqa: E402

logger = logging.getLogger("benchmarks.sequence_parallel")
BLOCK = 16


def build(sp: int, max_len: int) -> LLM:
    blocks = -(-(max_len + BLOCK) // BLOCK)  # one prompt of max_len, and its token
    return LLM(None, sequence_parallel_size=sp, dtype="float32", block_size=BLOCK, num_kv_blocks=blocks,
               max_model_len=min(8192, max_len + BLOCK), max_num_batched_tokens=max_len + BLOCK,
               enable_prefix_caching=False)


def prefill_seconds(llm: LLM, prompt: list[int], tokens: dict | None = None) -> float:
    """Seconds for the prompt and one greedy token (recorded in `tokens` by engine, to compare them)."""
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - start
    if tokens is not None:
        tokens.setdefault(id(llm), set()).add(out[0].outputs[0].token_ids[0])
    return seconds


def oracle_token(prompt: list[int]) -> int:
    """transformers' greedy next token for the prompt (float32, the same converted model)."""
    from benchmarks.common import hf_reference_model

    model, _ = hf_reference_model("float32")
    with torch.inference_mode():
        return int(model(torch.tensor([prompt])).logits[0, -1].argmax())


def kv_blocks_per_rank(llm: LLM, prompt: list[int]) -> list[int]:
    """Device blocks each SP rank holds for the prompt once its prefill step ran."""
    engine = llm.engine
    engine.add_request("kv-probe", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    pool = engine.scheduler.kv.pool
    held = [pool.partition_size - pool.num_free_in(p) for p in range(pool.num_partitions)]
    engine.abort_request("kv-probe")
    while engine.has_unfinished_requests():
        engine.step()
    return held


def ring_bytes(length: int, hf_config) -> tuple[int, int]:
    """(rows rank 0 computes, bytes of their K/V for all layers) for one prompt at sp=2."""
    bounds = zigzag_bounds(length, 2)
    rows = (bounds[1] - bounds[0]) + (bounds[4] - bounds[3])
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    per_row = 2 * hf_config.num_key_value_heads * head_dim * 4
    return rows, rows * per_row * hf_config.num_hidden_layers


def _exchange(rank: int, init_file: str, nbytes: int, repeats: int, result) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=2, rank=rank)
    mine, theirs = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, 1 - rank), dist.P2POp(dist.irecv, theirs, 1 - rank)])
        for work in works:
            work.wait()
        times.append(time.perf_counter() - start)
    if rank == 0:
        result.put(statistics.median(times))
    dist.destroy_process_group()


def transfer_seconds(nbytes: int, repeats: int = 9) -> float:
    """Median time for two processes to swap `nbytes` each over gloo (one ring step's transfer, alone)."""
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_exchange, args=(r, os.path.join(tmp, "init"), nbytes, repeats, result))
                 for r in range(2)]
        for p in procs:
            p.start()
        seconds = result.get(timeout=300)
        for p in procs:
            p.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sp1-threads", type=int, default=None,
                        help="torch threads of the sp=1 engine (default: every core, as it would run)")
    parser.add_argument("--check-oracle", action="store_true",
                        help="also compute transformers' greedy token for each prompt (slow at 8k)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.sp1_threads:
        torch.set_num_threads(args.sp1_threads)  # the sp=1 engine runs in this process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    gen = torch.Generator().manual_seed(0)
    llms = {sp: build(sp, max(args.lengths)) for sp in (1, 2)}
    hf_config = llms[1].engine.executor.worker.runner.hf_config
    rows = []
    try:
        for length in args.lengths:
            prompt = torch.randint(100, 40000, (length,), generator=gen).tolist()
            for llm in llms.values():  # warm-up: first-call costs (kernels, allocator) out of the timings
                prefill_seconds(llm, prompt[:64])
            times: dict[int, list[float]] = {1: [], 2: []}
            ring, tokens = [], {}
            for _ in range(args.repeats):
                for sp, llm in llms.items():
                    times[sp].append(prefill_seconds(llm, prompt, tokens))
                    if sp == 2:
                        ring.append(llm.engine.executor.last_control.per_rank[0])
            local_rows, nbytes = ring_bytes(length, hf_config)
            assert all(t.ring_bytes == nbytes for t in ring), (nbytes, [t.ring_bytes for t in ring])
            transfer = transfer_seconds(nbytes // hf_config.num_hidden_layers) * hf_config.num_hidden_layers
            row = {"length": length, "sp1_threads": torch.get_num_threads(), "sp1_s": statistics.median(times[1]), "sp2_s": statistics.median(times[2]),
                   "sp1_all": times[1], "sp2_all": times[2], "ring_rows_rank0": local_rows,
                   "ring_bytes_per_step": nbytes, "transfer_alone_s": transfer,
                   "in_flight_s": statistics.median(t.ring_in_flight for t in ring),
                   "waited_s": statistics.median(t.ring_exposed for t in ring),
                   "hidden": statistics.median(1 - t.ring_exposed / t.ring_in_flight for t in ring),
                   "kv_blocks_sp1": kv_blocks_per_rank(llms[1], prompt), "kv_blocks_sp2": kv_blocks_per_rank(llms[2], prompt)}
            row["speedup"] = row["sp1_s"] / row["sp2_s"]
            row["tokens"] = sorted(set().union(*tokens.values()))  # one value: every run of both agreed
            if args.check_oracle:
                row["oracle_token"] = oracle_token(prompt)
            logger.info("%s", row)
            rows.append(row)
    finally:
        for llm in llms.values():
            llm.shutdown()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows: list[dict]) -> str:
    lines = ["| prompt tokens | sp=1 s | sp=2 s | sp=1 / sp=2 | ring MB sent (rank 0, all layers) | transfer alone s | "
             "in flight s | waited s | hidden | KV blocks sp=1 | KV blocks per rank sp=2 | greedy token (all runs; HF) |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['sp1_s']:.2f} | {r['sp2_s']:.2f} | **{r['speedup']:.2f}x** | "
                     f"{r['ring_bytes_per_step'] / 1e6:.1f} | {r['transfer_alone_s']:.3f} | {r['in_flight_s']:.3f} | "
                     f"{r['waited_s']:.3f} | "
                     f"{100 * r['hidden']:.0f}% | {r['kv_blocks_sp1'][0]} | {' / '.join(map(str, r['kv_blocks_sp2']))} | "
                     f"{r['tokens']}{'; ' + str(r['oracle_token']) if 'oracle_token' in r else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
