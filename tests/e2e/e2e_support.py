"""Helpers shared by the end-to-end tests: error assertions, raw requests, tiny repositories.

Everything here talks to a real server through a real client; nothing reaches into the
server's modules, so these tests see exactly what a user sees.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import build_models
import grpc
import numpy as np
import pytest
from onnx import helper
from tritonclient.utils import InferenceServerException

from tributary_client._proto import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"

# protocol datatype -> (numpy dtype, config DataType name)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "TYPE_BOOL"),
    "UINT8": (np.dtype("<u1"), "TYPE_UINT8"),
    "UINT16": (np.dtype("<u2"), "TYPE_UINT16"),
    "UINT32": (np.dtype("<u4"), "TYPE_UINT32"),
    "UINT64": (np.dtype("<u8"), "TYPE_UINT64"),
    "INT8": (np.dtype("<i1"), "TYPE_INT8"),
    "INT16": (np.dtype("<i2"), "TYPE_INT16"),
    "INT32": (np.dtype("<i4"), "TYPE_INT32"),
    "INT64": (np.dtype("<i8"), "TYPE_INT64"),
    "FP16": (np.dtype("<f2"), "TYPE_FP16"),
    "FP32": (np.dtype("<f4"), "TYPE_FP32"),
    "FP64": (np.dtype("<f8"), "TYPE_FP64"),
    "BYTES": (np.dtype(object), "TYPE_STRING"),
}
# which InferTensorContents field carries each datatype (typed, non-raw requests)
TYPED_FIELD = {
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
_ONNX_ELEM = {
    "BOOL": 9,
    "UINT8": 2,
    "UINT16": 4,
    "UINT32": 12,
    "UINT64": 13,
    "INT8": 3,
    "INT16": 5,
    "INT32": 6,
    "INT64": 7,
    "FP16": 10,
    "FP32": 1,
    "FP64": 11,
    "BYTES": 8,
}


# -- errors -----------------------------------------------------------------------------------


def rpc_error(code: grpc.StatusCode, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run a raw-stub call that must fail with `code`; return the status details."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    return err.details()


def triton_error(code: grpc.StatusCode, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Run a tritonclient call that must fail with `code`; return the message."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    err = info.value
    assert err.status() == f"StatusCode.{code.name}", f"{err.status()}: {err.message()}"
    return err.message()


# -- raw requests -------------------------------------------------------------------------------


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """Length-prefixed BYTES wire form, written here independently of client and server."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def deserialize_bytes(buf: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(buf):
        (n,) = struct.unpack_from("<I", buf, pos)
        out.append(bytes(buf[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(buf), "trailing bytes in a BYTES output"
    return out


def raw_request(
    model: str,
    tensors: Sequence[tuple[str, str, Sequence[int], bytes]],
    *,
    version: str = "",
    request_id: str = "",
    outputs: Sequence[str] = (),
) -> Any:
    """A ModelInferRequest with one raw buffer per (name, datatype, shape, data) tensor."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def simple_request(batch: int = 1, **kwargs: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """A raw request for `simple` with random INT32 inputs; returns (request, in0, in1)."""
    rng = np.random.default_rng(batch)
    a = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
    request = raw_request(
        "simple",
        [
            ("INPUT0", "INT32", [batch, 16], a.tobytes()),
            ("INPUT1", "INT32", [batch, 16], b.tobytes()),
        ],
        **kwargs,
    )
    return request, a, b


def triton_simple_inputs(a: np.ndarray, b: np.ndarray | None = None) -> list[Any]:
    """tritonclient inputs for the `simple` model: INPUT0 = a, INPUT1 = b (default a)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", a if b is None else b)):
        tensor = grpcclient.InferInput(name, list(value.shape), "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def output_arrays(response: Any) -> dict[str, np.ndarray]:
    """Decode every output of a response from `raw_output_contents` (positionally)."""
    assert len(response.outputs) == len(response.raw_output_contents)
    out: dict[str, np.ndarray] = {}
    for meta, data in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(meta.shape)
        if meta.datatype == "BYTES":
            arr = np.empty(len(deserialize_bytes(data)), dtype=object)
            arr[:] = deserialize_bytes(data)
            out[meta.name] = arr.reshape(shape)
        else:
            out[meta.name] = np.frombuffer(data, dtype=DTYPES[meta.datatype][0]).reshape(shape)
    return out


# -- tiny repositories ----------------------------------------------------------------------------


def identity_model(out: Path, name: str, datatype: str, dims: Sequence[int], mbs: int) -> Path:
    """OUTPUT0 = Identity(INPUT0) for any datatype, through build_models' writer."""
    elem = _ONNX_ELEM[datatype]
    shape: list[int | str] = [d if d > 0 else f"d{i}" for i, d in enumerate(dims)]
    if mbs > 0:
        shape = ["N", *shape]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", elem, shape)],
        [helper.make_tensor_value_info("OUTPUT0", elem, shape)],
    )
    type_name = DTYPES[datatype][1]
    dims_text = ", ".join(str(d) for d in dims)
    config = (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {mbs}\n'
        f'input [ {{ name: "INPUT0" data_type: {type_name} dims: [ {dims_text} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0" data_type: {type_name} dims: [ {dims_text} ] }} ]\n'
    )
    return build_models.write_model(out, name, build_models.make_model(graph), config)


# -- process -------------------------------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident set size (or its peak, field="VmHWM") of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll until `predicate()` is true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)
