"""serving/auth.py and serving/limits.py (issue 8): one bearer parser for every front end, API-key checks
that never echo the key, caller identities that never hold the token, keys from argument / file / env with
clear errors, and ServerLimits that refuse values the server cannot apply and hand grpc its options."""
from __future__ import annotations

import math
from concurrent import futures
from dataclasses import fields

import grpc
import pytest

from distinfer.serving.auth import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    api_key_problem,
    bearer_token,
    caller_identity,
    resolve_api_key,
)
from distinfer.serving.limits import ServerLimits, max_prompt_chars

pytestmark = pytest.mark.timeout(60)

KEY = "s3cr3t-Key_123"
GRPC_INT_MAX = 2**31 - 1  # grpc channel arguments are C ints

# ------------------------------------------------------------------ bearer_token

BEARER_CASES = [
    ("Bearer abc", "abc"),
    ("bearer abc", "abc"),
    ("BEARER abc", "abc"),
    ("bEaReR abc", "abc"),
    ("Bearer\tabc", "abc"),
    ("Bearer    abc", "abc"),
    ("Bearer \t \tabc", "abc"),
    ("  Bearer abc  ", "abc"),
    ("\tBearer abc\r\n", "abc"),
    (b"Bearer abc", "abc"),
    (b"  bearer\tabc ", "abc"),
    (b"Bearer caf\xe9", "caf\xe9"),  # HTTP header bytes are latin-1
    ("Bearer", None),
    ("Bearer ", None),
    ("bearer \t ", None),
    ("Basic abc", None),
    ("Basic", None),
    ("Bearerabc", None),
    ("Token abc", None),
    ("abc", None),
    ("", None),
    ("   ", None),
    (b"", None),
    (None, None),
]


@pytest.mark.parametrize("value,token", BEARER_CASES, ids=[repr(v) for v, _ in BEARER_CASES])
def test_bearer_token_parses_like_rfc_7235(value: str | bytes | None, token: str | None) -> None:
    """Case-insensitive scheme, any run of spaces/tabs, surrounding whitespace ignored, bytes accepted."""
    assert bearer_token(value) == token


# ------------------------------------------------------------------ api_key_problem

MISSING = [None, "", "   ", b"", b" \t"]
MALFORMED = [KEY, "Basic " + KEY, "Bearer", "Token " + KEY, "Bearer" + KEY, b"Basic " + KEY.encode()]
WRONG = ["Bearer nope", "Bearer " + KEY + "x", "Bearer " + KEY[:-1], "Bearer " + KEY.upper(), "Bearer " + KEY + " extra",
         "Bearer x" + KEY, b"Bearer " + KEY.encode() + b"\xe9"]
RIGHT = ["Bearer " + KEY, "bearer\t" + KEY, "  BEARER   " + KEY + "  ", b"Bearer " + KEY.encode()]


@pytest.mark.parametrize("header,kind", [(h, "missing") for h in MISSING] + [(h, "malformed") for h in MALFORMED]
                         + [(h, "wrong") for h in WRONG] + [(h, "right") for h in RIGHT])
def test_api_key_problem(header: str | bytes | None, kind: str) -> None:
    """Missing, malformed and wrong keys are refused with distinct messages that never contain the key
    (nor a prefix of it); the right key in any accepted spelling passes."""
    problem = api_key_problem(header, KEY)
    if kind == "right":
        assert problem is None
        return
    assert problem is not None
    expected = {"missing": "missing API key", "malformed": "must be `Bearer <api key>`", "wrong": "invalid API key"}
    assert expected[kind] in problem
    assert KEY[:6] not in problem and KEY[-6:] not in problem


# ------------------------------------------------------------------ caller_identity


def test_caller_identity_from_token_is_stable_distinct_and_hashed() -> None:
    """The same token is the same caller (whatever its spelling or peer); different tokens differ; the
    token itself is never part of the id."""
    a1 = caller_identity("Bearer " + KEY, "ipv4:10.0.0.1:1000")
    a2 = caller_identity(b"bearer\t" + KEY.encode(), "ipv6:[::1]:2000")
    b = caller_identity("Bearer " + KEY + "2", "ipv4:10.0.0.1:1000")
    assert a1 == a2 != b
    for ident in (a1, b):
        assert KEY not in ident and KEY[:6] not in ident and KEY[-6:] not in ident
    assert caller_identity("Bearer " + KEY, "x") != caller_identity(None, "ipv4:10.0.0.1:1000")


