"""Ray Serve application: one deployment whose replicas each host an AsyncLLM (or, with `num_instances`
> 1, a RouterEngine over that many engine instances, see distinfer/router).

`serve run deploy/serve_config.yaml` (or a KubeRay RayService's `serveConfigV2`) imports
`distinfer.serving.ray_serve:app_builder` with the YAML's `args` (ServeAppArgs). Each replica:

- reserves a placement group: bundle 0 for the replica itself, then one bundle per TP x PP x SP worker
  rank; the engine's RayExecutor places its workers in those bundles (it uses the current
  placement group when there is one) instead of reserving a second group;
- or, with `num_instances` > 1, reserves only its own CPU and starts a Router actor and that many
  EngineInstance actors outside its group (owned by the replica, they end with it), each instance
  reserving its own resources;
- answers the OpenAI HTTP API (the same FastAPI app as `distinfer serve`, built on the replica once
  the engine exists) through Serve's HTTP proxy;
- answers distinfer.v1.InferenceService through Serve's gRPC proxy (`grpc_options` in the YAML):
  the proxy calls the deployment's methods by RPC name, which delegate to the gRPC servicer
  (DrainInstance included: it drains an instance of the replica the proxy routed the call to), and
  grpc.health.v1 `Check` when the YAML lists the Health servicer function;
- exports its metrics through Ray's metrics agent (distinfer/serving/ray_metrics.py), so a scrape of
  every node's metrics port sees every replica.

Replicas scale with `autoscaling_config` (ongoing requests per replica); each is a full model copy.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from distinfer.serving.asgi_relay import GrpcStatus, HttpCall, run_asgi
from distinfer.serving.auth import api_key_problem, resolve_api_key
from distinfer.serving.grpc_auth import authorization_value
from distinfer.serving.grpc_health_check import NOT_SERVING, SERVING
from distinfer.serving.metrics import EngineMetrics
from distinfer.serving.openai_http import build_app
from distinfer.serving.ray_metrics import RayMetricsBridge
from distinfer.serving.server import DEFAULT_MODEL_NAME, check_instances, make_engine, router_kwargs_of

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "DistInfer"
INFERENCE_SERVICE_NAME = "distinfer.v1.InferenceService"


class ServeAppArgs(BaseModel):
    """The application's `args` in the Serve config."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    served_model_name: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    sequence_parallel_size: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the Ray cluster has GPUs
    api_key: str | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other AsyncLLM keyword
    # > 1: the replica hosts a RouterEngine over that many engine instances (each a full model copy with
    # its own tp x pp x sp workers), placed by `dispatch_policy` (default least_load; only with num_instances > 1)
    num_instances: int = Field(1, ge=1)
    dispatch_policy: str | None = None
    # prefill/decode disaggregation (P + D instances), live migration's trigger policy and KV transport
    prefill_instances: int = Field(0, ge=0)
    decode_instances: int = Field(0, ge=0)
    migration_policy: str | None = None
    migration_transport: Literal["object_store", "p2p"] = "object_store"
    # Ray's accelerator type (e.g. "A100", "H100"): the GPUs of a replica are placed only on nodes with it
    accelerator_type: str | None = None

    @model_validator(mode="after")
    def _check_instances(self) -> "ServeAppArgs":
        self.num_instances = check_instances(self.num_instances, self.dispatch_policy, self.prefill_instances,
                                             self.decode_instances, self.migration_policy)
        if self.accelerator_type is not None and (self.device == "cpu" or self.num_instances > 1):
            raise ValueError("accelerator_type places a replica's GPUs: it needs device cuda (or auto) and one "
                             "instance per replica (several instances reserve their own resources)")
        return self

    @property
    def router_kwargs(self) -> dict[str, Any]:
        return router_kwargs_of(self)

    @property
    def engine_args(self) -> dict[str, Any]:
        """The engine's keywords: engine_kwargs with the parallel sizes and the device."""
        return dict(self.engine_kwargs, tensor_parallel_size=self.tensor_parallel_size,
                    pipeline_parallel_size=self.pipeline_parallel_size,
                    sequence_parallel_size=self.sequence_parallel_size, device=self.device)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.sequence_parallel_size

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else DEFAULT_MODEL_NAME


