"""`distinfer serve` as a subprocess on loopback: the `make run` demo end to end (HTTP + gRPC + SIGTERM
drain), and TLS + API key on both APIs. Bounded: every wait has a deadline."""
from __future__ import annotations

import datetime
import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from distinfer.serving.server import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 240


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "server.crt", tmp / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_make_run_demo(tmp_path):
    """deploy/demo.py (what `make run` runs): serve, one HTTP chat, one gRPC generation, SIGTERM, exit 0."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, str(ROOT / "deploy" / "demo.py"), "--http-port", str(http_port), "--grpc-port",
               str(grpc_port), "--max-tokens", "12", "--", "--max-model-len", "2048"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_S + 120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "distinfer: serving SmolLM2-135M-Instruct" in out
    assert "assistant> " in out and "completion tokens)" in out
    assert "completion> " in out
    assert "[server stopped (exit code 0)]" in out
    reply = out.split("assistant> ", 1)[1].split("\n(", 1)[0]
    assert reply.strip(), "the chat completion has text"


def test_tls_and_api_key_on_both_apis(tmp_path):
    pytest.importorskip("cryptography")
    from distinfer.client import AuthenticationError, Client, RetryPolicy

    cert, key = _self_signed(tmp_path)
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "distinfer.cli", "serve", "--http-port", str(http_port), "--grpc-port",
               str(grpc_port), "--api-key", "k3y", "--tls-cert", str(cert), "--tls-key", str(key),
               "--max-model-len", "2048", "--served-model-name", "tiny"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"https://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/health", verify=str(cert), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.25)
        http = httpx.Client(verify=str(cert))
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", http_client=http, max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.usage.completion_tokens == 4 or reply.choices[0].finish_reason == "stop"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", http_client=http, max_retries=0).models.list()
        target = f"127.0.0.1:{grpc_port}"
        with Client(target, api_key="k3y", root_certificates=str(cert), timeout=60) as grpc_client:
            assert len(grpc_client.generate("Hi", max_tokens=3, ignore_eos=True).token_ids) == 3
        with Client(target, api_key="nope", root_certificates=str(cert), retry=RetryPolicy(max_attempts=1)) as bad:
            with pytest.raises(AuthenticationError):
                bad.generate("Hi", max_tokens=2)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, server.stdout.read()
