"""One authenticated request to a running distinfer, over HTTP or gRPC (`entrypoint.py smoke`, `helm test`).

http_request: POST /v1/completions (the model from GET /v1/models), returns the text.
grpc_request: grpc.health.v1 Check (must be SERVING), then one InferenceService/Generate stream.
Both raise on any failure, so the command exits non-zero and the test pod fails.
"""
from __future__ import annotations

import json
import logging
import ssl
import urllib.request

logger = logging.getLogger("distinfer.smoke")


def _http(url: str, key: str, timeout: float, context: ssl.SSLContext | None, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.loads(response.read())


def http_request(target: str, key: str, prompt: str, max_tokens: int, timeout: float,
                 ca_file: str | None = None) -> str:
    base = target.rstrip("/")
    context = ssl.create_default_context(cafile=ca_file) if base.startswith("https") else None
    model = _http(f"{base}/v1/models", key, timeout, context)["data"][0]["id"]
    reply = _http(f"{base}/v1/completions", key, timeout, context,
                  {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    text = reply["choices"][0]["text"]
    if reply["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"no tokens generated: {reply}")
    logger.info("HTTP %s (%s): %r", base, model, text)
    return text


def grpc_request(target: str, key: str, prompt: str, max_tokens: int, timeout: float,
                 ca_file: str | None = None) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from distinfer.v1 import inference_pb2 as pb
    from distinfer.v1 import inference_pb2_grpc as pb_grpc

    if ca_file:
        with open(ca_file, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="distinfer.v1.InferenceService"), timeout=timeout)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"gRPC health: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
        request = pb.GenerateRequest(text=prompt, sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
        responses = list(pb_grpc.InferenceServiceStub(channel).Generate(
            request, timeout=timeout, metadata=(("authorization", f"Bearer {key}"),)))
    text = "".join(r.text for r in responses)
    if not responses or responses[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        raise RuntimeError(f"the Generate stream did not finish: {responses}")
    logger.info("gRPC %s: %r", target, text)
    return text
