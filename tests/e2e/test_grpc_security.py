"""Bearer-token auth, TLS and server reflection (grpcurl) on real servers over loopback."""
from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from distinfer import AsyncLLM
from distinfer.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    RetryPolicy,
    UnavailableError,
)
from distinfer.serving.grpc_server import GrpcServerThread

API_KEY = "s3cret-key"
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLM(dtype="float32", max_model_len=512, num_kv_blocks=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def auth_server(engine):
    with GrpcServerThread(engine, model_name="smollm2", api_key=API_KEY) as server:
        yield server


def test_auth_with_right_key(auth_server):
    with Client(auth_server.target, api_key=API_KEY, timeout=60) as client:
        assert len(client.generate("Hi", max_tokens=3, temperature=0).token_ids) == 3
        assert client.model_info().model_name == "smollm2"


@pytest.mark.parametrize("key,message", [(None, "missing API key"), ("wrong", "invalid API key")])
def test_auth_refuses_missing_or_wrong_key(auth_server, key, message):
    with Client(auth_server.target, api_key=key, timeout=60, retry=NO_RETRY) as client:
        with pytest.raises(AuthenticationError, match=message) as info:
            client.generate("Hi", max_tokens=3)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        for call in (client.model_info, client.server_info, lambda: client.abort("x"), lambda: client.tokenize("x"),
                     lambda: client.drain_instance("instance-0")):  # UNAUTHENTICATED before any other answer
            with pytest.raises(AuthenticationError):
                call()
        assert client.health() == "SERVING", "health stays open to probes"


async def test_auth_async_client(auth_server):
    async with AsyncClient(auth_server.target, api_key=API_KEY, timeout=60) as client:
        assert len((await client.generate("Hi", max_tokens=2)).token_ids) == 2
    async with AsyncClient(auth_server.target, api_key="nope", retry=NO_RETRY) as client:
        with pytest.raises(AuthenticationError):
            await client.generate("Hi", max_tokens=2)


def test_drain_instance_on_a_single_engine_is_failed_precondition(auth_server):
    """DrainInstance needs instances behind a router; bad input is still named first (INVALID_ARGUMENT)."""
    with Client(auth_server.target, api_key=API_KEY, timeout=60, retry=NO_RETRY) as client:
        assert client.server_info().instances == []
        with pytest.raises(FailedPreconditionError, match="single engine") as info:
            client.drain_instance("instance-0", timeout_s=0)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(InvalidArgumentError, match="timeout_s"):
            client.drain_instance("instance-0", timeout_s=float("nan"))
        with pytest.raises(InvalidArgumentError, match="instance_id"):
            client.drain_instance("")
        assert len(client.generate("Hi", max_tokens=2, temperature=0).token_ids) == 2  # still serving


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "server.crt", tmp / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls_round_trip(engine, tmp_path):
    cert_file, key_file = _self_signed(tmp_path)
    with GrpcServerThread(engine, model_name="smollm2", api_key=API_KEY, tls_cert_file=str(cert_file),
                          tls_key_file=str(key_file)) as server:
        assert server.handle.tls
        with Client(server.target, api_key=API_KEY, root_certificates=str(cert_file), timeout=60) as client:
            result = client.generate("The capital of France is", max_tokens=4, temperature=0)
            assert len(result.token_ids) == 4 and result.usage.prompt_tokens > 0
        with Client(f"localhost:{server.port}", api_key=API_KEY, root_certificates=cert_file.read_bytes()) as client:
            assert client.health() == "SERVING"
        with Client(server.target, api_key=API_KEY, timeout=10, retry=NO_RETRY) as plaintext:
            with pytest.raises(UnavailableError):
                plaintext.model_info()


def test_tls_needs_cert_and_key_together(engine, tmp_path):
    cert_file, _ = _self_signed(tmp_path)
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        GrpcServerThread(engine, model_name="m", tls_cert_file=str(cert_file)).start()


def _grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    try:
        subprocess.run([path, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"grpcurl cannot run here: {exc}")
    return path


def test_reflection_lists_the_service_with_grpcurl(engine):
    grpcurl = _grpcurl()
    with GrpcServerThread(engine, model_name="smollm2") as server:
        listed = subprocess.run([grpcurl, "-plaintext", server.target, "list"], capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0, listed.stderr
        services = listed.stdout.split()
        assert "distinfer.v1.InferenceService" in services and "grpc.health.v1.Health" in services
        methods = subprocess.run([grpcurl, "-plaintext", server.target, "list", "distinfer.v1.InferenceService"],
                                 capture_output=True, text=True, timeout=60)
        assert "distinfer.v1.InferenceService.Generate" in methods.stdout.split()
        called = subprocess.run([grpcurl, "-plaintext", "-d", '{"text": "Hello world"}', server.target,
                                 "distinfer.v1.InferenceService/Tokenize"], capture_output=True, text=True, timeout=60)
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["token_ids"] == engine.tokenizer.encode("Hello world")


def test_reflection_needs_the_key_when_one_is_set(auth_server):
    grpcurl = _grpcurl()
    refused = subprocess.run([grpcurl, "-plaintext", auth_server.target, "list"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    listed = subprocess.run([grpcurl, "-plaintext", "-H", f"authorization: Bearer {API_KEY}", auth_server.target,
                             "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "distinfer.v1.InferenceService" in listed.stdout.split()
