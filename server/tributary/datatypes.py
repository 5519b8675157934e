"""The datatype table: protocol names, config enums, numpy dtypes, ONNX type strings.

One row per KServe v2 datatype (docs/protocol.md#tensors). Everything else looks types up here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # protocol name, e.g. "FP32"
    config: int  # model_config DataType enum value, e.g. 11 (TYPE_FP32)
    config_name: str  # e.g. "TYPE_FP32"
    numpy: np.dtype | None  # None for BF16 (no numpy type); object for BYTES
    size: int  # bytes per element; 0 for BYTES (variable)
    typed_field: str | None  # InferTensorContents field, None when raw-only
    onnx: str | None  # ONNX Runtime type string, e.g. "tensor(float)"


_ROWS = [
    DType("BOOL", 1, "TYPE_BOOL", np.dtype(np.bool_), 1, "bool_contents", "tensor(bool)"),
    DType("UINT8", 2, "TYPE_UINT8", np.dtype("<u1"), 1, "uint_contents", "tensor(uint8)"),
    DType("UINT16", 3, "TYPE_UINT16", np.dtype("<u2"), 2, "uint_contents", "tensor(uint16)"),
    DType("UINT32", 4, "TYPE_UINT32", np.dtype("<u4"), 4, "uint_contents", "tensor(uint32)"),
    DType("UINT64", 5, "TYPE_UINT64", np.dtype("<u8"), 8, "uint64_contents", "tensor(uint64)"),
    DType("INT8", 6, "TYPE_INT8", np.dtype("<i1"), 1, "int_contents", "tensor(int8)"),
    DType("INT16", 7, "TYPE_INT16", np.dtype("<i2"), 2, "int_contents", "tensor(int16)"),
    DType("INT32", 8, "TYPE_INT32", np.dtype("<i4"), 4, "int_contents", "tensor(int32)"),
    DType("INT64", 9, "TYPE_INT64", np.dtype("<i8"), 8, "int64_contents", "tensor(int64)"),
    DType("FP16", 10, "TYPE_FP16", np.dtype("<f2"), 2, None, "tensor(float16)"),
    DType("FP32", 11, "TYPE_FP32", np.dtype("<f4"), 4, "fp32_contents", "tensor(float)"),
    DType("FP64", 12, "TYPE_FP64", np.dtype("<f8"), 8, "fp64_contents", "tensor(double)"),
    DType("BYTES", 13, "TYPE_STRING", np.dtype(object), 0, "bytes_contents", "tensor(string)"),
    DType("BF16", 14, "TYPE_BF16", None, 2, None, "tensor(bfloat16)"),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _ROWS}
BY_CONFIG: dict[int, DType] = {d.config: d for d in _ROWS}
BY_ONNX: dict[str, DType] = {d.onnx: d for d in _ROWS if d.onnx}


def from_config(value: int) -> DType:
    """DType for a model_config DataType enum value; KeyError for TYPE_INVALID."""
    return BY_CONFIG[value]
