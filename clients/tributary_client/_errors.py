"""The SDK's single exception type.

Callers handle one class and branch on `.code`, instead of catching `grpc.RpcError` (whose
accessors only exist on call objects) and whatever the SDK itself might raise.
"""

from __future__ import annotations

import grpc


class InferenceServerError(Exception):
    """A non-OK answer from the server, or a transport failure that gRPC reported as a status.

    `code` is None only for per-request errors inside a stream: ModelStreamInfer reports those
    as a bare `error_message` string with no status code (docs/protocol.md#streams).
    """

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}" if self.code is not None else self.message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> InferenceServerError:
        """Build from what grpc raised; both sync and aio call errors expose code()/details()."""
        code = getattr(error, "code", None)
        details = getattr(error, "details", None)
        status = code() if callable(code) else grpc.StatusCode.UNKNOWN
        message = details() if callable(details) else str(error)
        return cls(status or grpc.StatusCode.UNKNOWN, message or "")
