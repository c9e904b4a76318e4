"""Online serving benchmark: Poisson arrivals at several rates against `distinfer serve` over the
OpenAI HTTP API (SSE) and gRPC, on loopback.

The server runs as a subprocess (its own interpreter, so the client does not share its GIL); the
load generator is distinfer.serving.loadgen (vLLM's benchmark_serving definitions of TTFT, TPOT, ITL,
E2EL and goodput). Every request is a random token-id prompt of --input-len tokens and generates
exactly --output-len tokens (greedy, ignore_eos). Bounded: --num-requests per rate, each request
with a timeout, and the whole run stops after --max-seconds.

    .venv/bin/python benchmarks/serving.py --rates 1,2,4 --num-requests 64 --json /tmp/serving.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import httpx

from distinfer.serving.loadgen import LoadSpec, format_report, run_load
from distinfer.serving.server import free_port

logger = logging.getLogger("benchmarks.serving")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int, int]:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "distinfer.cli", "serve", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--max-model-len", "2048", "--served-model-name", "bench",
               *args.serve_args]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2).status_code == 200:
                return server, http_port, grpc_port
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("server did not become healthy in 300 s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def markdown(rows: list[dict]) -> str:
    head = ("| protocol | rate (req/s) | done | req/s | goodput (req/s) | out tok/s | TTFT p50 / p99 (ms) "
            "| TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | E2EL p50 / p99 (ms) | load avg |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        pct = " | ".join(f"{r[f'p50_{m}_ms']:.0f} / {r[f'p99_{m}_ms']:.0f}" for m in ("ttft", "tpot", "itl", "e2el"))
        lines.append(f"| {r['protocol']} | {r['rate']} | {r['completed']}/{r['requests']} | {r['request_throughput']:.2f} "
                     f"| {r['goodput']:.2f} | {r['output_throughput']:.1f} | {pct} | {r['loadavg_1m'][1]:.1f} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace, http_port: int, grpc_port: int) -> list[dict]:
    targets = {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    common = dict(model="bench", input_len=args.input_len, output_len=args.output_len,
                  ttft_slo_s=args.ttft_slo_ms / 1000, tpot_slo_s=args.tpot_slo_ms / 1000)
    # Warm-up: first-batch costs (allocator growth at new batch shapes, connection set-up) stay out of
    # the figures; without it the first measured run was ~2x slower whichever protocol went first.
    for protocol in args.protocols:
        await run_load(LoadSpec(protocol=protocol, target=targets[protocol], rate=4.0, num_requests=24, seed=99, **common))
    rows: list[dict] = []
    started = time.monotonic()
    for rate in args.rates:
        for protocol in args.protocols:
            if time.monotonic() - started > args.max_seconds:
                logger.warning("time budget (%d s) spent: skipping the rest", args.max_seconds)
                return rows
            # Same arrival times for every protocol at a rate; fresh prompts per run (reused ones would
            # turn later runs' prefills into prefix-cache hits).
            spec = LoadSpec(protocol=protocol, target=targets[protocol], rate=rate, num_requests=args.num_requests,
                            seed=args.seed, prompt_seed=args.seed + 1000 * (len(rows) + 1), **common)
            load_before = os.getloadavg()[0]
            report = await run_load(spec)
            print(format_report(report), flush=True)
            # Other work on the machine shows here (the figures are only comparable at a similar load).
            rows.append(report.summary() | {"spec": asdict(spec), "loadavg_1m": [load_before, os.getloadavg()[0]]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s); inf allowed")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop starting new runs after this")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("serve_args", nargs="*", help="extra `distinfer serve` arguments (after --)")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.protocols = [p.strip() for p in args.protocols.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    server, http_port, grpc_port = start_server(args)
    try:
        rows = asyncio.run(run(args, http_port, grpc_port))
    finally:
        stop_server(server)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