def resolve_serve_device(device: str) -> str:
    """"auto" -> "cuda" when the Ray cluster this process is connected to (else this machine) has a GPU.
    Resolved once, when the app is built, so the reservation and the engine agree."""
    if device != "auto":
        return device
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else _local_gpu_count()
    return "cuda" if gpus >= 1 else "cpu"


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def placement_bundles(args: ServeAppArgs) -> list[dict[str, float]] | None:
    """Bundle 0: the replica (engine, step loop, HTTP/gRPC adapters); then one per worker rank, each
    with a GPU on CUDA. World size 1 runs the model inside the replica (which then reserves the GPU
    itself, see replica_actor_options): no group needed. Several instances: no group either; the router
    and its instances are actors outside the replica, and each instance reserves its own resources (a
    GPU for a one-rank instance on CUDA, else a placement group of its ranks)."""
    if args.world_size == 1 or args.num_instances > 1:
        return None
    worker = {"CPU": 1.0, "GPU": 1.0} if resolve_serve_device(args.device) == "cuda" else {"CPU": 1.0}
    if "GPU" in worker and args.accelerator_type:
        worker[accelerator_resource(args.accelerator_type)] = 0.001  # as Ray's own accelerator_type option
    return [{"CPU": 1.0}] + [dict(worker) for _ in range(args.world_size)]


def accelerator_resource(accelerator_type: str) -> str:
    """The custom resource Ray gives each node with that accelerator."""
    from ray._common.utils import RESOURCE_CONSTRAINT_PREFIX

    return f"{RESOURCE_CONSTRAINT_PREFIX}{accelerator_type}"


def replica_actor_options(args: ServeAppArgs) -> dict[str, Any]:
    """The replica actor's own resources: a GPU when it hosts the model itself (world size 1 on CUDA),
    then on `accelerator_type` when given."""
    gpu = args.world_size == 1 and args.num_instances == 1 and resolve_serve_device(args.device) == "cuda"
    if not gpu:
        return {"num_cpus": 1}
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1}
    if args.accelerator_type:
        options["accelerator_type"] = args.accelerator_type
    return options


class _ServeGrpcContext:
    """What the gRPC servicer needs from a grpc.aio context, over Serve's RayServegRPCContext."""

    class Aborted(Exception):
        pass

    def __init__(self, serve_context: Any, metadata: list[tuple[str, str]] | None = None) -> None:
        self._serve_context = serve_context
        self._metadata = metadata  # a call relayed by the multi-model ingress: the client's metadata
        self.responses: asyncio.Queue = asyncio.Queue()
        self._done = False
        self.status: GrpcStatus | None = None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        if self._metadata is not None:
            return list(self._metadata)
        return list(self._serve_context.invocation_metadata()) if self._serve_context is not None else []

    async def write(self, response: Any) -> None:
        self.responses.put_nowait(response)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self._done = True
        self.status = GrpcStatus(code, details)
        if self._serve_context is not None:
            self._serve_context.set_code(code)
            self._serve_context.set_details(details)
        raise self.Aborted(details)

    def done(self) -> bool:
        return self._done

    def time_remaining(self) -> float | None:
        return None


