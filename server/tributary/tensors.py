"""Wire tensors <-> numpy: raw buffers, typed contents, BYTES serialisation, size checks.

Why this shape:
- Raw inputs become numpy *views* over the request's bytes (`np.frombuffer`), so decoding a
  numeric tensor costs O(1) Python work whatever its size (per-request work scales
  with tensors, not elements). Views are read-only; ONNX Runtime only reads them.
- Sizes are checked against the declared shape *before* anything is allocated: a request that
  claims a billion elements but carries 16 bytes is refused without touching memory.
- BYTES elements travel as 4-byte little-endian length + payload. ONNX Runtime's string tensors
  take Python `str` (ONNX Runtime `str()`-mangles `bytes` objects), so BYTES
  decode to UTF-8 `str` here, once, and invalid UTF-8 is a clear INVALID_ARGUMENT. BYTES are
  the one place where work grows with elements: it is kept vectorised, chunked so other
  threads get the GIL, and on the error path bounded by the declared shape (`tributary.strings`).
This module knows datatypes and buffers; it knows nothing about models (names arrive as strings
for error messages).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from . import strings
from .datatypes import DType
from .errors import InvalidArgument
from .strings import serialize_bytes

__all__ = ["serialize_bytes"]

_LEN = struct.Struct("<I")

# Which datatype a populated typed-contents field implies, for error messages.
_FIELD_TYPE = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
    "bytes_contents": "BYTES",
}
# Typed fields are wider than some datatypes: INT8/INT16 ride in int_contents, UINT8/16 in uint.
_FIELD_WIRE_DTYPE = {
    "int_contents": np.int32,
    "uint_contents": np.uint32,
}


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


MAX_SHOWN_DIMS = 16


def format_shape(shape: Sequence[int], rank: int | None = None) -> str:
    """Triton prints shapes as `[a,b]` with no spaces; clients and docs match on it. Past
    `MAX_SHOWN_DIMS` dimensions (or when only a prefix of a `rank`-long shape is given) the
    rest is summarised, so a client's 16 M-dimension shape never becomes a 100 MB message."""
    rank = len(shape) if rank is None else rank
    if rank <= MAX_SHOWN_DIMS and len(shape) == rank:
        return "[" + ",".join(str(int(d)) for d in shape) + "]"
    shown = ",".join(str(int(d)) for d in shape[:MAX_SHOWN_DIMS])
    return f"[{shown},...({rank} dimensions)]"


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


BYTES_ELEMENT_COST = 64
"""What one BYTES element counts for against --max-tensor-bytes: ONNX Runtime's string tensors
need a Python `str` per element (~50-60 bytes of object even for a short string, plus the
array slot), so a short-string tensor costs ~15x its wire size in memory. Counting its
4-byte wire minimum instead let a 2 GiB request ask for 536 M strings (~30 GB)."""


def check_size_limit(
    shape: Sequence[int], dtype: DType, limit: int, tensor: str, model: str
) -> None:
    """Refuse a tensor whose declared shape implies more than `limit` bytes, before allocation.

    Numeric elements count at their size; BYTES elements at `BYTES_ELEMENT_COST`.
    """
    count = element_count(shape)
    if dtype.size:
        implied = count * dtype.size
        what = f"{implied} bytes"
    else:
        implied = count * BYTES_ELEMENT_COST
        what = f"{count} BYTES elements at {BYTES_ELEMENT_COST} bytes each: {implied} bytes"
    if implied > limit:
        raise InvalidArgument(
            f"input '{tensor}' for model '{model}' declares shape {format_shape(shape)} "
            f"({what}), which exceeds the server's tensor size limit of {limit} bytes"
        )
    # An empty tensor implies 0 bytes, but numpy still refuses dimensions whose product
    # (skipping the zero) overflows; no dimension may be larger than the limit either.
    if any(d > limit for d in shape):
        raise InvalidArgument(
            f"input '{tensor}' for model '{model}' declares shape {format_shape(shape)}, "
            f"whose dimensions exceed the server's tensor size limit of {limit} bytes"
        )