@pytest.mark.parametrize("peer_a,peer_b,same", [
    ("ipv4:127.0.0.1:5555", "ipv4:127.0.0.1:6666", True),
    ("ipv4:127.0.0.1:5555", "ipv4:127.0.0.2:5555", False),
    ("ipv6:[::1]:5555", "ipv6:[::1]:6666", True),
    ("ipv6:[::1]:5555", "ipv6:[::2]:5555", False),
    ("ipv6:%5B::1%5D:5555", "ipv6:%5B::1%5D:6666", True),  # grpc may percent-encode the brackets
    ("ipv6:[::1]:5555", "ipv4:127.0.0.1:5555", False),
])
def test_caller_identity_without_token_is_the_peer_host(peer_a: str, peer_b: str, same: bool) -> None:
    """Without a bearer token the caller is the peer address without its port (a client reconnecting from
    another port is the same caller); a malformed header counts as no token."""
    id_a, id_b = caller_identity(None, peer_a), caller_identity("Basic x", peer_b)
    assert (id_a == id_b) is same
    assert not id_a.endswith(":5555") and not id_b.endswith(("5555", "6666"))


def test_caller_identity_ipv6_keeps_the_whole_address() -> None:
    assert caller_identity(None, "ipv6:[::1]:5555") == caller_identity(None, "ipv6:[::1]:1")
    assert "[::1]" in caller_identity(None, "ipv6:[::1]:5555")
    assert caller_identity(None, "unix:/tmp/sock") == caller_identity(None, "unix:/tmp/sock")


# ------------------------------------------------------------------ resolve_api_key


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(API_KEY_FILE_ENV, raising=False)


def _key_file(tmp_path, text: str, name: str = "key") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_no_key_anywhere_is_none() -> None:
    assert resolve_api_key() is None and resolve_api_key(None, None) is None


def test_explicit_key_wins_over_file_and_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    monkeypatch.setenv(API_KEY_FILE_ENV, _key_file(tmp_path, "from-env-file\n", "env"))
    assert resolve_api_key("explicit", _key_file(tmp_path, "from-file\n")) == "explicit"


@pytest.mark.parametrize("text", ["from-file\n", "from-file", "from-file\r\n", "from-file\nsecond line\n", "  from-file \n"])
def test_key_file_first_line(tmp_path, monkeypatch, text: str) -> None:
    """The file's first line, newline and surrounding blanks stripped; the file wins over the env vars."""
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None, _key_file(tmp_path, text)) == "from-file"


def test_env_key_then_env_key_file(tmp_path, monkeypatch) -> None:
    """$DISTINFER_API_KEY wins over $DISTINFER_API_KEY_FILE, which is read when it is the only source."""
    monkeypatch.setenv(API_KEY_FILE_ENV, _key_file(tmp_path, "from-env-file\n"))
    assert resolve_api_key() == "from-env-file"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key() == "from-env"


@pytest.mark.parametrize("key,needle", [("", "is empty"), ("   ", "is empty"), ("two words", "whitespace"),
                                        ("tab\there", "whitespace"), ("bell\x07", "unprintable")])
