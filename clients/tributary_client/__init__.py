"""Tributary's Python SDK: numpy in, numpy out, over the KServe v2 gRPC protocol.

    from tributary_client import Client
    import numpy as np
    from tributary_client import Client

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    with Client("localhost:8001", timeout=10) as client:
        result = client.infer("simple", {"INPUT0": a, "INPUT1": a})
        total = result["OUTPUT0"]

It speaks to any KServe v2 / Triton-compatible gRPC server and never imports the server
package. Its generated stubs live in a private descriptor pool, so it can share a process
with tritonclient. `AsyncClient` (asyncio) is imported lazily so that sync users never load
grpc.aio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import InferenceServerError
from ._options import Headers, KeepAlive, RetryPolicy, TLSConfig
from ._tensors import deserialize_bytes, serialize_bytes
from ._types import (
    InferResult,
    ModelIndex,
    ModelMetadata,
    ServerMetadata,
    StreamRequest,
    StreamResult,
    TensorMetadata,
)
from .client import CallFuture, Client, InferStream

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = [
    "AsyncClient",
    "CallFuture",
    "Client",
    "Headers",
    "InferResult",
    "InferStream",
    "InferenceServerError",
    "KeepAlive",
    "ModelIndex",
    "ModelMetadata",
    "RetryPolicy",
    "ServerMetadata",
    "StreamRequest",
    "StreamResult",
    "TLSConfig",
    "TensorMetadata",
    "deserialize_bytes",
    "serialize_bytes",
]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
