"""Typed (`contents`) inputs through the raw stub, as Triton's grpc_explicit_* examples use them.

Responses always carry `raw_output_contents` (docs/protocol.md#tensors); mixing raw and typed
inputs, or a typed field that does not match the datatype, is refused with Triton's text.
"""

from __future__ import annotations

import grpc
import numpy as np
from e2e_support import deserialize_bytes, rpc_error

from tributary_client._proto import grpc_service_pb2 as pb


def typed_request(model: str, datatype: str, field: str, a, b, **kwargs) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    for name, values in (("INPUT0", a), ("INPUT1", b)):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1, 16])
        getattr(tensor.contents, field).extend(values)
    request.outputs.add(name="OUTPUT0")
    request.outputs.add(name="OUTPUT1")
    return request


def test_simple_int_contents(stub) -> None:
    a = list(range(16))
    b = [1] * 16
    response = stub.ModelInfer(typed_request("simple", "INT32", "int_contents", a, b, id="x-1"))
    assert response.model_name == "simple" and response.model_version == "1"
    assert response.id == "x-1"
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert all(not o.HasField("contents") for o in response.outputs)
    out0 = np.frombuffer(response.raw_output_contents[0], dtype=np.int32)
    out1 = np.frombuffer(response.raw_output_contents[1], dtype=np.int32)
    np.testing.assert_array_equal(out0, np.array(a) + np.array(b))
    np.testing.assert_array_equal(out1, np.array(a) - np.array(b))
    assert list(response.outputs[0].shape) == [1, 16]


def test_mixing_raw_and_typed_is_refused(stub) -> None:
    request = typed_request("simple", "INT32", "int_contents", list(range(16)), [1] * 16)
    request.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert msg == (
        "contents field must not be specified when using raw_input_contents for 'INPUT0' "
        "for model 'simple'"
    )


def test_simple_int8_int_contents(stub) -> None:
    a = [-128, -1, 0, 1, 127] + list(range(-50, -39))
    b = [1, 1, 1, 1, 1] + [3] * 11
    response = stub.ModelInfer(typed_request("simple_int8", "INT8", "int_contents", a, b))
    out0 = np.frombuffer(response.raw_output_contents[0], dtype=np.int8)
    out1 = np.frombuffer(response.raw_output_contents[1], dtype=np.int8)
    assert response.outputs[0].datatype == "INT8"
    # the graph adds in int32 and casts back: int8 wraps like numpy's int8 arithmetic
    np.testing.assert_array_equal(out0, np.array(a, np.int8) + np.array(b, np.int8))
    np.testing.assert_array_equal(out1, np.array(a, np.int8) - np.array(b, np.int8))


def test_wrong_version_specification(stub) -> None:
    request = typed_request(
        "simple_int8",
        "INT8",
        "int_contents",
        [0] * 16,
        [0] * 16,
        model_version="wrong_specification",
    )
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert "failed to get model version from specified version string 'wrong_specification'" in msg


def test_simple_string_bytes_contents(stub) -> None:
    a = [str(i).encode() for i in range(16)]
    b = [b"10"] * 16
    response = stub.ModelInfer(typed_request("simple_string", "BYTES", "bytes_contents", a, b))
    assert response.outputs[0].datatype == "BYTES"
    sums = deserialize_bytes(response.raw_output_contents[0])
    diffs = deserialize_bytes(response.raw_output_contents[1])
    assert sums == [str(i + 10).encode() for i in range(16)]
    assert diffs == [str(i - 10).encode() for i in range(16)]


def test_typed_field_not_matching_datatype(stub) -> None:
    request = typed_request("simple", "INT32", "fp32_contents", [0.5] * 16, [1.5] * 16)
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert msg == (
        "unexpected explicit tensor data for input tensor 'INPUT0' for model 'simple' of type "
        "'FP32', expected datatype 'INT32'"
    )


def test_typed_element_count_mismatch(stub) -> None:
    request = typed_request("simple", "INT32", "int_contents", list(range(8)), [1] * 16)
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert msg == (
        "[request id: <id_unknown>] input byte size mismatch for input 'INPUT0' for model "
        "'simple'. Expected 64, got 32"
    )


def test_typed_input_without_any_data(stub) -> None:
    request = pb.ModelInferRequest(model_name="simple")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert msg == "unable to find data for input tensor 'INPUT0' for model 'simple' in request."