def raw_to_numpy(
    buf: bytes | memoryview,
    dtype: DType,
    shape: tuple[int, ...],
    tensor: str,
    model: str,
    request_id: str,
) -> np.ndarray:
    """A view (numeric) or decoded object array (BYTES) of one raw input buffer.

    `buf` is `bytes` or a (zero-copy) `memoryview` slice of the request's bytes; neither is
    copied for numeric tensors.
    """
    if dtype.name == "BYTES":
        return strings.bytes_from_raw(buf, shape, tensor, model, request_id)
    if dtype.numpy is None:
        raise InvalidArgument(
            f"{_prefix(request_id)}datatype '{dtype.name}' of input '{tensor}' for model "
            f"'{model}' is not supported by this server"
        )
    expected = element_count(shape) * dtype.size
    if len(buf) != expected:
        raise InvalidArgument(
            f"{_prefix(request_id)}input byte size mismatch for input '{tensor}' for model "
            f"'{model}'. Expected {expected}, got {len(buf)}"
        )
    return np.frombuffer(buf, dtype=dtype.numpy).reshape(shape)


def typed_to_numpy(
    contents: object,
    dtype: DType,
    shape: tuple[int, ...],
    tensor: str,
    model: str,
    request_id: str,
) -> np.ndarray:
    """Decode `InferTensorContents` (the grpcurl/JSON-friendly form) into a numpy array."""
    populated = [f for f in _FIELD_TYPE if len(getattr(contents, f))]
    expected_field = dtype.typed_field
    # A field not matching the datatype gets Triton's text first, also for raw-only types.
    for field in populated:
        if field != expected_field:
            raise InvalidArgument(
                f"unexpected explicit tensor data for input tensor '{tensor}' for model "
                f"'{model}' of type '{_FIELD_TYPE[field]}', expected datatype '{dtype.name}'"
            )
    if expected_field is None:
        raise InvalidArgument(
            f"{_prefix(request_id)}explicit tensor data is not supported for input '{tensor}' "
            f"for model '{model}' of datatype '{dtype.name}'; send it in raw_input_contents"
        )
    values = getattr(contents, expected_field)
    count = element_count(shape)
    if len(values) != count:
        if dtype.name == "BYTES":
            raise InvalidArgument(
                f"{_prefix(request_id)}expected {count} string elements for inference input "
                f"'{tensor}' for model '{model}', got {len(values)}"
            )
        raise InvalidArgument(
            f"{_prefix(request_id)}input byte size mismatch for input '{tensor}' for model "
            f"'{model}'. Expected {count * dtype.size}, got {len(values) * dtype.size}"
        )
    if dtype.name == "BYTES":
        ctx = (tensor, model, request_id)
        out = np.empty(count, dtype=object)
        for i0 in range(0, count, strings.CHUNK):
            if i0:
                strings.yield_gil()
            chunk = list(values[i0 : i0 + strings.CHUNK])
            out[i0 : i0 + strings.CHUNK] = strings.texts_from_items(chunk, ctx)
        return out.reshape(shape)
    wire = _FIELD_WIRE_DTYPE.get(expected_field, dtype.numpy)
    arr = np.asarray(values, dtype=wire)
    if wire is not dtype.numpy:
        arr = arr.astype(dtype.numpy)  # low bytes, little-endian: Triton's packing
    return arr.reshape(shape)


def _format_value(value: object) -> str:
    """C++ std::to_string formatting, which Triton's classification strings use."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6f}"
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return str(int(value))  # type: ignore[call-overload]


def classify(
    arr: np.ndarray, k: int, labels: Sequence[str] | None, batched: bool, tensor: str, model: str
) -> np.ndarray:
    """Top-k "<value>:<index>[:<label>]" strings per batch row (Triton's classification)."""
    if arr.dtype.kind not in "iuf" or arr.dtype == np.float16:
        raise InvalidArgument(
            f"class result not available for output '{tensor}' of model '{model}' due to "
            f"unsupported type '{arr.dtype}'"
        )
    rows = arr.reshape(arr.shape[0], -1) if batched else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        top = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for j, idx in enumerate(top):
            text = f"{_format_value(row[idx])}:{int(idx)}"
            if labels is not None and idx < len(labels):
                text += f":{labels[idx]}"
            out[r, j] = text
    return out if batched else out.reshape(k)
