"""An engine joins a cluster started with `ray start --head` through RAY_ADDRESS=auto.

The cluster runs in its own session and Ray temp directory (RAY_TMPDIR), so "auto" finds this
cluster and no other, and it is stopped by signalling the processes this test started (not with
`ray stop`, which would stop every Ray instance of the user on the machine). Everything stays on
127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops Ray from swapping the loopback node address
for the host's routable one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distinfer import LLM, SamplingParams

PROMPT = "The capital of France is"
MAX_TOKENS = 8

# Runs in a separate driver process: generate with tp=2, then report what the cluster holds.
CLIENT = r"""
import json, sys
import ray
from ray._private import state
from distinfer import LLM, SamplingParams

llm = LLM(sys.argv[1], tensor_parallel_size=2, num_kv_blocks=64)
out = llm.generate([sys.argv[2]], SamplingParams(temperature=0, max_tokens=int(sys.argv[3])), use_tqdm=False)
during = [a["State"] for a in state.actors().values() if a["ActorClassName"] == "RayWorker"]
llm.shutdown()
after = [a["State"] for a in state.actors().values() if a["ActorClassName"] == "RayWorker"]
groups = [g["state"] for g in ray.util.placement_group_table().values()]
print("RESULT " + json.dumps({
    "tokens": out[0].outputs[0].token_ids, "gcs": ray.get_runtime_context().gcs_address,
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "during": during, "after": after, "groups": groups,
}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
    return pids


@pytest.fixture
def ray_head():
    """`ray start --head --block` on 127.0.0.1 in a new session; yields the env that reaches it."""
    temp = tempfile.mkdtemp(prefix="di-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_TMPDIR=temp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--num-cpus", "4", "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address_file = Path(temp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 60
        while not address_file.is_file():
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "ray start --head did not come up in 60 s"
            time.sleep(0.2)
        yield env, address_file.read_text().strip()
    finally:
        head.send_signal(signal.SIGINT)  # --block shuts the node's processes down on SIGINT
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_processes(head.pid):  # only what this fixture started
            os.kill(pid, signal.SIGKILL)
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_engine_runs_on_a_started_cluster_with_address_auto(ray_head, tiny_model_dir):
    env, address = ray_head
    assert address.startswith("127.0.0.1:")
    run = subprocess.run([sys.executable, "-c", CLIENT, tiny_model_dir, PROMPT, str(MAX_TOKENS)],
                         env=dict(env, RAY_ADDRESS="auto"), capture_output=True, text=True, timeout=180)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["gcs"] == address and result["nodes"] == ["127.0.0.1"]
    assert result["during"] == ["ALIVE", "ALIVE"]
    assert result["after"] == ["DEAD", "DEAD"] and result["groups"] == ["REMOVED"]

    local = LLM(tiny_model_dir, num_kv_blocks=64)  # tp=1 in this process, no Ray
    try:
        expected = local.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    finally:
        local.shutdown()
    assert result["tokens"] == expected[0].outputs[0].token_ids
