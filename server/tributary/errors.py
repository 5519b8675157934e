"""One error family, raised deep and mapped to a gRPC status in exactly one place.

Each class carries its `grpc.StatusCode`; the servicer turns any `InferenceError` into
`context.abort(code, message)`. Messages follow Triton's wording where clients assert on it
(docs/protocol.md#errors), so tritonclient users see the texts they already match against.
"""

from __future__ import annotations

import grpc

from .constants import SHOWN_NAME_CHARS
from .text import clipped


class InferenceError(Exception):
    """Base of all errors that reach a client. `code` is the gRPC status to answer with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(InferenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(InferenceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(InferenceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(InferenceError):
    code = grpc.StatusCode.INTERNAL


class AlreadyExists(InferenceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(InferenceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(InferenceError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(InferenceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelLoadError(InferenceError):
    """A model (version) could not be loaded; the message is the reason shown in RepositoryIndex."""

    code = grpc.StatusCode.INVALID_ARGUMENT


MAX_SHOWN_NAME = SHOWN_NAME_CHARS
"""A name a client sent is echoed into an error at most this long: a 1 MB model name in an error
would otherwise exceed gRPC's metadata limit, and the client would see RESOURCE_EXHAUSTED
instead of the real error."""
MAX_MESSAGE_BYTES = 2048
"""Every error message sent to a client is cut to this many UTF-8 bytes (at the error boundary).
gRPC sends the message percent-encoded in a header, three characters per non-ASCII byte, so
this keeps any message under ~6 KB there: well inside the default metadata limits."""


def shown(name: str, limit: int = MAX_SHOWN_NAME) -> str:
    """`name` as it may appear in an error message: cut, with the cut said out loud."""
    return clipped(name, limit)


def clip_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_BYTES // 4:  # fast path: cannot exceed the byte limit
        return message
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return message
    cut = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return f"{cut}...({len(data) - MAX_MESSAGE_BYTES} more bytes)"
