"""`make run`: start `distinfer serve` in the background, wait until it is healthy, stream one chat
completion over the OpenAI HTTP API (official `openai` client) and one over gRPC (distinfer.client),
then stop the server with SIGTERM (it drains, then exits).

    python deploy/demo.py [--prompt TEXT] [--http-port 8000] [--grpc-port 50051] [-- extra serve args]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"distinfer serve exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"distinfer serve was not healthy after {timeout_s:.0f} s")


def http_chat(url: str, model: str, prompt: str, max_tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("DISTINFER_API_KEY", "none"), max_retries=0)
    print(f"[HTTP POST {url}/v1/chat/completions, stream=True]\nuser> {prompt}\nassistant> ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n({chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens)")


def grpc_generate(target: str, prompt: str, max_tokens: int) -> None:
    try:
        from distinfer.client import Client
    except ImportError:
        print("[gRPC client SDK not installed: skipped]")
        return
    print(f"[gRPC {target} InferenceService.Generate]\nprompt> {prompt}\ncompletion> ", end="", flush=True)
    with Client(target, api_key=os.environ.get("DISTINFER_API_KEY"), timeout=120) as client:
        for delta in client.generate_stream(prompt, max_tokens=max_tokens, temperature=0):
            print(delta.text, end="", flush=True)
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Write a haiku about distributed inference.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("serve_args", nargs="*", help="passed to `distinfer serve` (after --)")
    args = parser.parse_args()
    url, target = f"http://127.0.0.1:{args.http_port}", f"127.0.0.1:{args.grpc_port}"
    command = [sys.executable, "-m", "distinfer.cli", "serve", "--http-port", str(args.http_port),
               "--grpc-port", str(args.grpc_port), *args.serve_args]
    print("$", " ".join(["distinfer", *command[3:]]), flush=True)
    server = subprocess.Popen(command)
    try:
        wait_healthy(url, server, args.startup_timeout)
        key = os.environ.get("DISTINFER_API_KEY")
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}).json()
        http_chat(url, models["data"][0]["id"], args.prompt, args.max_tokens)
        grpc_generate(target, "The three laws of robotics are", min(args.max_tokens, 32))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    print(f"[server stopped (exit code {code})]")
    return code


if __name__ == "__main__":
    sys.exit(main())
