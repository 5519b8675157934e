"""numpy ⇄ KServe v2 tensors: datatype table, BYTES serialisation, raw buffers.

The SDK always sends `raw_input_contents` (never typed `contents`): it is one `tobytes()` per
tensor instead of one Python object per element, and it is what Triton-style servers expect
from real clients (docs/protocol.md#tensors). Responses are decoded from `raw_output_contents` with
`np.frombuffer`, so outputs are zero-copy, read-only views; call `.copy()` to modify one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

_LENGTH = struct.Struct("<I")

# numpy dtype → protocol datatype name. BYTES is handled separately (object/str/bytes arrays).
_DATATYPE_OF: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
# Always little-endian: the wire format is LE whatever the client machine is.
_DTYPE_OF: dict[str, np.dtype] = {name: dt.newbyteorder("<") for dt, name in _DATATYPE_OF.items()}


def datatype_of(array: np.ndarray) -> str:
    """Protocol datatype for an array; the dtype is the only source of truth for it."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no KServe v2 datatype") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """numpy dtype for a fixed-size protocol datatype (BYTES → object)."""
    if datatype == "BYTES":
        return np.dtype(object)
    try:
        return _DTYPE_OF[datatype]
    except KeyError:
        raise TypeError(f"datatype '{datatype}' has no numpy equivalent") from None


def _element_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    # Refuse rather than str() it: silently sending "None" or "3.0" hides caller bugs.
    raise TypeError(f"BYTES tensor elements must be bytes or str, got {type(item).__name__}")


def serialize_bytes(array: np.ndarray | Iterable[bytes | str]) -> bytes:
    """Serialise a BYTES tensor: each element as a 4-byte LE length then its bytes, row-major.

    `str` elements are UTF-8 encoded. Prefer object arrays over numpy `S` arrays: numpy strips
    trailing NUL bytes from `S` elements.
    """
    items = (
        np.asarray(array, dtype=object).ravel(order="C") if isinstance(array, np.ndarray) else array
    )
    parts: list[bytes] = []
    for item in items:
        data = _element_bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(data: bytes, count: int | None = None) -> np.ndarray:
    """Inverse of `serialize_bytes`: a 1-D object array of `bytes`.

    With `count`, the buffer must hold exactly that many elements; a malformed buffer raises
    ValueError rather than returning a silently shorter array.
    """
    view = memoryview(data)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ValueError(f"truncated BYTES length prefix at offset {offset}")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise ValueError(f"BYTES element at offset {offset - 4} overruns the buffer")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if count is not None and len(items) != count:
        raise ValueError(f"expected {count} BYTES elements, got {len(items)}")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def to_raw(array: np.ndarray) -> tuple[str, bytes]:
    """(datatype, raw buffer) for one input tensor."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, serialize_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return datatype, array.tobytes(order="C")


def from_raw(datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """Decode one output tensor's raw buffer into an array of `shape`."""
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":
        return deserialize_bytes(raw, count).reshape(shape)
    if datatype == "BF16":
        # No numpy bfloat16: widen to float32, which holds every bfloat16 value exactly.
        halves = np.frombuffer(raw, dtype="<u2", count=count)
        return (halves.astype("<u4") << 16).view("<f4").reshape(shape)
    dtype = numpy_dtype(datatype)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"output of datatype {datatype} and shape {list(shape)} needs "
            f"{count * dtype.itemsize} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def from_typed(datatype: str, shape: tuple[int, ...], contents: object) -> np.ndarray:
    """Decode typed `contents`: Tributary and Triton never send it, other v2 servers may."""
    field = _TYPED_FIELD.get(datatype)
    if field is None:
        raise ValueError(f"datatype {datatype} cannot be carried in typed contents")
    values = list(getattr(contents, field))
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out.reshape(shape)
    return np.asarray(values, dtype=numpy_dtype(datatype)).reshape(shape)
