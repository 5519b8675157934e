"""Numbers more than one room needs, each named once (docs/limits.md says what they bound).

Imports nothing, so any module (logging included) can use it early.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1
"""gRPC's message size limit and the default of --max-tensor-bytes: a tensor or reply past it
could never be sent anyway."""

DEFAULT_MAX_TENSOR_BYTES = INT32_MAX
DEFAULT_MAX_STREAMS = 512
"""--grpc-max-streams: open ModelStreamInfer streams at once."""
DEFAULT_STREAM_MAX_PENDING = 256
"""--grpc-stream-max-pending: replies running or unsent on one stream."""
DEFAULT_HTTP_MAX_INPUT_SIZE = 64 << 20
DEFAULT_HTTP_MAX_CONNECTIONS = 1024
"""--http-max-input-size: the largest HTTP request body, compressed or inflated (tritonserver's
default)."""
DEFAULT_CLIENT_SHM_MAX_BYTES = 64 << 30
"""--client-shm-max-bytes: client shared memory mapped at once."""

SHOWN_NAME_CHARS = 256
"""Client-sent names (models, tensors, regions, services) are echoed in errors and logs cut to
this many characters, and names that must be kept whole are refused past it."""
