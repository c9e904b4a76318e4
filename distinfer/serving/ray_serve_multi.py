"""Several models in one Ray Serve application, routed by the request's `model` field.

`args: {models: [...], api_key: ...}` (MultiModelArgs) builds one DistInfer deployment per entry (each
entry is a ServeAppArgs, plus its own replica settings) and an ingress deployment, DistInferIngress, that
Serve's proxies send every request to:

- HTTP: /v1/completions and /v1/chat/completions go to the deployment named by the JSON body's `model`
  (missing: the first entry; a name no entry serves: 404 `model_not_found` in OpenAI's format). The
  model deployment's own OpenAI app answers it, and its ASGI messages stream back through the ingress
  (asgi_relay.py), so SSE streams stay streams and a client that disconnects aborts the request.
  /v1/models lists every model; /health is 200 when every model is healthy (else the first unhealthy
  answer); /metrics merges one replica of each model (every replica also exports through Ray's metrics).
- gRPC: Generate, Tokenize, GetModelInfo, GetServerInfo and DrainInstance by the request's `model`
  (empty: the first entry; unknown: NOT_FOUND); Abort asks every model; grpc.health.v1 `Check` is
  SERVING when every model is.
- The API key (args.api_key, else $DISTINFER_API_KEY / $DISTINFER_API_KEY_FILE) is checked at the
  ingress, before any routing; model deployments are reachable only through their handles.

Deployment names: DistInferIngress, and `DistInfer-<served name>` per model (characters other than
letters, digits, `-`, `_` and `.` become `-`), for the Serve config's `deployments:` overrides.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from distinfer.serving.asgi_relay import GrpcStatus, HttpCall, RelayResponse, collect
from distinfer.serving.auth import api_key_problem, resolve_api_key
from distinfer.serving.grpc_auth import authorization_value
from distinfer.serving.grpc_health_check import NOT_SERVING, SERVING
from distinfer.serving.http_guard import RequestGuard
from distinfer.serving.limits import ServerLimits
from distinfer.serving.openai_errors import OpenAIError, install_error_handlers
from distinfer.serving.openai_protocol import error_body
from distinfer.serving.ray_serve import (
    DEPLOYMENT_NAME,
    INFERENCE_SERVICE_NAME,
    ServeAppArgs,
    _ServeGrpcContext,
    model_deployment,
)
from distinfer.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)

INGRESS_NAME = "DistInferIngress"
REPLICA_FIELDS = ("num_replicas", "autoscaling_config", "max_ongoing_requests")


class ModelEntry(ServeAppArgs):
    """One model of a multi-model application: its ServeAppArgs and its deployment's replica settings
    (the Serve config's `deployments:` entry of the same name, when there is one, overrides them)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_entry(self) -> "ModelEntry":
        if self.api_key is not None:
            raise ValueError("api_key is set once for the application (args.api_key), not per model")
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def serve_args(self) -> ServeAppArgs:
        return ServeAppArgs.model_validate(self.model_dump(exclude=set(REPLICA_FIELDS)))

    def deployment_options(self) -> dict[str, Any]:
        options = {name: getattr(self, name) for name in REPLICA_FIELDS if getattr(self, name) is not None}
        return dict(options, name=deployment_name(self.model_name))


class MultiModelArgs(BaseModel):
    """The application's `args` when it serves several models."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)
    api_key: str | None = None  # checked at the ingress, for every model

    @model_validator(mode="after")
    def _check_names(self) -> "MultiModelArgs":
        seen: dict[str, str] = {}
        for entry in self.models:
            name = entry.model_name
            if name in seen.values():
                raise ValueError(f"two models are served as {name!r}: give each a distinct served_model_name")
            clash = seen.get(deployment_name(name))
            if clash is not None:
                raise ValueError(f"served names {clash!r} and {name!r} give the same deployment name "
                                 f"{deployment_name(name)!r}: rename one")
            seen[deployment_name(name)] = name
        return self


def deployment_name(served_name: str) -> str:
    return f"{DEPLOYMENT_NAME}-{re.sub(r'[^A-Za-z0-9._-]', '-', served_name)}"


def multi_model_app(args: dict[str, Any]) -> Application:
    """The ingress bound to one DistInfer deployment per model (app_builder's `models` form)."""
    parsed = MultiModelArgs.model_validate(args)
    models = {entry.model_name: model_deployment(entry.serve_args(), ingress=False, **entry.deployment_options())
              for entry in parsed.models}
    return DistInferIngress.bind(models, parsed.api_key)


# ------------------------------------------------------------ HTTP


def requested_model(body: bytes) -> str | None:
    """The body's `model` when it is a usable name; else None (the first model then answers the request,
    and its own validation reports a body that is not JSON or a `model` of the wrong type)."""
    try:
        model = json.loads(body).get("model")
        model.encode("utf-8")  # a lone surrogate: the model's app refuses it without echoing it
    except (ValueError, AttributeError, UnicodeError):
        return None
    return model or None


def unknown_model(name: str, names: list[str]) -> OpenAIError:
    served = ", ".join(f"`{n}`" for n in names)
    return OpenAIError(404, f"The model `{name}` does not exist; this server serves {served}.",
                       "invalid_request_error", "model", "model_not_found")


def merge_metrics(texts: list[str]) -> bytes:
    """One Prometheus exposition from several (each model labels its series with model_name)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    seen: set[tuple] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            fresh = [s for s in family.samples if (s.name, tuple(sorted(s.labels.items()))) not in seen]
            seen.update((s.name, tuple(sorted(s.labels.items()))) for s in fresh)
            if merged is not family:
                merged.samples.extend(fresh)
            else:
                family.samples[:] = fresh

    class _Merged:
        def collect(self) -> list[Any]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


def _replay(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
            if k.lower() in (b"content-type", b"retry-after")}
    return Response(body, status_code=status, headers=kept)


def build_ingress_app(models: dict[str, Any], api_key: str | None, limits: ServerLimits | None = None) -> FastAPI:
    """The ingress's HTTP app: `models` maps each served name to its deployment's handle."""
    limits = limits or ServerLimits()
    names = list(models)
    app = FastAPI(title="distinfer OpenAI-compatible API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       max_header_bytes=limits.max_header_bytes)

    def relay(name: str, call: HttpCall) -> Any:
        return models[name].options(stream=True).relay_http.remote(call)

    async def ask_all(request: Request) -> list[tuple[int, list, bytes]]:
        async def one(name: str) -> tuple[int, list, bytes]:
            try:
                return await collect(relay(name, HttpCall.of(request, b"")))
            except Exception as exc:  # the deployment is gone or failing: the details go to the log only
                logger.warning("model %s did not answer %s: %r", name, request.url.path, exc)
                body = error_body(f"model `{name}` is unavailable", "service_unavailable", None, "model_unavailable")
                return 503, [(b"content-type", b"application/json")], json.dumps(body).encode()
        return list(await asyncio.gather(*(one(n) for n in names)))

    async def generation(request: Request) -> Response:
        body = await request.body()  # RequestGuard has bounded it
        name = requested_model(body) or names[0]
        if name not in models:
            raise unknown_model(name, names)
        call = HttpCall.of(request, body)
        return RelayResponse(lambda: relay(name, call))

    app.add_api_route("/v1/completions", generation, methods=["POST"])
    app.add_api_route("/v1/chat/completions", generation, methods=["POST"])

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        answers = await ask_all(request)
        for status, headers, body in answers:
            if status != 200:
                return _replay(status, headers, body)
        return JSONResponse({"object": "list", "data": [card for _, _, body in answers
                                                         for card in json.loads(body)["data"]]})

    @app.get("/health")
    async def health(request: Request) -> Response:
        answers = await ask_all(request)
        unhealthy = [answer for answer in answers if answer[0] != 200]
        return _replay(*unhealthy[0]) if unhealthy else JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        answers = await ask_all(request)
        texts = [body.decode("utf-8") for status, _, body in answers if status == 200]
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE_LATEST)

    return app


# ------------------------------------------------------------ the ingress deployment


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1024,
                  graceful_shutdown_timeout_s=60)
@serve.ingress()
class DistInferIngress:
    """Routes every HTTP and gRPC request to the model it names (see the module docstring)."""

    async def __init__(self, models: dict[str, Any], api_key: str | None) -> None:
        self.models = models  # served name -> DeploymentHandle, in the args' order
        self.names = list(models)
        self.api_key = resolve_api_key(api_key)  # or $DISTINFER_API_KEY / $DISTINFER_API_KEY_FILE

    def __serve_build_asgi_app__(self) -> Any:
        return build_ingress_app(self.models, self.api_key)

    async def _route(self, model: str, context: _ServeGrpcContext) -> Any:
        """The handle of the model a gRPC request names, after the API key check (raises after setting
        the status)."""
        if self.api_key:
            problem = api_key_problem(authorization_value(context.invocation_metadata()), self.api_key)
            if problem is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        name = model or self.names[0]
        if name not in self.models:
            served = ", ".join(repr(n) for n in self.names)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here; this "
                                f"application serves {served}")
        return self.models[name]

    async def _relay(self, handle: Any, method: str, request: Any, context: _ServeGrpcContext) -> AsyncIterator[Any]:
        stream = handle.options(stream=True).relay_grpc.remote(method, request, context.invocation_metadata())
        finished = False
        try:
            async for item in stream:
                if isinstance(item, GrpcStatus):
                    await context.abort(item.code, item.details)
                yield item
            finished = True
        finally:
            if not finished:  # cancelled by the client (or refused): stop the model's request
                stream.cancel()

    async def _first(self, handle: Any, method: str, request: Any, context: _ServeGrpcContext) -> Any:
        return [item async for item in self._relay(handle, method, request, context)][0]

    async def _unary(self, method: str, request: Any, grpc_context: Any) -> Any:
        context = _ServeGrpcContext(grpc_context)
        handle = await self._route(request.model, context)
        return await self._first(handle, method, request, context)

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        context = _ServeGrpcContext(grpc_context)
        handle = await self._route(request.model, context)
        async for response in self._relay(handle, "Generate", request, context):
            yield response

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("Tokenize", request, grpc_context)

    async def GetModelInfo(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("GetModelInfo", request, grpc_context)

    async def GetServerInfo(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("GetServerInfo", request, grpc_context)

    async def DrainInstance(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("DrainInstance", request, grpc_context)

    async def Abort(self, request: Any, grpc_context: Any = None) -> Any:
        """Request ids do not name a model: every model is asked; found when one had it."""
        context = _ServeGrpcContext(grpc_context)
        await self._route("", context)  # the API key
        answers = await asyncio.gather(*(self._first(h, "Abort", request, context) for h in self.models.values()))
        return pb.AbortResponse(found=any(answer.found for answer in answers))

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1 Check: SERVING when every model is. No API key, as in `distinfer serve`."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", INFERENCE_SERVICE_NAME):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        context = _ServeGrpcContext(None, [])
        try:
            answers = await asyncio.gather(*(self._first(h, "Check", request, context) for h in self.models.values()))
        except Exception:  # a model deployment is gone
            return health_pb2.HealthCheckResponse(status=NOT_SERVING)
        serving = all(answer.status == SERVING for answer in answers)
        return health_pb2.HealthCheckResponse(status=SERVING if serving else NOT_SERVING)