def test_bad_explicit_key_is_refused(key: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        resolve_api_key(key)
    assert "--api-key" in str(info.value)


@pytest.mark.parametrize("text,needle", [("", "is empty"), ("\n\n", "is empty"), ("  \n", "is empty"),
                                         ("two words\n", "whitespace")])
def test_bad_key_file_is_refused(tmp_path, text: str, needle: str) -> None:
    path = _key_file(tmp_path, text)
    with pytest.raises(ValueError, match=needle) as info:
        resolve_api_key(None, path)
    assert path in str(info.value)


def test_missing_key_file_is_refused(tmp_path, monkeypatch) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(ValueError, match="cannot read the API key file") as info:
        resolve_api_key(None, missing)
    assert missing in str(info.value)
    monkeypatch.setenv(API_KEY_FILE_ENV, missing)
    with pytest.raises(ValueError, match="cannot read the API key file"):
        resolve_api_key()


@pytest.mark.parametrize("value", ["", "   ", "two words"])
def test_bad_env_key_is_refused_not_ignored(monkeypatch, value: str) -> None:
    """A set but empty (or blank) $DISTINFER_API_KEY is a misconfiguration: refusing it keeps the server
    from silently starting without a key (an empty key is an error, not "no key")."""
    monkeypatch.setenv(API_KEY_ENV, value)
    with pytest.raises(ValueError, match=API_KEY_ENV):
        resolve_api_key()


def test_empty_key_file_path_is_refused_not_ignored(monkeypatch) -> None:
    """An empty path (`--api-key-file "$UNSET"`, or the env var set to "") is refused, naming its source."""
    with pytest.raises(ValueError, match="^--api-key-file is empty"):
        resolve_api_key(None, "")
    monkeypatch.setenv(API_KEY_FILE_ENV, " ")
    with pytest.raises(ValueError, match=f"^{API_KEY_FILE_ENV} is empty"):
        resolve_api_key()


# ------------------------------------------------------------------ ServerLimits

LIMIT_FIELDS = [f.name for f in fields(ServerLimits)]


@pytest.mark.parametrize("name", LIMIT_FIELDS)
@pytest.mark.parametrize("value", [0, -1, math.nan], ids=["zero", "negative", "nan"])
def test_non_positive_limits_are_refused_naming_the_field(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        ServerLimits(**{name: value})


GRPC_OPTIONS = {  # grpc core channel-argument names (include/grpc/impl/channel_arg_names.h)
    "grpc.max_receive_message_length": 1234567,
    "grpc.max_send_message_length": 1234567,
    "grpc.max_concurrent_streams": 77,
    "grpc.keepalive_time_ms": 12500,
    "grpc.keepalive_timeout_ms": 3250,
    "grpc.http2.ping_timeout_ms": 3250,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.min_ping_interval_without_data_ms": 12500,
    "grpc.max_connection_age_ms": 600000,
    "grpc.max_connection_age_grace_ms": 45500,
}


def test_grpc_server_options_carry_the_configured_values() -> None:
    """Sizes in bytes, times in whole milliseconds, under the names grpc core reads."""
    limits = ServerLimits(grpc_max_message_bytes=1234567, grpc_max_concurrent_streams=77, grpc_keepalive_time_s=12.5,
                          grpc_keepalive_timeout_s=3.25, grpc_max_connection_age_s=600, grpc_max_connection_age_grace_s=45.5)
    options = limits.grpc_server_options()
    assert len(options) == len(dict(options)) and dict(options) == GRPC_OPTIONS
    assert all(type(value) is int for _, value in options)  # grpc refuses floats for integer arguments


def _grpc_server_starts(limits: ServerLimits) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=limits.grpc_server_options(),
                         maximum_concurrent_rpcs=limits.grpc_max_concurrent_rpcs)
    try:
        assert server.add_insecure_port("127.0.0.1:0") > 0
        server.start()
    finally:
        server.stop(None)


def test_default_and_largest_limits_are_accepted_by_grpc() -> None:
    """A real grpc server starts with the defaults and with every gRPC limit at its largest accepted value."""
    _grpc_server_starts(ServerLimits())
    largest = ServerLimits(grpc_max_message_bytes=GRPC_INT_MAX, grpc_max_concurrent_streams=GRPC_INT_MAX,
                           grpc_keepalive_time_s=GRPC_INT_MAX / 1000, grpc_keepalive_timeout_s=GRPC_INT_MAX / 1000,
                           grpc_max_connection_age_s=GRPC_INT_MAX / 1000, grpc_max_connection_age_grace_s=GRPC_INT_MAX / 1000)
    _grpc_server_starts(largest)


@pytest.mark.parametrize("name,value", [
    ("grpc_max_message_bytes", 2**31), ("grpc_max_concurrent_streams", 2**31),
    ("grpc_keepalive_time_s", 2.2e6), ("grpc_keepalive_timeout_s", math.inf), ("grpc_max_connection_age_s", 1e7),
    ("grpc_max_connection_age_grace_s", 3e6), ("grpc_keepalive_time_s", 1e-4),
])
def test_grpc_limits_grpc_cannot_hold_are_refused_naming_the_field(name: str, value: float) -> None:
    """grpc channel arguments are C ints of bytes or milliseconds: a value outside them (or under 1 ms)
    is refused when the limits are built, not by an OverflowError when the gRPC server starts."""
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        ServerLimits(**{name: value})


class _Vocab:
    """Stands in for a tokenizer: max_prompt_chars only reads get_vocab()."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def test_max_prompt_chars_configured_or_context_times_longest_token() -> None:
    vocab = _Vocab(["a", "hello", "Ġworld!!", "<|im_end|>", "xy"])
    assert max_prompt_chars(ServerLimits(max_prompt_chars=1000), vocab, 2048) == 1000
    assert max_prompt_chars(ServerLimits(), vocab, 2048) == 2048 * len("<|im_end|>")
    assert max_prompt_chars(ServerLimits(), _Vocab(["a", "b"]), 7) == 7
    assert max_prompt_chars(ServerLimits(), _Vocab([]), 7) == 7  # an empty vocabulary still bounds something


def test_max_prompt_chars_with_the_real_tokenizer(tokenizer) -> None:
    """Every text that fits the context is within the default bound: no token decodes to more characters
    than its vocabulary entry has."""
    bound = max_prompt_chars(ServerLimits(), tokenizer, 16)
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert bound == 16 * longest
    sample = list(range(0, len(tokenizer), 97))
    assert all(len(tokenizer.decode([i])) <= longest for i in sample)