class DistInferReplica:
    """One model replica: AsyncLLM (or RouterEngine) + the OpenAI app (HTTP ingress) + InferenceService
    methods (gRPC). DistInferDeployment is the application's ingress; in a multi-model application the
    ingress relays to DistInferModel (Serve allows one ASGI ingress per application)."""

    async def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeAppArgs.model_validate(args)
        a = self.args
        self.api_key = resolve_api_key(a.api_key)  # or $DISTINFER_API_KEY / $DISTINFER_API_KEY_FILE
        self.engine = await asyncio.to_thread(make_engine, a.model, a.engine_args, **a.router_kwargs)
        self.metrics = EngineMetrics.attach(self.engine, a.model_name)
        # /metrics through the proxy reaches one replica: every replica also exports through Ray's metrics
        self._ray_metrics = RayMetricsBridge(self.metrics.registry).start()
        self._grpc = self._grpc_servicer()
        self._http_app: Any = None
        logger.info("replica ready: %s (tp=%d, pp=%d, sp=%d, %d instance(s))", a.model_name,
                    a.tensor_parallel_size, a.pipeline_parallel_size, a.sequence_parallel_size, a.num_instances)

    def __serve_build_asgi_app__(self) -> Any:
        if self._http_app is None:
            self._http_app = build_app(self.engine, self.args.model_name, self.api_key, self.metrics)
        return self._http_app

    def _grpc_servicer(self) -> Any:
        try:
            from distinfer.serving.grpc_servicer import EngineSlot, InferenceServicer
        except ImportError:  # the gRPC API is not part of this build
            return None
        return InferenceServicer(EngineSlot(self.engine), self.args.model_name)

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine died."""
        if self.engine.is_dead:
            raise RuntimeError(str(self.engine.dead_error))

    def __del__(self) -> None:
        bridge = getattr(self, "_ray_metrics", None)
        if bridge is not None:
            bridge.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ------------------------------------------------------------ gRPC (Serve's gRPC proxy)

    async def _check_access(self, context: _ServeGrpcContext) -> None:
        """Serve's gRPC proxy does no auth: check the bearer key here (raises after setting the code)."""
        if self._grpc is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the gRPC API is not part of this build")
        if self.api_key:
            problem = api_key_problem(authorization_value(context.invocation_metadata()), self.api_key)
            if problem is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def _unary(self, method: str, request: Any, grpc_context: Any) -> Any:
        """Errors: the servicer sets the status on the context and raises; Serve sends that status."""
        return await self._call(method, request, _ServeGrpcContext(grpc_context))

    async def _call(self, method: str, request: Any, context: _ServeGrpcContext) -> Any:
        await self._check_access(context)
        return await getattr(self._grpc, method)(request, context)

    # ------------------------------------------------------------ calls relayed by the multi-model ingress

    async def relay_http(self, call: HttpCall) -> AsyncIterator[dict[str, Any]]:
        """One HTTP request through this replica's OpenAI app: its ASGI messages, streamed (ray_serve_multi)."""
        async for message in run_asgi(self.__serve_build_asgi_app__(), call):
            yield message

    async def relay_grpc(self, method: str, request: Any, metadata: list[tuple[str, str]]) -> AsyncIterator[Any]:
        """One InferenceService (or health `Check`) call: its responses, then a GrpcStatus if it was refused."""
        context = _ServeGrpcContext(None, metadata)
        try:
            if method == "Generate":
                async for response in self._generate(request, context):
                    yield response
            elif method == "Check":
                yield await self.Check(request)
            else:
                yield await self._call(method, request, context)
        except _ServeGrpcContext.Aborted:
            yield context.status

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1.Health/Check through Serve's gRPC proxy (its servicer function is in grpc_options):
        SERVING while this replica's engine is alive and not draining. No API key, as in `distinfer serve`."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", INFERENCE_SERVICE_NAME):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        serving = not self.engine.is_dead and not getattr(self.engine, "is_draining", False)
        return health_pb2.HealthCheckResponse(status=SERVING if serving else NOT_SERVING)

    async def Generate(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
        async for response in self._generate(request, _ServeGrpcContext(grpc_context)):
            yield response

    async def _generate(self, request: Any, context: _ServeGrpcContext) -> AsyncIterator[Any]:
        await self._check_access(context)
        task = asyncio.ensure_future(self._grpc.Generate(request, context))
        try:
            while not task.done() or not context.responses.empty():
                getter = asyncio.ensure_future(context.responses.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            task.result()  # a refused request raises here, with its status set on the context
        finally:  # the client went away: cancelling the servicer aborts the engine request
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def Abort(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("Abort", request, grpc_context)

    async def GetModelInfo(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("GetModelInfo", request, grpc_context)

    async def GetServerInfo(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("GetServerInfo", request, grpc_context)

    async def Tokenize(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._unary("Tokenize", request, grpc_context)

    async def DrainInstance(self, request: Any, grpc_context: Any = None) -> Any:
        """Drains an instance of the replica that Serve's proxy picked (each replica has its own router
        and instances): with several replicas, GetServerInfo and DrainInstance may reach different ones."""
        return await self._unary("DrainInstance", request, grpc_context)


_DEPLOYMENT_DEFAULTS: dict[str, Any] = dict(
    name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256, health_check_period_s=10,
    health_check_timeout_s=30, graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=60)
DistInferDeployment = serve.deployment(**_DEPLOYMENT_DEFAULTS)(serve.ingress()(DistInferReplica))
DistInferModel = serve.deployment(**_DEPLOYMENT_DEFAULTS)(DistInferReplica)


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: distinfer.serving.ray_serve:app_builder`; `args` are ServeAppArgs, or a `models` list
    of them (several models behind one ingress, see distinfer/serving/ray_serve_multi.py)."""
    if args and "models" in args:
        from distinfer.serving.ray_serve_multi import multi_model_app

        return multi_model_app(args)
    return model_deployment(ServeAppArgs.model_validate(args or {}))


def model_deployment(parsed: ServeAppArgs, ingress: bool = True, **deployment_options: Any) -> Application:
    """The DistInfer deployment of one model, bound to its args (the device resolved here, once): the
    application's HTTP ingress, or (ingress=False) a deployment the multi-model ingress relays to."""
    parsed = parsed.model_copy(update={"device": resolve_serve_device(parsed.device)})
    options: dict[str, Any] = dict(deployment_options, ray_actor_options=replica_actor_options(parsed))
    bundles = placement_bundles(parsed)
    if bundles is not None:
        options["placement_group_bundles"] = bundles
        # TP ranks all-reduce every layer: keep a replica on one node. PP stages may span nodes.
        options["placement_group_strategy"] = "STRICT_PACK" if parsed.pipeline_parallel_size == 1 else "PACK"
    deployment = DistInferDeployment if ingress else DistInferModel
    return deployment.options(**options).bind(parsed.model_dump())
