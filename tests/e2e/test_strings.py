"""BYTES tensors end to end: simple_string arithmetic, simple_identity round trips, bad buffers.

Like Triton's simple_grpc_string_infer_client (docs/protocol.md), plus the BYTES wire
rules (docs/protocol.md#tensors) and ONNX Runtime's string pitfalls (it wants `str`, not `bytes`).
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import output_arrays, raw_request, rpc_error, serialize_bytes, triton_error


def bytes_input(name: str, data: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    return inp


def object_array(values: list, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape)


@pytest.mark.parametrize("batch", [1, 3])
def test_simple_string_sums_as_strings(client, batch: int) -> None:
    rng = np.random.default_rng(batch)
    a = rng.integers(-50_000, 50_000, (batch, 16))
    b = rng.integers(-50_000, 50_000, (batch, 16))
    as_bytes = np.vectorize(lambda v: str(v).encode(), otypes=[object])
    result = client.infer(
        "simple_string", [bytes_input("INPUT0", as_bytes(a)), bytes_input("INPUT1", as_bytes(b))]
    )
    assert result.get_output("OUTPUT0").datatype == "BYTES"
    sums, diffs = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert sums.shape == diffs.shape == (batch, 16)
    np.testing.assert_array_equal(np.vectorize(int)(sums), a + b)
    np.testing.assert_array_equal(np.vectorize(int)(diffs), a - b)
    assert sums.tolist() == as_bytes(a + b).tolist()  # decimal text, no padding


def test_simple_string_accepts_str_objects(client) -> None:
    a = object_array([str(i) for i in range(16)], (1, 16))
    b = object_array(["1"] * 16, (1, 16))
    result = client.infer("simple_string", [bytes_input("INPUT0", a), bytes_input("INPUT1", b)])
    assert result.as_numpy("OUTPUT0").reshape(-1).tolist() == [
        str(i + 1).encode() for i in range(16)
    ]


ROUND_TRIPS = {
    "embedded_nul": [b"a\x00b", b"\x00", b"\x00\x00end"],
    "binary_blob": [b"\x00\x01\x02\x03"],
    "empty": [b"", b"", b"x", b""],
    "unicode": ["\u00e9t\u00e9 \u2603 \U0001f680 \u4e2d\u6587".encode(), "\u00df".encode()],
    "long": [bytes(range(1, 128)) * 40],
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_simple_identity_round_trips_exactly(client, case: str) -> None:
    values = ROUND_TRIPS[case]
    data = object_array(values, (1, len(values)))
    result = client.infer("simple_identity", [bytes_input("INPUT0", data)])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (1, len(values))
    assert out.reshape(-1).tolist() == values


def test_simple_identity_batched_rows(client) -> None:
    values = [f"row{r}-col{c}\x00".encode() for r in range(4) for c in range(3)]
    data = object_array(values, (4, 3))
    out = client.infer("simple_identity", [bytes_input("INPUT0", data)]).as_numpy("OUTPUT0")
    assert out.tolist() == data.tolist()


def test_non_utf8_bytes_are_refused_with_names(client) -> None:
    data = object_array([b"ok", b"\xff"], (1, 2))
    msg = triton_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.infer,
        "simple_identity",
        [bytes_input("INPUT0", data)],
    )
    assert "'INPUT0'" in msg and "'simple_identity'" in msg
    assert "UTF-8" in msg
    # the model still serves
    ok = client.infer("simple_identity", [bytes_input("INPUT0", object_array([b"ok"], (1, 1)))])
    assert ok.as_numpy("OUTPUT0").tolist() == [[b"ok"]]


def identity_raw(shape: list[int], data: bytes, request_id: str = ""):
    return raw_request("simple_identity", [("INPUT0", "BYTES", shape, data)], request_id=request_id)


def test_raw_bytes_serialisation_decodes(stub) -> None:
    values = [b"abc", b"", b"\x00z"]
    response = stub.ModelInfer(identity_raw([1, 3], serialize_bytes(values)))
    assert output_arrays(response)["OUTPUT0"].reshape(-1).tolist() == values


def test_truncated_length_prefix(stub) -> None:
    data = serialize_bytes([b"abc"]) + b"\x05\x00"  # 2 of the 4 length bytes of element 2
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 2], data))
    assert msg == (
        "[request id: <id_unknown>] incomplete string length indicator for inference input "
        "'INPUT0' for model 'simple_identity', expecting 4 bytes but only 2 bytes available"
    )


@pytest.mark.parametrize("values", [[b"a", b"b"], [b"aaaa", b"bbbb"]])
def test_too_few_elements(stub, values: list[bytes]) -> None:
    # both a buffer too short for 3 length prefixes and one that is long enough
    data = serialize_bytes(values)
    msg = rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 3], data, "rid-7")
    )
    assert msg == (
        "[request id: rid-7] expected 3 string elements for inference input 'INPUT0' for "
        "model 'simple_identity', got 2"
    )


def test_too_many_elements(stub) -> None:
    data = serialize_bytes([b"a", b"b", b"c"])
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 2], data))
    assert msg.endswith(
        "expected 2 string elements for inference input 'INPUT0' for model 'simple_identity', got 3"
    )


def test_length_larger_than_buffer(stub) -> None:
    data = struct.pack("<I", 100) + b"short"
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 1], data))
    assert "incomplete string data for inference input 'INPUT0' for model 'simple_identity'" in msg
    assert "length 100" in msg


def test_huge_declared_string_count_is_refused_cheaply(stub) -> None:
    # 20 million elements declared (within the default limit at 64 bytes each), 6 bytes
    # carried: refused without allocating for the shape
    data = serialize_bytes([b"ab"])
    msg = rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 20_000_000], data)
    )
    assert msg.endswith(
        "expected 20000000 string elements for inference input 'INPUT0' for model "
        "'simple_identity', got 1"
    )
    # 100 million: over the limit by the shape alone
    msg = rpc_error(
        grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, identity_raw([1, 100_000_000], data)
    )
    assert "(100000000 BYTES elements at 64 bytes each" in msg
