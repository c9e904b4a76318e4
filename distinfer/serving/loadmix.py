"""Loopback load with faults (issue 8): many concurrent streams against both APIs of one server,
mixing normal greedy streams, streams the client cancels after a few tokens, and requests the server
must refuse; then an account of what every stream received.

Shared by tests/e2e/test_load.py (which asserts on it) and benchmarks/load.py (which prints it).

- normal: a greedy stream of `max_tokens` tokens of one of PROMPTS (text prompts).
- cancel: a greedy `ignore_eos` stream with room for hundreds of tokens, which the client ends after
  1-3 tokens (closing the SSE response / cancelling the gRPC call).
- bad: a request the server must refuse with 400 / INVALID_ARGUMENT naming the field: a negative
  temperature, a token id outside the vocabulary, max_tokens beyond the context, a lone surrogate in
  the prompt (over gRPC that is invalid UTF-8 on the wire, sent raw: protobuf will not encode it).

What a stream received is recorded per token: ids over gRPC; over SSE the per-token strings of
`logprobs` (the OpenAI API carries no ids), which the server decodes one token at a time with
`tokenizer.decode([id])`, so the expected ones are the oracle's ids decoded the same way. Lost and
extra tokens are counted against the longest common subsequence with the expected tokens: a dropped,
repeated or wrong token shows up in one of them.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import grpc
import httpx
import numpy as np

from distinfer.client import AsyncClient, DistinferClientError, Load, RetryPolicy

PROMPTS = (
    ("The history of the Roman Empire spans more than a thousand years, from the founding of the city to the "
     "fall of Constantinople. In short,"),
    "Here is a list of the planets of the solar system, in order of their distance from the Sun:",
    "Q: What is the boiling point of water at sea level, in degrees Celsius?\nA:",
    "Emoji test: 🚀🚀 and 東京 and café, then the three most important ideas in machine learning are",
)
BAD_CASES = ("temperature", "vocab", "max_tokens", "surrogate")
HTTP_PARAM = {"temperature": "temperature", "vocab": "prompt", "max_tokens": "max_tokens", "surrogate": "prompt"}
GRPC_FIELD = {"temperature": "sampling_params.temperature", "vocab": "token_ids.ids",
              "max_tokens": "sampling_params.max_tokens", "surrogate": "text"}
SURROGATE_PROMPT = "Hello \ud800 world"
OUTCOMES = ("ok", "cancelled", "rejected", "queue_full", "error")
_GENERATE = "/distinfer.v1.InferenceService/Generate"


@dataclass(frozen=True)
class MixSpec:
    streams: int = 200
    protocol: str = "mix"  # mix (half each) | http | grpc
    max_tokens: int = 16  # of a normal stream
    cancel_fraction: float = 0.2
    bad_fraction: float = 0.2
    seed: int = 0  # the launch order
    model: str | None = None  # the served model name (None: the server's)
    max_model_len: int = 512  # the server's: bad requests ask for this many tokens; cancelled ones half
    vocab_size: int = 49152  # the server's: the bad token id
    timeout_s: float = 300.0  # per stream


@dataclass(frozen=True)
class StreamPlan:
    index: int  # launch order
    protocol: str  # http | grpc
    kind: str  # normal | cancel | bad
    prompt: int = 0  # index into PROMPTS
    cancel_after: int = 0  # cancel: tokens to read before cancelling
    bad: str = ""  # bad: one of BAD_CASES


@dataclass
class StreamResult:
    plan: StreamPlan
    outcome: str = "error"  # one of OUTCOMES
    tokens: list = field(default_factory=list)  # ids (gRPC) or per-token strings (SSE)
    text: str = ""
    finish_reason: str | None = None
    status: str = ""  # HTTP status or gRPC code of a refusal
    detail: str = ""  # the refused field (param), or what went wrong
    ttft_s: float | None = None
    e2e_s: float = 0.0


@dataclass
class Oracle:
    """Expected greedy continuations per prompt: ids, whole text, and the per-token strings SSE carries."""

    ids: list[list[int]]
    texts: list[str]
    pieces: list[list[str]]

    @classmethod
    def from_ids(cls, tokenizer: Any, ids: Sequence[Sequence[int]]) -> "Oracle":
        return cls([list(x) for x in ids], [tokenizer.decode(list(x), skip_special_tokens=True) for x in ids],
                   [[tokenizer.decode([t]) for t in x] for x in ids])

    def tokens(self, plan: StreamPlan) -> list:
        return self.ids[plan.prompt] if plan.protocol == "grpc" else self.pieces[plan.prompt]


def plan_mix(spec: MixSpec) -> list[StreamPlan]:
    """Every stream's plan, split evenly over the protocols, kinds and prompts, in a seeded launch order."""
    protocols = ["http", "grpc"] if spec.protocol == "mix" else [spec.protocol]
    plans: list[StreamPlan] = []
    for p, protocol in enumerate(protocols):
        count = spec.streams // len(protocols) + (p < spec.streams % len(protocols))
        bad, cancel = round(count * spec.bad_fraction), round(count * spec.cancel_fraction)
        plans += [StreamPlan(0, protocol, "bad", i % len(PROMPTS), bad=BAD_CASES[i % len(BAD_CASES)]) for i in range(bad)]
        plans += [StreamPlan(0, protocol, "cancel", i % len(PROMPTS), cancel_after=1 + i % 3) for i in range(cancel)]
        plans += [StreamPlan(0, protocol, "normal", i % len(PROMPTS)) for i in range(count - bad - cancel)]
    random.Random(spec.seed).shuffle(plans)
    return [replace(plan, index=i) for i, plan in enumerate(plans)]


