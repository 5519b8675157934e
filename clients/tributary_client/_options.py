"""Connection settings: TLS, keepalive, channel options and the retry policy.

These are values rather than keyword sprawl on the clients so that one configuration can be
built once (from files, from a config system) and handed to both the sync and asyncio client.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

INT32_MAX = 2**31 - 1


# The longest timeout accepted, in seconds (about 31 years). grpc turns deadlines past its
# clock's range (about 290 years from boot) into ones already expired, so a longer timeout
# would fail at once with DEADLINE_EXCEEDED; None is how to say "no limit".
MAX_TIMEOUT = 1e9


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """`timeout` as float seconds, or None for no limit; anything else raises up front.

    Negative, zero, NaN, infinite and absurdly large values are refused: grpc would turn each
    into a call that fails at once (or, for NaN, an unlimited one), never what was meant.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, not {timeout!r}")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise ValueError(
            f"{name} must be > 0 and at most {MAX_TIMEOUT:g} seconds (None: no limit), "
            f"not {timeout!r}"
        )
    return seconds


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """PEM material for a TLS channel; all None means "TLS with the system's root CAs".

    `private_key` + `certificate_chain` present a client certificate (mutual TLS).
    `server_name_override` checks the server's certificate against that name instead of the
    host in the URL: for test CAs and for reaching a server by IP.
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name_override: str | None = None

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TLSConfig:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(
            read(root_certificates),
            read(private_key),
            read(certificate_chain),
            server_name_override,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """HTTP/2 keepalive pings; defaults match tritonclient's KeepAliveOptions.

    A server enforces a minimum ping interval (Triton/Tributary: 5 min without calls) and
    closes connections that ping more often, so lower `time_ms` only together with the server.
    """

    time_ms: int = INT32_MAX
    timeout_ms: int = 20_000
    permit_without_calls: bool = False
    max_pings_without_data: int = 2


def channel_options(
    *,
    max_message_bytes: int,
    keepalive: KeepAlive,
    tls: TLSConfig | None,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """grpc channel arguments; `extra` comes last so callers can override any of ours."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.max_pings_without_data),
    ]
    if tls is not None and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
    return options + list(extra)


HeaderValue = str | bytes
Headers = Mapping[str, HeaderValue]
Metadata = tuple[tuple[str, HeaderValue], ...]


# gRPC's metadata rules (doc/PROTOCOL-HTTP2.md in grpc/grpc): a name is 0-9 a-z _ - . (sent
# lower-case, so upper-case letters are accepted and lowered here) and "grpc-" names are the
# protocol's own; a text value is printable ASCII, space included. grpc itself only checks
# at call time and then fails the call with INTERNAL "Invalid metadata".
_HEADER_NAME = re.compile(r"[0-9A-Za-z_.\-]+")
_NOT_HEADER_TEXT = re.compile(r"[^\x20-\x7e]")


def normalize_metadata(headers: Headers | None) -> Metadata:
    """gRPC metadata from a headers mapping, checked here rather than deep inside a call.

    gRPC rejects upper-case keys at call time, so keys are lower-cased; other characters than
    letters, digits, "_", "-" and "." and names starting with "grpc-" raise ValueError. Binary
    values (bytes) are only allowed under keys ending in "-bin", text values only under other
    keys (TypeError otherwise): that is how gRPC tells them apart on the wire. Text values must
    be printable ASCII (space to "~"), or ValueError.
    """
    out: list[tuple[str, HeaderValue]] = []
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"header names must be non-empty str, not {key!r}")
        if not _HEADER_NAME.fullmatch(key):
            raise ValueError(
                f"header name {key!r} is not valid gRPC metadata: only letters, digits, "
                f"'_', '-' and '.' (sent lower-case)"
            )
        name = key.lower()
        if name.startswith("grpc-"):
            raise ValueError(f"header name {key!r}: names starting with 'grpc-' are reserved")
        if name.endswith("-bin"):
            if not isinstance(value, bytes):
                raise TypeError(f"header {name!r} ends in -bin, so its value must be bytes")
        elif not isinstance(value, str):
            raise TypeError(f"header {name!r} needs a str value (bytes only under '-bin' names)")
        elif bad := _NOT_HEADER_TEXT.search(value):
            # the value itself stays out of the message: headers carry tokens
            raise ValueError(
                f"header {name!r}: its value has {bad.group()!r} at index {bad.start()}; text "
                f"values must be printable ASCII (no control characters such as newlines or "
                f"tabs, no non-ASCII): send other data as bytes under a name ending in '-bin'"
            )
        out.append((name, value))
    return tuple(out)


def merge_metadata(defaults: Metadata, headers: Headers | None) -> Metadata:
    """A call's metadata: the client's default headers, with the call's own replacing any of
    the same name (case-insensitively)."""
    if not headers:
        return defaults
    extra = normalize_metadata(headers)
    override = {name for name, _ in extra}
    return tuple(item for item in defaults if item[0] not in override) + extra


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Client-side retries with exponential backoff.

    Health and metadata calls are idempotent and retried on any code in `retry_on`. `infer` is
    retried only on UNAVAILABLE, the code for "not executed" (connection refused, server not
    ready, queue full); anything else may mean the model ran, or will fail the same way again.

    Backoff is deterministic unless `jitter` (a fraction, 0..1, of each delay randomly taken
    off) is set. `sleep` replaces time.sleep / asyncio.sleep (a coroutine function is awaited
    by the asyncio client), which lets tests observe retries without waiting.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    retry_on: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    jitter: float = 0.0
    sleep: Callable[[float], Any] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter is a fraction between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        if self.jitter:
            delay *= 1.0 - self.jitter * random.random()
        return delay

    def delay_before_retry(
        self,
        attempt: int,
        code: grpc.StatusCode | None,
        *,
        infer: bool,
        time_left: float | None,
    ) -> float | None:
        """Delay before attempt `attempt + 1`, or None to give up and raise."""
        if attempt >= self.max_attempts or code not in self.retry_on:
            return None
        if infer and code != grpc.StatusCode.UNAVAILABLE:
            return None
        delay = self.backoff(attempt)
        if time_left is not None and delay >= time_left:
            return None  # the retry could not finish within the caller's deadline anyway
        return delay


# Module-level defaults: both are frozen, so sharing one instance between clients is safe.
DEFAULT_RETRY = RetryPolicy()
DEFAULT_KEEPALIVE = KeepAlive()


def deprecated_alias(new: str, old: str, new_value: Any, old_value: Any) -> Any:
    """Accept `old` (warning) where `new` is the keyword now; passing both is an error."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"pass {new}= only ({old}= is its deprecated old name)")
    warnings.warn(
        f"{old}= is deprecated, use {new}= (same meaning)", DeprecationWarning, stacklevel=3
    )
    return old_value
