"""--grpc-restricted-protocol: RPC categories that answer only clients sending a header.

`--grpc-restricted-protocol=<categories>:<key>=<value>` (repeatable) makes every RPC of the
named categories require the gRPC metadata entry `triton-grpc-protocol-<key>: <value>`;
without it (or with another value) the call fails UNAVAILABLE `This protocol is restricted,
expecting header 'triton-grpc-protocol-<key>'`, Triton's text. The check runs in
`tributary.rpcs`, before the request is parsed, and only on methods whose category is
restricted: an unrestricted method's handler is the plain one
(docs/protocol.md#restricted-protocols). Reflection is not a Triton category and stays unrestricted.
"""

from __future__ import annotations

import argparse
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HEADER_PREFIX = "triton-grpc-protocol-"

CATEGORIES = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

# Every method we serve, by its category (grpc.health.v1's Check and Watch count as health).
METHOD_CATEGORY: Mapping[str, str] = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "Check": "health",
    "Watch": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "ModelConfig": "model-config",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "ModelStatistics": "statistics",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}

# gRPC metadata keys are lower case; "-bin" keys carry binary values, which no flag can spell.
_KEY = re.compile(r"[a-z0-9_.-]+")
_MAX_KEY = 128
_MAX_VALUE = 1024


@dataclass(frozen=True)
class Restriction:
    """One group of the flag: categories and the header they require."""

    categories: tuple[str, ...]
    header: str  # the full metadata key, `triton-grpc-protocol-<key>`
    value: str

    @property
    def message(self) -> str:
        return f"This protocol is restricted, expecting header '{self.header}'"

    def allows(self, context: Any) -> bool:
        """True when the call's metadata carries the header exactly once, with the value.

        Triton looks up one entry; a header sent twice is refused rather than passing when
        any copy matches. The value is compared in constant time."""
        header = self.header
        return self.allows_values(
            [got for key, got in context.invocation_metadata() or () if key == header]
        )

    def allows_values(self, values: Sequence[object]) -> bool:
        """True when the header's values (every copy sent) are exactly one, the right one."""
        if len(values) != 1 or not isinstance(values[0], str):
            return False
        return hmac.compare_digest(values[0].encode(), self.value.encode())

    @property
    def http_message(self) -> str:
        return f"This API is restricted, expecting header '{self.header}'"


def parse_restriction(text: str, *, http: bool = False) -> Restriction:
    """One flag value; each problem is one line (argparse turns it into exit 2).

    gRPC (--grpc-restricted-protocol) requires metadata `triton-grpc-protocol-<key>`; HTTP
    (--http-restricted-api) requires the header `<key>` itself, as tritonserver does."""
    form = "expected <categories>:<key>=<value>"
    categories_text, colon, setting = text.partition(":")
    key, equals, value = setting.partition("=")
    if not colon or not equals:
        raise argparse.ArgumentTypeError(f"{form}, got '{text}'")
    categories = tuple(c.strip() for c in categories_text.split(","))
    if not categories_text.strip() or any(not c for c in categories):
        raise argparse.ArgumentTypeError(
            f"{form} with categories separated by commas, got '{text}'"
        )
    for category in categories:
        if category not in CATEGORIES:
            raise argparse.ArgumentTypeError(
                f"unknown restricted protocol '{category}'; expected one of {', '.join(CATEGORIES)}"
            )
    if len(set(categories)) != len(categories):
        raise argparse.ArgumentTypeError(f"a category is named twice in '{text}'")
    if http:
        key = key.lower()  # HTTP header names are case-insensitive
    if (
        not key
        or len(key) > _MAX_KEY
        or not _KEY.fullmatch(key)
        or (key.endswith("-bin") and not http)
    ):
        raise argparse.ArgumentTypeError(
            f"header key '{key}' must be 1-{_MAX_KEY} lower-case letters, digits, '-', '_' or "
            + ("'.'" if http else "'.', not ending in '-bin' (gRPC metadata keys)")
        )
    if (
        not value
        or len(value) > _MAX_VALUE
        or not all(" " <= c <= "~" for c in value)
        or value != value.strip()
    ):
        raise argparse.ArgumentTypeError(
            f"header value for key '{key}' must be 1-{_MAX_VALUE} printable ASCII characters "
            "without leading or trailing spaces"
        )
    return Restriction(categories, key if http else HEADER_PREFIX + key, value)


def parse_http_restriction(text: str) -> Restriction:
    """--http-restricted-api: the same form, the header named by the key itself."""
    return parse_restriction(text, http=True)


def by_category(restrictions: Iterable[Restriction]) -> dict[str, Restriction]:
    """{category: restriction}; a category may be in one group only (Triton's rule)."""
    out: dict[str, Restriction] = {}
    for restriction in restrictions:
        for category in restriction.categories:
            if category in out:
                raise ValueError(
                    f"restricted protocol '{category}' can not be specified in multiple config "
                    "groups"
                )
            out[category] = restriction
    return out


def for_method(restrictions: Mapping[str, Restriction], method: str) -> Restriction | None:
    """The restriction a method is under, if any. A method without a category is a bug here:
    it would silently escape every restriction, so it fails start-up instead."""
    if not restrictions:
        return None
    return restrictions.get(METHOD_CATEGORY[method])
