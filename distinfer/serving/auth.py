"""API-key checks shared by every front end (HTTP, gRPC, the Ray Serve app), so that all of them parse
`Authorization: Bearer <key>` the same way: the scheme is case-insensitive, any run of spaces or tabs
separates it from the key, and surrounding whitespace is ignored (RFC 7235). Keys compare in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

API_KEY_ENV = "DISTINFER_API_KEY"
API_KEY_FILE_ENV = "DISTINFER_API_KEY_FILE"


def bearer_token(value: str | bytes | None) -> str | None:
    """The token of a `Bearer <token>` header value; None when absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def api_key_problem(header_value: str | bytes | None, api_key: str) -> str | None:
    """None when the header carries `api_key`, else why the call is refused (never echoes the key)."""
    if header_value is None or (isinstance(header_value, (str, bytes)) and not header_value.strip()):
        return "missing API key: send `Authorization: Bearer <api key>`"
    token = bearer_token(header_value)
    if token is None:
        return "the authorization header must be `Bearer <api key>`"
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), api_key.encode()):
        return "invalid API key"
    return None


def caller_identity(header_value: str | bytes | None, peer: str) -> str:
    """Who sent a request, to scope operations on it (gRPC Abort): the bearer token when there is one
    (hashed: never kept in the clear), else the peer's address without its port."""
    token = bearer_token(header_value)
    if token is not None:
        return "key:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer  # "ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4"
    return "peer:" + host


def resolve_api_key(api_key: str | None = None, api_key_file: str | None = None) -> str | None:
    """The key from (in order) the argument, the file, $DISTINFER_API_KEY, or $DISTINFER_API_KEY_FILE.
    A file holds the key on its first line; an empty key is an error, not "no key"."""
    if api_key is not None:
        return _non_empty(api_key, "--api-key")
    if api_key_file is not None:
        return _read_key_file(api_key_file, "--api-key-file")
    if API_KEY_ENV in os.environ:  # set but empty is a mistake to report, not "serve without a key"
        return _non_empty(os.environ[API_KEY_ENV], API_KEY_ENV)
    if API_KEY_FILE_ENV in os.environ:
        return _read_key_file(os.environ[API_KEY_FILE_ENV], API_KEY_FILE_ENV)
    return None


def _read_key_file(path: str, source: str) -> str:
    if not path.strip():
        raise ValueError(f"{source} is empty: give the path of a file holding the API key")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    return _non_empty(text.splitlines()[0] if text.strip() else "", f"the API key file {path}")


def _non_empty(key: str, source: str) -> str:
    key = key.strip()
    if not key:
        raise ValueError(f"{source} is empty: give a non-empty API key")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError(f"{source} holds whitespace or unprintable characters: an API key must be one token")
    return key
