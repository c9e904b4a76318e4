"""Sequence parallelism: prefill time of long prompts at sp=1 against sp=2 with the same cores, same run.

    OMP_NUM_THREADS=... .venv/bin/python benchmarks/sequence_parallel.py [--lengths 2000 4000 8000]
        [--repeats 2] [--json out.json]

- sp=1: the default model in this process (no Ray), every core to torch: its best configuration.
- sp=2: two Ray workers, one core each (cores / world size, what the Ray executor gives a rank).
Both take the whole prompt in one step (max_num_batched_tokens = the longest prompt: no chunking on either
side) and generate one token, so the time is the prefill (+ one sampling). Runs alternate sp=1 / sp=2 for
each length and repeat (the host is shared and noisy); the table reports medians.

Also measured for sp=2: the ring's bytes per step (this rank's rows' K/V, every layer), the seconds rank 0
spent waiting in communication during the prefill step (StepTimings.collective: ring receives not yet done,
plus the sampled rows' all-gather), the time the same bytes take to cross between two processes over gloo
alone (so: the share of ring communication hidden behind attention = 1 - waited / transfer), and each rank's
KV blocks for the prompt (after the prefill step, from the scheduler's partitioned pool) against sp=1.
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


def prefill_seconds(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start


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
    parser.add_argument("--json")
    args = parser.parse_args()
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
            waited = []
            for _ in range(args.repeats):
                for sp, llm in llms.items():
                    times[sp].append(prefill_seconds(llm, prompt))
                    if sp == 2:
                        waited.append(llm.engine.executor.last_control.per_rank[0].collective)
            local_rows, nbytes = ring_bytes(length, hf_config)
            per_layer = transfer_seconds(nbytes // hf_config.num_hidden_layers)
            transfer = per_layer * hf_config.num_hidden_layers
            row = {"length": length, "sp1_s": statistics.median(times[1]), "sp2_s": statistics.median(times[2]),
                   "sp1_all": times[1], "sp2_all": times[2], "ring_rows_rank0": local_rows,
                   "ring_bytes_per_step": nbytes, "transfer_alone_s": transfer,
                   "waited_s": statistics.median(waited),
                   "kv_blocks_sp1": kv_blocks_per_rank(llms[1], prompt), "kv_blocks_sp2": kv_blocks_per_rank(llms[2], prompt)}
            row["speedup"] = row["sp1_s"] / row["sp2_s"]
            row["hidden"] = max(0.0, 1.0 - row["waited_s"] / transfer) if transfer else 1.0
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
    lines = ["| prompt tokens | sp=1 s | sp=2 s | sp=1 / sp=2 | ring MB per step (rank 0, all layers) | transfer alone s | "
             "waited s | hidden | KV blocks sp=1 | KV blocks per rank sp=2 |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['sp1_s']:.2f} | {r['sp2_s']:.2f} | **{r['speedup']:.2f}x** | "
                     f"{r['ring_bytes_per_step'] / 1e6:.1f} | {r['transfer_alone_s']:.3f} | {r['waited_s']:.3f} | "
                     f"{100 * r['hidden']:.0f}% | {r['kv_blocks_sp1'][0]} | {' / '.join(map(str, r['kv_blocks_sp2']))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
