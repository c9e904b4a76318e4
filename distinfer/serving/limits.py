"""The bounds the serving edge enforces, each a setting with a safe default (`distinfer serve --help`
lists the flags). Everything a client can send is bounded before it costs memory or engine time."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

_GRPC_INT_MAX = 2**31 - 1
_GRPC_INT_ARGS = ("grpc_max_message_bytes", "grpc_max_concurrent_streams", "grpc_keepalive_time_s",
                  "grpc_keepalive_timeout_s", "grpc_max_connection_age_s", "grpc_max_connection_age_grace_s")


@dataclass(frozen=True)
class ServerLimits:
    # HTTP: bodies over this get 413 (checked before parsing, after the API key); request line plus
    # headers over max_header_bytes get 431; beyond max_http_connections connections uvicorn answers 503.
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    max_http_connections: int = 4096
    # Characters of one prompt (all chat messages together; a Tokenize text). None: the longest text the
    # context could hold, max_model_len x the longest token of the vocabulary, so no valid prompt is refused.
    max_prompt_chars: int | None = None
    # gRPC: message size; concurrent RPCs on the server (RESOURCE_EXHAUSTED above) and streams per
    # connection; keepalive pings find half-open clients (their calls are cancelled and their KV freed);
    # connections are closed after an age (plus a grace for the calls in flight) to rebalance clients.
    grpc_max_message_bytes: int = 8 << 20
    grpc_max_concurrent_rpcs: int = 4096
    grpc_max_concurrent_streams: int = 1024
    grpc_keepalive_time_s: float = 30.0
    grpc_keepalive_timeout_s: float = 10.0
    grpc_max_connection_age_s: float = 1800.0
    grpc_max_connection_age_grace_s: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value!r}")
        # grpc channel arguments are C ints (times in whole milliseconds): larger values (or inf) would make
        # the gRPC server fail to start with an OverflowError, and under 1 ms would round to 0.
        for name in _GRPC_INT_ARGS:
            value = getattr(self, name)
            if name.endswith("_s") and not 1 <= value * 1000 <= _GRPC_INT_MAX:
                raise ValueError(f"{name} must be in [0.001, {_GRPC_INT_MAX / 1000}] seconds, got {value!r}")
            if not name.endswith("_s") and not value <= _GRPC_INT_MAX:
                raise ValueError(f"{name} must be <= {_GRPC_INT_MAX}, got {value!r}")

    def grpc_server_options(self) -> list[tuple[str, Any]]:
        """grpc core channel arguments for the server."""
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        return [
            ("grpc.max_receive_message_length", self.grpc_max_message_bytes),
            ("grpc.max_send_message_length", self.grpc_max_message_bytes),
            ("grpc.max_concurrent_streams", self.grpc_max_concurrent_streams),
            ("grpc.keepalive_time_ms", ms(self.grpc_keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.grpc_keepalive_timeout_s)),
            # grpc core waits for a ping's ack for ping_timeout_ms (default 1 minute), and a missing keepalive
            # ack closes the connection only then: without this a half-open client holds its KV ~60 s longer.
            ("grpc.http2.ping_timeout_ms", ms(self.grpc_keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may ping as often as the server does; more often earns a GOAWAY (too_many_pings).
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.grpc_keepalive_time_s)),
            ("grpc.max_connection_age_ms", ms(self.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.grpc_max_connection_age_grace_s)),
        ]


def max_prompt_chars(limits: ServerLimits, tokenizer: Any, max_model_len: int) -> int:
    """The configured bound, or the longest text that could fit the context: a token's string in the
    vocabulary is at least as long as the text it decodes to (byte-level and SentencePiece alike)."""
    if limits.max_prompt_chars is not None:
        return limits.max_prompt_chars
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1)
