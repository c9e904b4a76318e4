"""Round-trip latency of small HTTP answers on an idle server (in-process, loopback): GET /health and a
one-token non-streamed completion. It shows per-response overheads of the serving stack (e.g. Nagle's
algorithm holding a response's body behind the client's delayed ACK), not model speed.

    .venv/bin/python benchmarks/http_latency.py [--rounds 50]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import httpx

from distinfer import AsyncLLM
from distinfer.serving.server import ServeOptions, ServerThread

logger = logging.getLogger("http_latency")


def timed(call, rounds: int) -> list[float]:
    call()  # warm-up
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return sorted(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    engine = AsyncLLM(max_model_len=512, num_kv_blocks=64)
    try:
        with ServerThread(engine, ServeOptions(http_port=0, grpc_port=None)) as server, \
                httpx.Client(base_url=server.http_url, timeout=30) as client:
            body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
            cases = {"GET /health": lambda: client.get("/health").raise_for_status(),
                     "POST /v1/completions (1 token)": lambda: client.post("/v1/completions", json=body).raise_for_status()}
            for name, call in cases.items():
                samples = timed(call, args.rounds)
                logger.info("%-32s median %6.1f ms   p90 %6.1f ms", name, statistics.median(samples) * 1e3,
                            samples[int(0.9 * (len(samples) - 1))] * 1e3)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
