"""One error family, raised deep and mapped to a gRPC status in exactly one place.

Each class carries its `grpc.StatusCode`; the servicer turns any `InferenceError` into
`context.abort(code, message)`. Messages follow Triton's wording where clients assert on it
(PROTOCOL.md §2.6), so tritonclient users see the texts they already match against.
"""

from __future__ import annotations

import grpc


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
