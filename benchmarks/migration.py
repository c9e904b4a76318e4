"""Migration downtime against sequence length, between two engines in one process (engine.mover, the
endpoints the router drives): multi-stage pre-copy vs single-stage stop-and-copy vs re-prefill, same run.

    python benchmarks/migration.py [--lengths 128 512 2048 8192] [--json out.json]

Downtime = the gap in the request's token stream around the move (from the source's last token to the
destination's first) minus the request's normal inter-token time, measured just before on the source.
Multi-stage: pre-copy stages while the request keeps decoding on the source (each copies the blocks filled
since the last; they stop when at most --threshold blocks are new, or after --max-stages), then the last
stage pauses it for the rest. Single-stage: all blocks in the last stage. Re-prefill: no KV moves; the
destination computes prompt + tokens again (what failover does). This measures the copies and the adoption
in one process; across Ray actors the object store transfer adds to the last stage of both copy variants.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distinfer import LLM, SamplingParams  # noqa: E402
from distinfer.engine.engine import LLMEngine  # noqa: E402
from distinfer.engine.output_processor import RequestOutputKind  # noqa: E402

logger = logging.getLogger("benchmarks.migration")
WARM_TOKENS = 6  # tokens decoded on the source before the move; the inter-token time is taken over them


def decode_on_source(src: LLMEngine, request_id: str, prompt: list[int]) -> tuple[float, float]:
    """Prefill and decode a few tokens; (time of the last token, mean inter-token time)."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    src.add_request(request_id, {"prompt_token_ids": prompt}, params, output_kind=RequestOutputKind.DELTA)
    token_times: list[float] = []
    while len(token_times) < WARM_TOKENS:
        if src.step():
            token_times.append(time.perf_counter())
    return token_times[-1], float(np.mean(np.diff(token_times[1:])))


def first_token(dst: LLMEngine) -> float:
    while not dst.step():
        pass
    return time.perf_counter()


def precopy(src: LLMEngine, dst: LLMEngine, request_id: str, threshold: int, max_stages: int) -> tuple[int, float]:
    """Pre-copy stages while the request decodes on the source; (blocks sent, time of its last token there)."""
    sent, last = 0, time.perf_counter()
    for _ in range(max_stages):
        kv, end = src.mover.export_blocks(request_id, sent)
        if end > sent:
            assert dst.mover.reserve(request_id, end)
            dst.mover.import_blocks(request_id, sent, kv)
        new, sent = end - sent, end
        if src.step():
            last = time.perf_counter()
        if new <= threshold:
            break
    return sent, last


def median_move(src: LLMEngine, dst: LLMEngine, length: int, mode: str, args: argparse.Namespace, rng) -> dict:
    """The move with the median downtime of --repeats (this machine's step times jitter by tens of ms)."""
    moves = sorted((one_move(src, dst, length, mode, rng, f"{mode}-{length}-{i}", args)
                    for i in range(args.repeats)), key=lambda m: m["downtime_s"])
    logger.info("%s at %d tokens: downtimes %s ms", mode, length, [round(1e3 * m["downtime_s"], 1) for m in moves])
    return moves[len(moves) // 2]


def one_move(src: LLMEngine, dst: LLMEngine, length: int, mode: str, rng, request_id: str,
             args: argparse.Namespace) -> dict:
    prompt = rng.integers(100, 40000, size=length).tolist()
    last, itl = decode_on_source(src, request_id, prompt)
    sent = 0
    if mode == "multi-stage":
        sent, last = precopy(src, dst, request_id, args.threshold, args.max_stages)
    paused = time.perf_counter()
    snapshot, kv = src.mover.export_request(request_id, sent)
    if mode == "re-prefill":
        snapshot.num_computed_tokens, kv = 0, []
    assert dst.mover.commit(snapshot, kv, sent)
    committed = time.perf_counter()
    resumed = first_token(dst)
    dst.abort_request(request_id)
    while dst.has_unfinished_requests():
        dst.step()
    gap = resumed - last
    return {"length": length, "mode": mode, "downtime_s": gap - itl, "inter_token_s": itl,
            "last_stage_s": committed - paused, "blocks_precopied": sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--threshold", type=int, default=1, help="stop pre-copy when at most this many blocks are new")
    parser.add_argument("--max-stages", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    common = dict(dtype=args.dtype, max_model_len=max(args.lengths) + 128, enable_prefix_caching=False,
                  num_kv_blocks=(max(args.lengths) + 128) // 16 * 2)
    src, dst = (LLM(**common).engine for _ in range(2))
    rng = np.random.default_rng(0)
    rows = [median_move(src, dst, length, mode, args, rng)
            for length in args.lengths for mode in ("multi-stage", "single-stage", "re-prefill")]
    print(table(rows, args.lengths))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def table(rows: list[dict], lengths: list[int]) -> str:
    modes = ("multi-stage", "single-stage", "re-prefill")
    by = {(r["length"], r["mode"]): r for r in rows}
    lines = ["downtime (ms; stream gap - inter-token time) by sequence length; default model, this CPU",
             "length  " + "  ".join(f"{m:>13}" for m in modes) + "  inter-token  pre-copied blocks"]
    for length in lengths:
        cells = "  ".join(f"{1e3 * by[(length, m)]['downtime_s']:13.1f}" for m in modes)
        lines.append(f"{length:6d}  {cells}  {1e3 * by[(length, 'multi-stage')]['inter_token_s']:9.1f} ms"
                     f"  {by[(length, 'multi-stage')]['blocks_precopied']:8d}")
    first, last = lengths[0], lengths[-1]
    for mode in modes:
        ratio = by[(last, mode)]["downtime_s"] / max(by[(first, mode)]["downtime_s"], 1e-6)
        lines.append(f"{mode}: downtime at {last} / at {first} = {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
