"""Load generator for a running server (`distinfer bench`, benchmarks/serving.py).

Requests arrive as a Poisson process at `rate` requests/s; each is a random token-id prompt of
`input_len` tokens generating exactly `output_len` tokens (greedy, ignore_eos), streamed over the
OpenAI HTTP API (/v1/completions, SSE) or gRPC (InferenceService.Generate). Metrics follow vLLM's
`benchmark_serving` definitions:

- TTFT: send -> first streamed token.   - E2EL: send -> last byte.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request.
- ITL: the gaps between successive streamed chunks, over all requests.
- goodput: requests/s that met every SLO (TTFT <= ttft_slo_s and TPOT <= tpot_slo_s).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LoadSpec:
    protocol: str = "http"  # http | grpc
    target: str | None = None  # http://host:port | host:port
    model: str | None = None
    rate: float = 1.0  # requests/s; inf: all at t=0
    num_requests: int = 32
    input_len: int = 64
    output_len: int = 32
    api_key: str | None = None
    seed: int = 0  # arrival times
    prompt_seed: int | None = None  # prompts (default: seed); vary it to avoid prefix-cache hits across runs
    vocab_low: int = 1000  # random prompt ids are drawn from [vocab_low, vocab_high)
    vocab_high: int = 30000
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.2
    request_timeout_s: float = 300.0


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass
class LoadReport:
    spec: LoadSpec
    duration_s: float
    results: list[RequestResult]

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    def summary(self) -> dict[str, Any]:
        ok, spec = self.ok, self.spec
        good = [r for r in ok if r.ttft <= spec.ttft_slo_s and r.tpot <= spec.tpot_slo_s]
        out: dict[str, Any] = {
            "protocol": spec.protocol, "rate": spec.rate, "requests": len(self.results), "completed": len(ok),
            "failed": len(self.results) - len(ok), "duration_s": self.duration_s,
            "request_throughput": len(ok) / self.duration_s, "goodput": len(good) / self.duration_s,
            "output_throughput": sum(r.output_tokens for r in ok) / self.duration_s,
        }
        series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.output_tokens > 1],
                  "itl": [x for r in ok for x in r.itl], "e2el": [r.e2el for r in ok]}
        for name, values in series.items():
            arr = np.asarray(values or [float("nan")]) * 1000.0
            out[f"mean_{name}_ms"] = float(arr.mean())
            for p in (50, 90, 99):
                out[f"p{p}_{name}_ms"] = float(np.percentile(arr, p))
        errors = sorted({r.error for r in self.results if not r.ok})
        if errors:
            out["errors"] = errors[:5]
        return out


def format_report(report: LoadReport) -> str:
    s = report.summary()
    lines = [
        f"{s['protocol']} @ {s['rate']} req/s: {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f} s, "
        f"{s['request_throughput']:.2f} req/s, goodput {s['goodput']:.2f} req/s "
        f"(TTFT <= {report.spec.ttft_slo_s * 1000:.0f} ms, TPOT <= {report.spec.tpot_slo_s * 1000:.0f} ms), "
        f"{s['output_throughput']:.1f} output tok/s",
    ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        lines.append(f"  {name.upper():5s} ms  mean {s[f'mean_{name}_ms']:8.1f}  p50 {s[f'p50_{name}_ms']:8.1f}  "
                     f"p90 {s[f'p90_{name}_ms']:8.1f}  p99 {s[f'p99_{name}_ms']:8.1f}")
    if "errors" in s:
        lines.append(f"  errors: {s['errors']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- one request per protocol


async def _http_request(client: Any, spec: LoadSpec, prompt: list[int]) -> RequestResult:
    body = {"model": spec.model, "prompt": prompt, "max_tokens": spec.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return result
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    result.e2el = time.perf_counter() - start
    result.ok = True
    return result


async def _grpc_request(stub: Any, spec: LoadSpec, prompt: list[int]) -> RequestResult:
    from distinfer.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt), model=spec.model or "",
        sampling_params=pb.SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True))
    metadata = (("authorization", f"Bearer {spec.api_key}"),) if spec.api_key else None
    start = last = time.perf_counter()
    result = RequestResult(ok=False)
    async for response in stub.Generate(request, metadata=metadata, timeout=spec.request_timeout_s):
        if response.token_ids:
            now = time.perf_counter()
            if result.ttft == 0.0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            result.output_tokens += len(response.token_ids)
    result.e2el = time.perf_counter() - start
    result.ok = True
    return result


# ---------------------------------------------------------------- the run


def _prompts(spec: LoadSpec) -> list[list[int]]:
    rng = random.Random(spec.seed if spec.prompt_seed is None else spec.prompt_seed)
    return [[rng.randrange(spec.vocab_low, spec.vocab_high) for _ in range(spec.input_len)] for _ in range(spec.num_requests)]


def _arrival_gaps(spec: LoadSpec) -> list[float]:
    if spec.rate == float("inf"):
        return [0.0] * spec.num_requests
    rng = np.random.default_rng(spec.seed)
    return list(rng.exponential(1.0 / spec.rate, size=spec.num_requests))


async def run_load(spec: LoadSpec) -> LoadReport:
    """Send spec.num_requests Poisson-spaced requests; every request is awaited (bounded by its timeout)."""
    closers: list[Any] = []
    if spec.protocol == "http":
        import httpx

        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        client = httpx.AsyncClient(base_url=spec.target or "http://127.0.0.1:8000", headers=headers,
                                   timeout=spec.request_timeout_s, limits=limits)
        closers.append(client.aclose)

        def send(prompt: list[int]) -> Any:
            return _http_request(client, spec, prompt)
    elif spec.protocol == "grpc":
        import grpc

        from distinfer.v1 import inference_pb2_grpc

        channel = grpc.aio.insecure_channel(spec.target or "127.0.0.1:50051")
        closers.append(channel.close)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def send(prompt: list[int]) -> Any:
            return _grpc_request(stub, spec, prompt)
    else:
        raise ValueError(f"protocol must be http or grpc, got {spec.protocol!r}")

    async def guarded(prompt: list[int]) -> RequestResult:
        try:
            return await asyncio.wait_for(send(prompt), spec.request_timeout_s)
        except Exception as exc:
            return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])

    tasks = []
    start = time.perf_counter()
    try:
        for prompt, gap in zip(_prompts(spec), _arrival_gaps(spec)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(guarded(prompt)))
        results = list(await asyncio.gather(*tasks))
    finally:
        for close in closers:
            await close()
    return LoadReport(spec, time.perf_counter() - start, results)
