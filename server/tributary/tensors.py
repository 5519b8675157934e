"""Wire tensors <-> numpy: raw buffers, typed contents, BYTES serialisation, size checks.

Why this shape:
- Raw inputs become numpy *views* over the request's bytes (`np.frombuffer`), so decoding a
  numeric tensor costs O(1) Python work whatever its size (DESIGN.md: per-request work scales
  with tensors, not elements). Views are read-only; ONNX Runtime only reads them.
- Sizes are checked against the declared shape *before* anything is allocated: a request that
  claims a billion elements but carries 16 bytes is refused without touching memory.
- BYTES elements travel as 4-byte little-endian length + payload. ONNX Runtime's string tensors
  take Python `str` (PROTOCOL.md §10: bytes objects are silently `str()`-mangled), so BYTES
  decode to UTF-8 `str` here, once, and invalid UTF-8 is a clear INVALID_ARGUMENT.
This module knows datatypes and buffers; it knows nothing about models (names arrive as strings
for error messages).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from .datatypes import DType
from .errors import InvalidArgument

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


def format_shape(shape: Sequence[int]) -> str:
    """Triton prints shapes as `[a,b]` with no spaces; clients and docs match on it."""
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def check_size_limit(
    shape: Sequence[int], dtype: DType, limit: int, tensor: str, model: str
) -> None:
    """Refuse a tensor whose declared shape implies more than `limit` bytes, before allocation.

    BYTES elements are counted at their 4-byte minimum, since that is what any valid payload
    needs at least.
    """
    implied = element_count(shape) * (dtype.size or 4)
    if implied > limit:
        raise InvalidArgument(
            f"input '{tensor}' for model '{model}' declares shape {format_shape(shape)} "
            f"({implied} bytes), which exceeds the server's tensor size limit of {limit} bytes"
        )


def raw_to_numpy(
    buf: bytes, dtype: DType, shape: tuple[int, ...], tensor: str, model: str, request_id: str
) -> np.ndarray:
    """A view (numeric) or decoded object array (BYTES) of one raw input buffer."""
    if dtype.name == "BYTES":
        return _bytes_from_raw(buf, shape, tensor, model, request_id)
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


def _bytes_from_raw(
    buf: bytes, shape: tuple[int, ...], tensor: str, model: str, request_id: str
) -> np.ndarray:
    count = element_count(shape)
    if count * _LEN.size > len(buf):  # refused before allocating `count` slots
        raise _bytes_error(buf, count, tensor, model, request_id)
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise _bytes_error(buf, count, tensor, model, request_id)
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise _bytes_error(buf, count, tensor, model, request_id)
        out[i] = _utf8(view[pos : pos + n], tensor, model, request_id)
        pos += n
    if pos != len(buf):
        raise _bytes_error(buf, count, tensor, model, request_id)
    return out.reshape(shape)


def _bytes_error(
    buf: bytes, count: int, tensor: str, model: str, request_id: str
) -> InvalidArgument:
    """Triton's error for a BYTES buffer that does not hold exactly `count` elements.

    Walks the whole buffer like Triton's core does (error path only; bounded by the buffer's
    size, not the declared shape): an incomplete length or payload is reported where it
    occurs, otherwise the element count that was actually found.
    """
    where = f"for inference input '{tensor}' for model '{model}'"
    pos = got = 0
    while pos < len(buf):
        if len(buf) - pos < _LEN.size:
            return InvalidArgument(
                f"{_prefix(request_id)}incomplete string length indicator {where}, expecting 4 "
                f"bytes but only {len(buf) - pos} bytes available"
            )
        (n,) = _LEN.unpack_from(buf, pos)
        pos += _LEN.size
        if pos + n > len(buf):
            return InvalidArgument(
                f"{_prefix(request_id)}incomplete string data {where}, expecting string of "
                f"length {n} but only {len(buf) - pos} bytes available"
            )
        pos += n
        got += 1
    return InvalidArgument(
        f"{_prefix(request_id)}expected {count} string elements {where}, got {got}"
    )


def _utf8(data: bytes | memoryview, tensor: str, model: str, request_id: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{_prefix(request_id)}input '{tensor}' for model '{model}' holds a BYTES element "
            f"that is not valid UTF-8 ({exc.reason} at byte {exc.start}); ONNX Runtime string "
            "tensors carry text only"
        ) from None


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
    # A field not matching the datatype gets Triton's text first (§2.2), also for raw-only types.
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
        out = np.empty(count, dtype=object)
        for i, v in enumerate(values):
            out[i] = _utf8(v, tensor, model, request_id)
        return out.reshape(shape)
    wire = _FIELD_WIRE_DTYPE.get(expected_field, dtype.numpy)
    arr = np.asarray(values, dtype=wire)
    if wire is not dtype.numpy:
        arr = arr.astype(dtype.numpy)  # low bytes, little-endian: Triton's packing
    return arr.reshape(shape)


def numpy_to_raw(arr: np.ndarray, dtype: DType) -> bytes:
    """The one copy on the way out: array (or view) -> response bytes."""
    if dtype.name == "BYTES":
        return serialize_bytes(arr)
    if arr.dtype != dtype.numpy:
        arr = arr.astype(dtype.numpy)
    return arr.tobytes()


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Length-prefixed serialisation of a BYTES tensor (row-major)."""
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


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