# ---------------------------------------------------------------- one stream over HTTP (SSE)


def _http_body(spec: MixSpec, plan: StreamPlan) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": PROMPTS[plan.prompt], "max_tokens": spec.max_tokens, "temperature": 0,
                            "stream": True, "logprobs": 0}
    if spec.model:
        body["model"] = spec.model
    if plan.kind == "cancel":
        body.update(max_tokens=spec.max_model_len // 2, ignore_eos=True)
    elif plan.bad == "temperature":
        body["temperature"] = -1.0
    elif plan.bad == "vocab":
        body["prompt"] = [spec.vocab_size]
    elif plan.bad == "max_tokens":
        body["max_tokens"] = spec.max_model_len
    elif plan.bad == "surrogate":
        body["prompt"] = SURROGATE_PROMPT  # json.dumps escapes it (\ud800): valid JSON, invalid Unicode
    return body


def _error_of(body: bytes) -> dict[str, Any]:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    return error if isinstance(error, dict) else {"message": body[:200].decode(errors="replace")}


def _classify_refusal(result: StreamResult, status: str, detail: str, queue_full: bool, expected: bool) -> None:
    result.status, result.detail = status, detail
    result.outcome = "queue_full" if queue_full else "rejected" if expected else "error"


async def _http_stream(client: httpx.AsyncClient, spec: MixSpec, plan: StreamPlan, start: float) -> StreamResult:
    result = StreamResult(plan)
    content = json.dumps(_http_body(spec, plan)).encode()
    async with client.stream("POST", "/v1/completions", content=content,
                             headers={"content-type": "application/json"}) as response:
        if response.status_code != 200:
            error = _error_of(await response.aread())
            param = error.get("param") or ""
            expected = response.status_code == 400 and plan.kind == "bad" and param == HTTP_PARAM[plan.bad]
            _classify_refusal(result, str(response.status_code), param or error.get("message", ""),
                              response.status_code == 429, expected)
            return result
        await _read_sse(response, result, start)
    return result  # leaving the block early (a cancel) closed the connection: the server aborts


async def _read_sse(response: httpx.Response, result: StreamResult, start: float) -> None:
    plan, done = result.plan, False
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            done = True
            break
        if not line.startswith("data: "):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            result.status, result.detail = "in-band", chunk["error"].get("message", "")
            return
        for choice in chunk.get("choices", []):
            result.text += choice.get("text") or ""
            result.tokens += (choice.get("logprobs") or {}).get("tokens") or []
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
        if result.tokens and result.ttft_s is None:
            result.ttft_s = time.perf_counter() - start
        if plan.kind == "cancel" and len(result.tokens) >= plan.cancel_after:
            result.outcome = "cancelled"
            return
    _finish(result, done)


def _finish(result: StreamResult, ended_cleanly: bool) -> None:
    if result.plan.kind == "normal" and ended_cleanly and result.finish_reason in ("length", "stop"):
        result.outcome = "ok"
    else:
        result.detail = result.detail or f"stream ended (finish_reason {result.finish_reason}, clean {ended_cleanly})"


# ---------------------------------------------------------------- one stream over gRPC


async def _grpc_stream(client: AsyncClient, spec: MixSpec, plan: StreamPlan, start: float) -> StreamResult:
    result = StreamResult(plan)
    prompt: Any = [spec.vocab_size] if plan.bad == "vocab" else PROMPTS[plan.prompt]
    kwargs: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": 0.0}
    if plan.kind == "cancel":
        kwargs.update(max_tokens=spec.max_model_len // 2, ignore_eos=True)
    elif plan.bad == "temperature":
        kwargs["temperature"] = -1.0
    elif plan.bad == "max_tokens":
        kwargs["max_tokens"] = spec.max_model_len
    try:
        async with client.generate_stream(prompt, model=spec.model or "", timeout=spec.timeout_s, **kwargs) as stream:
            async for delta in stream:
                result.tokens += delta.token_ids
                result.text += delta.text
                result.finish_reason = delta.finish_reason or result.finish_reason
                if result.tokens and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - start
                if plan.kind == "cancel" and len(result.tokens) >= plan.cancel_after:
                    result.outcome = "cancelled"
                    return result  # leaving the block cancels the call: the server aborts
    except DistinferClientError as exc:
        _grpc_refused(result, exc.code, exc.details)
        return result
    _finish(result, True)
    return result


def _grpc_refused(result: StreamResult, code: grpc.StatusCode | None, details: str) -> None:
    plan = result.plan
    expected = (plan.kind == "bad" and code == grpc.StatusCode.INVALID_ARGUMENT
                and details.startswith(GRPC_FIELD[plan.bad]))
    _classify_refusal(result, code.name if code else "?", details, code == grpc.StatusCode.RESOURCE_EXHAUSTED, expected)


async def _grpc_invalid_utf8(channel: grpc.aio.Channel, spec: MixSpec, plan: StreamPlan) -> StreamResult:
    """A Generate call whose text is a lone surrogate on the wire (what a careless client could send)."""
    from distinfer.serving.grpc_codec import raw_message_class
    from distinfer.v1 import inference_pb2 as pb

    raw_request, raw_params = raw_message_class("GenerateRequest"), raw_message_class("SamplingParams")
    message = raw_request(text=SURROGATE_PROMPT.encode("utf-8", "surrogatepass"), model=(spec.model or "").encode(),
                          sampling_params=raw_params(max_tokens=spec.max_tokens, temperature=0.0))
    call = channel.unary_stream(_GENERATE, request_serializer=bytes, response_deserializer=pb.GenerateResponse.FromString)
    result = StreamResult(plan)
    try:
        async for _ in call(message.SerializeToString(), timeout=spec.timeout_s):
            result.detail = "the server answered a request with invalid UTF-8"
    except grpc.aio.AioRpcError as exc:
        _grpc_refused(result, exc.code(), exc.details() or "")
    return result


# ---------------------------------------------------------------- the run


@dataclass
class MixReport:
    spec: MixSpec
    wall_s: float
    results: list[StreamResult]

    def of(self, kind: str | None = None, outcome: str | None = None) -> list[StreamResult]:
        return [r for r in self.results if (kind is None or r.plan.kind == kind) and (outcome is None or r.outcome == outcome)]

    def counts(self) -> dict[str, int]:
        """'kind/outcome' -> streams, e.g. 'normal/ok': 120."""
        return dict(sorted(Counter(f"{r.plan.kind}/{r.outcome}" for r in self.results).items()))

    def token_errors(self, oracle: Oracle) -> tuple[int, int]:
        """(lost, extra) tokens over normal streams (against the whole expected continuation) and
        cancelled ones (against the expected prefix of what they read); queue-full streams excluded."""
        lost = extra = 0
        for r in self.results:
            if r.plan.kind == "bad" or r.outcome == "queue_full":
                continue
            expected = oracle.tokens(r.plan)
            if r.plan.kind == "cancel":
                expected = expected[:len(r.tokens)]
            common = lcs_length(r.tokens, expected)
            lost, extra = lost + len(expected) - common, extra + len(r.tokens) - common
        return lost, extra

    def summary(self, oracle: Oracle) -> dict[str, Any]:
        ok = self.of("normal", "ok")
        tokens = sum(len(r.tokens) for r in self.results)
        lost, extra = self.token_errors(oracle)
        out: dict[str, Any] = {
            "streams": len(self.results), "wall_s": self.wall_s, "requests_per_s": len(self.results) / self.wall_s,
            "normal_completed_per_s": len(ok) / self.wall_s, "output_tokens": tokens,
            "output_tokens_per_s": tokens / self.wall_s, "lost_tokens": lost, "extra_tokens": extra,
            "counts": self.counts()}
        for name, values in (("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]), ("e2e", [r.e2e_s for r in ok])):
            arr = np.asarray(values or [float("nan")]) * 1000.0
            out[f"p50_{name}_ms"], out[f"p99_{name}_ms"] = float(np.percentile(arr, 50)), float(np.percentile(arr, 99))
        errors = sorted({f"{r.plan.protocol} {r.plan.kind} {r.plan.bad}: {r.status} {r.detail}"[:200]
                         for r in self.of(outcome="error")})
        if errors:
            out["errors"] = errors[:5]
        return out


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (sequences of a few dozen tokens)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


async def run_mix(spec: MixSpec, http_url: str | None, grpc_target: str | None,
                  plans: list[StreamPlan] | None = None) -> MixReport:
    """Launch every planned stream at once and await them all (each bounded by spec.timeout_s)."""
    plans = plan_mix(spec) if plans is None else plans
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    http = httpx.AsyncClient(base_url=http_url or "http://127.0.0.1:1", timeout=spec.timeout_s, limits=limits)
    client = AsyncClient(grpc_target, retry=RetryPolicy(max_attempts=1)) if grpc_target else None
    raw = grpc.aio.insecure_channel(grpc_target) if grpc_target else None

    def send(plan: StreamPlan, start: float) -> Any:
        if plan.protocol == "http":
            return _http_stream(http, spec, plan, start)
        assert client is not None and raw is not None, "gRPC streams need a gRPC target"
        return _grpc_invalid_utf8(raw, spec, plan) if plan.bad == "surrogate" else _grpc_stream(client, spec, plan, start)

    async def guarded(plan: StreamPlan) -> StreamResult:
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(send(plan, start), spec.timeout_s)
        except Exception as exc:  # a transport error, a timeout: an outcome to report, not a crash
            result = StreamResult(plan, detail=f"{type(exc).__name__}: {exc}"[:300])
        result.e2e_s = time.perf_counter() - start
        return result

    start = time.perf_counter()
    try:
        results = list(await asyncio.gather(*(guarded(p) for p in plans)))
    finally:
        await http.aclose()
        if client is not None:
            await client.close()
        if raw is not None:
            await raw.close()
    return MixReport(spec, time.perf_counter() - start, results)


# ---------------------------------------------------------------- the server afterwards


def is_idle(load: Load) -> bool:
    """Nothing pending, waiting or running, and every KV block free (cached blocks count as free)."""
    return (load.num_pending, load.num_waiting, load.num_running) == (0, 0, 0) and load.num_free_blocks == load.num_total_blocks


async def wait_idle(grpc_target: str, timeout_s: float = 60.0) -> Load:
    """Poll GetServerInfo until the server is idle, or the deadline; returns the last Load seen."""
    async with AsyncClient(grpc_target, timeout=10) as client:
        deadline = time.monotonic() + timeout_s
        load = (await client.server_info()).load
        while not is_idle(load) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            load = (await client.server_info()).load
        return load


async def finished_by_reason(http_url: str) -> dict[str, float]:
    """distinfer:request_success_total by finished_reason (stop/length/abort/...), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=http_url, timeout=30) as client:
        text = (await client.get("/metrics")).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "distinfer:request_success_total":
                counts[sample.labels["finished_reason"]] = sample.value
    return counts


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        (f"{s['streams']} streams in {s['wall_s']:.1f} s: {s['requests_per_s']:.2f} requests/s "
         f"({s['normal_completed_per_s']:.2f} normal completed/s), {s['output_tokens']} output tokens, "
         f"{s['output_tokens_per_s']:.1f} tok/s"),
        (f"  normal streams: TTFT p50 {s['p50_ttft_ms']:.0f} ms, p99 {s['p99_ttft_ms']:.0f} ms; "
         f"e2e p50 {s['p50_e2e_ms']:.0f} ms, p99 {s['p99_e2e_ms']:.0f} ms"),
        "  outcomes: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()),
        f"  lost tokens {s['lost_tokens']}, extra (duplicated or wrong) tokens {s['extra_tokens']}",
    ]
    if "errors" in s:
        lines.append(f"  errors: {s['errors']}")
    return "\n".join(lines)

