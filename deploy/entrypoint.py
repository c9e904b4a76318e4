"""The container images' entry point (deploy/Dockerfile, deploy/Dockerfile.cuda).

    entrypoint.py [serve] [--dry-run] [-- EXTRA distinfer serve ARGS]   build `distinfer serve` from env, exec it
    entrypoint.py prepare-model     convert (.gguf) or check $DISTINFER_MODEL once into $DISTINFER_CACHE_DIR
    entrypoint.py healthcheck       GET /health on this container (the image's HEALTHCHECK)
    entrypoint.py smoke --protocol http|grpc --target ...   one authenticated request (`helm test`)

`serve` reads DISTINFER_* variables (see SERVE_ENV) so that `docker run -e ...` and Kubernetes env need
no command line. The API key is never put on the command line: `distinfer serve` reads
DISTINFER_API_KEY / DISTINFER_API_KEY_FILE itself; this script only checks that one is usable first.
Under Ray (KubeRay) the container's command is Ray's, and this script is used by the init container
(prepare-model) and the test pods (smoke) only.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import ssl
import sys
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger("distinfer.entrypoint")


@dataclass(frozen=True)
class EnvFlag:
    env: str
    flag: str
    default: str | None = None  # None: the flag is left out when the variable is unset


# distinfer serve options taken from the environment, in command-line order.
SERVE_ENV = (
    EnvFlag("DISTINFER_HOST", "--host", "0.0.0.0"),
    EnvFlag("DISTINFER_HTTP_PORT", "--http-port", "8000"),
    EnvFlag("DISTINFER_GRPC_PORT", "--grpc-port", "50051"),
    EnvFlag("DISTINFER_SERVED_MODEL_NAME", "--served-model-name"),
    EnvFlag("DISTINFER_DEVICE", "--device"),
    EnvFlag("DISTINFER_DTYPE", "--dtype"),
    EnvFlag("DISTINFER_TENSOR_PARALLEL_SIZE", "--tensor-parallel-size"),
    EnvFlag("DISTINFER_PIPELINE_PARALLEL_SIZE", "--pipeline-parallel-size"),
    EnvFlag("DISTINFER_SEQUENCE_PARALLEL_SIZE", "--sequence-parallel-size"),
    EnvFlag("DISTINFER_MAX_MODEL_LEN", "--max-model-len"),
    EnvFlag("DISTINFER_GPU_MEMORY_UTILIZATION", "--gpu-memory-utilization"),
    EnvFlag("DISTINFER_KV_OFFLOADING_SIZE", "--kv-offloading-size"),
    EnvFlag("DISTINFER_TLS_CERT_FILE", "--tls-cert"),
    EnvFlag("DISTINFER_TLS_KEY_FILE", "--tls-key"),
    # docker stop waits 10 s; Kubernetes 30 s by default: set 25 there.
    EnvFlag("DISTINFER_DRAIN_TIMEOUT", "--drain-timeout", "8"),
)


class EntrypointError(Exception):
    """A configuration problem, reported in one line with exit status 2."""


def check_api_key() -> None:
    """`distinfer serve --require-api-key` reads the key from the environment: fail here, in one line,
    when it is missing or unusable (same rules: distinfer.serving.auth.resolve_api_key)."""
    from distinfer.serving.auth import resolve_api_key

    try:
        key = resolve_api_key()
    except ValueError as exc:
        raise EntrypointError(str(exc)) from None
    if key is None:
        raise EntrypointError("no API key: set DISTINFER_API_KEY_FILE (a mounted secret) or DISTINFER_API_KEY")


def serve_command(env: dict[str, str], extra: list[str]) -> list[str]:
    """The `distinfer serve` argv for this environment (the API key stays in the environment)."""
    if bool(env.get("DISTINFER_TLS_CERT_FILE")) != bool(env.get("DISTINFER_TLS_KEY_FILE")):
        raise EntrypointError("DISTINFER_TLS_CERT_FILE and DISTINFER_TLS_KEY_FILE go together")
    argv = ["distinfer", "--log-level", env.get("DISTINFER_LOG_LEVEL", "INFO"), "serve"]
    if env.get("DISTINFER_MODEL"):
        argv.append(env["DISTINFER_MODEL"])
    for item in SERVE_ENV:
        value = env.get(item.env) or item.default
        if value is not None:
            argv.append(f"{item.flag}={value}")
    argv.append("--require-api-key")
    return argv + shlex.split(env.get("DISTINFER_EXTRA_ARGS", "")) + extra


def cmd_serve(args: argparse.Namespace) -> int:
    check_api_key()
    argv = serve_command(dict(os.environ), args.extra)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    logger.info("exec %s", shlex.join(argv))
    os.execvp(argv[0], argv)
    return 1  # not reached


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from distinfer.model.loader import resolve_model_path

    model = os.environ.get("DISTINFER_MODEL") or None
    try:
        path = resolve_model_path(model)
    except FileNotFoundError as exc:
        raise EntrypointError(str(exc)) from None
    logger.info("model %s ready at %s", model or "(default)", path)
    print(path)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    tls = bool(os.environ.get("DISTINFER_TLS_CERT_FILE"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{os.environ.get('DISTINFER_HTTP_PORT', '8000')}/health"
    context = None
    if tls:  # the certificate names the public host, not 127.0.0.1: this only checks the server answers
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        logger.error("%s: %s", url, exc)
        return 1


def cmd_smoke(args: argparse.Namespace) -> int:
    from smoke import grpc_request, http_request  # deploy/smoke.py, next to this file

    from distinfer.serving.auth import resolve_api_key

    check_api_key()
    key = resolve_api_key()
    if args.protocol == "http":
        text = http_request(args.target, key, args.prompt, args.max_tokens, args.timeout, args.ca_file)
    else:
        text = grpc_request(args.target, key, args.prompt, args.max_tokens, args.timeout, args.ca_file)
    print(f"{args.protocol} ok: {text!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entrypoint.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="exec `distinfer serve` configured from DISTINFER_* variables")
    serve.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    serve.add_argument("extra", nargs=argparse.REMAINDER, help="more distinfer serve arguments (after --)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("prepare-model", help="convert or check $DISTINFER_MODEL into the cache").set_defaults(
        func=cmd_prepare_model)
    health = sub.add_parser("healthcheck", help="exit 0 when GET /health answers 200")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=cmd_healthcheck)
    smoke = sub.add_parser("smoke", help="one authenticated HTTP completion or gRPC health + Generate")
    smoke.add_argument("--protocol", choices=["http", "grpc"], required=True)
    smoke.add_argument("--target", required=True, help="http(s)://HOST:PORT or HOST:PORT (gRPC)")
    smoke.add_argument("--prompt", default="The capital of France is")
    smoke.add_argument("--max-tokens", type=int, default=4)
    smoke.add_argument("--timeout", type=float, default=120.0)
    smoke.add_argument("--ca-file", default=None, help="PEM roots for a TLS server (else the system's)")
    smoke.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("serve", "prepare-model", "healthcheck", "smoke", "-h", "--help"):
        argv = ["serve", *argv]  # `docker run IMAGE --dry-run` / `docker run IMAGE -- --max-num-seqs 64`
    args = build_parser().parse_args(argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    try:
        return args.func(args)
    except EntrypointError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
