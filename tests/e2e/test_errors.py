"""Every request error of docs/protocol.md that applies, with code and exact text, and then proof
that bad input cost nothing else: no memory growth, no lost model, the server still serves.

Also the other side of the size rules: a gRPC message far beyond Python's 4 MiB default is
accepted (Triton's INT32_MAX limits), and --max-tensor-bytes refuses big shapes before
anything is allocated (docs/architecture.md).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import (
    identity_model,
    raw_request,
    rpc_error,
    rss_kib,
    serialize_bytes,
    simple_request,
    triton_error,
)

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOTE = (
    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to "
    "be prepended to each input shape. If you want to specify the full shape including the "
    "batch dim in your input dims config, try setting max_batch_size to zero. See the model "
    "configuration docs for more info on max_batch_size."
)
LIMIT = 16 * 1024 * 1024  # --max-tensor-bytes of the limited server


def int32_input(name: str, shape: list[int], value: int = 1) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, shape, "INT32")
    inp.set_data_from_numpy(np.full(shape, value, dtype=np.int32))
    return inp


# -- model and version lookup -----------------------------------------------------------------


def test_unknown_model(client) -> None:
    msg = triton_error(
        grpc.StatusCode.NOT_FOUND, client.infer, "no_such_model", [int32_input("INPUT0", [1, 16])]
    )
    assert msg == "Request for unknown model: 'no_such_model' is not found"


def test_explicit_version_absent(client) -> None:
    inputs = [int32_input("INPUT0", [1, 16]), int32_input("INPUT1", [1, 16])]
    msg = triton_error(grpc.StatusCode.NOT_FOUND, client.infer, "simple", inputs, "2")
    assert msg == "Request for unknown model: 'simple' version 2 is not found"


@pytest.mark.parametrize("version", ["abc", "one", "", " "])
def test_bad_version_string(stub, version: str) -> None:
    request, _, _ = simple_request(version=version)
    if version == "":  # "" means "server chooses": it must work
        assert stub.ModelInfer(request).model_version == "1"
        return
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == (
        f"failed to get model version from specified version string '{version}' "
        "(details: stol), version should be an integral value > 0"
    )


def test_negative_version(stub) -> None:
    request, _, _ = simple_request(version="-3")
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == "invalid model version specified '-3' , version should be an integral value > 0"


# -- inputs ------------------------------------------------------------------------------------


def test_wrong_datatype(client) -> None:
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.float32))
    msg = triton_error(INVALID, client.infer, "simple", [bad, int32_input("INPUT1", [1, 16])])
    assert msg == (
        "[request id: <id_unknown>] inference input 'INPUT0' data-type is 'FP32', but model "
        "'simple' expects 'INT32'"
    )


def test_wrong_shape_with_note(client) -> None:
    inputs = [int32_input("INPUT0", [1, 8]), int32_input("INPUT1", [1, 16])]
    msg = triton_error(INVALID, client.infer, "simple", inputs, request_id="r1")
    assert msg == (
        "[request id: r1] unexpected shape for input 'INPUT0' for model 'simple'. "
        "Expected [-1,16], got [1,8]." + NOTE
    )


def test_missing_batch_dimension(client) -> None:
    inputs = [int32_input("INPUT0", [16]), int32_input("INPUT1", [16])]
    msg = triton_error(INVALID, client.infer, "simple", inputs)
    assert msg.startswith(
        "[request id: <id_unknown>] unexpected shape for input 'INPUT0' for model 'simple'. "
        "Expected [-1,16], got [16]. NOTE: "
    )


def test_minus_one_in_request_shape(stub) -> None:
    request = raw_request(
        "simple",
        [("INPUT0", "INT32", [-1, 16], b"\0" * 64), ("INPUT1", "INT32", [1, 16], b"\0" * 64)],
    )
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == (
        "All input dimensions should be specified for input 'INPUT0' for model 'simple', "
        "got [-1,16]"
    )


def test_batch_larger_than_max_batch_size(client) -> None:
    inputs = [int32_input("INPUT0", [9, 16]), int32_input("INPUT1", [9, 16])]
    msg = triton_error(INVALID, client.infer, "simple", inputs)
    assert (
        msg == "[request id: <id_unknown>] inference request batch-size must be <= 8 for 'simple'"
    )


def test_inputs_with_different_batch(client) -> None:
    inputs = [int32_input("INPUT0", [2, 16]), int32_input("INPUT1", [3, 16])]
    msg = triton_error(INVALID, client.infer, "simple", inputs)
    assert msg == "input 'INPUT1' batch size does not match other inputs for 'simple'"


def test_missing_input(client) -> None:
    msg = triton_error(INVALID, client.infer, "simple", [int32_input("INPUT0", [1, 16])])
    assert msg == (
        "[request id: <id_unknown>] expected 2 inputs but got 1 inputs for model 'simple'. "
        "Got input(s) ['INPUT0'], but missing required input(s) ['INPUT1']. Please provide all "
        "required input(s)."
    )


def test_unknown_input(client) -> None:
    inputs = [
        int32_input("INPUT0", [1, 16]),
        int32_input("INPUT1", [1, 16]),
        int32_input("INPUT2", [1, 16]),
    ]
    msg = triton_error(INVALID, client.infer, "simple", inputs)
    assert msg == "unexpected inference input 'INPUT2' for model 'simple'"


def test_byte_size_mismatch(stub) -> None:
    request = raw_request(
        "simple",
        [("INPUT0", "INT32", [1, 16], b"\0" * 32), ("INPUT1", "INT32", [1, 16], b"\0" * 64)],
        request_id="short-one",
    )
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == (
        "[request id: short-one] input byte size mismatch for input 'INPUT0' for model 'simple'. "
        "Expected 64, got 32"
    )


def test_missing_raw_buffer(stub) -> None:
    request = raw_request("simple", [("INPUT0", "INT32", [1, 16], b"\0" * 64)])
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])  # no buffer for it
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == "unable to find data for input tensor 'INPUT1' for model 'simple' in request."


# -- outputs and parameters -------------------------------------------------------------------


def both_inputs() -> list[grpcclient.InferInput]:
    return [int32_input("INPUT0", [1, 16]), int32_input("INPUT1", [1, 16])]


def test_unknown_output(client) -> None:
    outputs = [grpcclient.InferRequestedOutput("OUTPUT9")]
    msg = triton_error(INVALID, client.infer, "simple", both_inputs(), outputs=outputs)
    assert msg == "unexpected inference output 'OUTPUT9' for model 'simple'"


def test_duplicate_output(client) -> None:
    outputs = [
        grpcclient.InferRequestedOutput("OUTPUT0"),
        grpcclient.InferRequestedOutput("OUTPUT0"),
    ]
    msg = triton_error(INVALID, client.infer, "simple", both_inputs(), outputs=outputs)
    assert msg == "[request id: <id_unknown>] output 'OUTPUT0' already exists in request"


def test_classification_with_wrong_parameter_type(stub) -> None:
    request = raw_request("digits", [("input", "FP32", [1, 64], b"\0" * 256)])
    out = request.outputs.add(name="probabilities")
    out.parameters["classification"].string_param = "3"
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg == "invalid value type for 'classification' parameter, expected int64_param"


def test_reserved_triton_parameter(stub) -> None:
    request, _, _ = simple_request()
    request.parameters["triton_secret"].bool_param = True
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert msg.startswith("parameter keys starting with 'triton_' are reserved for Triton usage")


def test_shape_beyond_default_limit_is_refused(stub) -> None:
    # 8 x 2^40 BYTES elements need at least 32 TiB: refused from the shape alone
    request = raw_request(
        "simple_identity", [("INPUT0", "BYTES", [8, 2**40], serialize_bytes([b"a"]))]
    )
    msg = rpc_error(INVALID, stub.ModelInfer, request)
    assert "'INPUT0'" in msg and "'simple_identity'" in msg
    assert "exceeds the server's tensor size limit of 2147483647 bytes" in msg


# -- a server with --max-tensor-bytes -----------------------------------------------------------


@pytest.fixture(scope="module")
def limited(server_factory, tmp_path_factory):
    repo = tmp_path_factory.mktemp("limited")
    identity_model(repo, "identity_fp32", "FP32", [-1], mbs=8)
    identity_model(repo, "identity_bytes", "BYTES", [-1], mbs=8)
    server = server_factory(repo, f"--max-tensor-bytes={LIMIT}")
    yield server
    assert server.terminate() == 0


@pytest.fixture(scope="module")
def limited_stub(limited):
    channel = grpc.insecure_channel(
        limited.url,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def fp32_request(shape: list[int], data: bytes) -> pb.ModelInferRequest:
    return raw_request("identity_fp32", [("INPUT0", "FP32", shape, data)])


def test_declared_shape_over_limit_is_refused(limited_stub) -> None:
    msg = rpc_error(INVALID, limited_stub.ModelInfer, fp32_request([1, 10**9], b"\0" * 16))
    assert msg == (
        "input 'INPUT0' for model 'identity_fp32' declares shape [1,1000000000] "
        f"(4000000000 bytes), which exceeds the server's tensor size limit of {LIMIT} bytes"
    )


def test_limit_applies_even_when_the_bytes_are_sent(limited_stub) -> None:
    n = LIMIT // 4 + 1
    msg = rpc_error(INVALID, limited_stub.ModelInfer, fp32_request([1, n], b"\0" * (n * 4)))
    assert f"exceeds the server's tensor size limit of {LIMIT} bytes" in msg


def test_bad_sizes_cost_no_memory(limited, limited_stub) -> None:
    """Shapes claiming gigabytes while carrying bytes: refused, and the server stays as big."""
    assert limited.proc is not None
    pid = limited.proc.pid
    ok = limited_stub.ModelInfer(fp32_request([1, 4], np.ones(4, np.float32).tobytes()))
    assert ok.raw_output_contents[0] == np.ones(4, np.float32).tobytes()
    before, peak_before = rss_kib(pid), rss_kib(pid, "VmHWM")
    for i in range(20):
        # within the limit, far more than carried: byte-size mismatch, nothing allocated
        n = 3_000_000 + i
        msg = rpc_error(INVALID, limited_stub.ModelInfer, fp32_request([1, n], b"\0" * 16))
        assert msg.endswith(f"Expected {n * 4}, got 16")
        # beyond the limit
        rpc_error(INVALID, limited_stub.ModelInfer, fp32_request([8, 2**60], b"\0" * 16))
        # 200,000 strings declared (within the limit at 64 bytes each), one carried
        strings = raw_request(
            "identity_bytes", [("INPUT0", "BYTES", [1, 200_000], serialize_bytes([b"x"]))]
        )
        msg = rpc_error(INVALID, limited_stub.ModelInfer, strings)
        assert msg.endswith(
            "expected 200000 string elements for inference input 'INPUT0' "
            "for model 'identity_bytes', got 1"
        )
    grown = rss_kib(pid) - before
    peak_grown = rss_kib(pid, "VmHWM") - peak_before
    # a leak shows in RSS; even one transient 12 MB buffer or 32 MB object array in the peak
    assert grown < 10 * 1024, f"server RSS grew by {grown} KiB"
    assert peak_grown < 10 * 1024, f"server peak RSS grew by {peak_grown} KiB"
    assert limited.proc.poll() is None


def test_message_far_beyond_4_mib(limited) -> None:
    data = np.random.default_rng(0).standard_normal((1, 2_000_000)).astype(np.float32)  # 8 MB
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(limited.url) as c:
        result = c.infer("identity_fp32", [inp])
    got = result.as_numpy("OUTPUT0")
    assert got.shape == data.shape
    assert np.array_equal(got.view(np.uint32), data.view(np.uint32))


# -- nothing else lost ----------------------------------------------------------------------------


def test_server_still_serves_after_all_errors(server, client, stub) -> None:
    assert server.proc is not None and server.proc.poll() is None
    assert client.is_server_live() and client.is_server_ready()
    for batch in (1, 8):
        request, a, b = simple_request(batch)
        response = stub.ModelInfer(request)
        out = {o.name: i for i, o in enumerate(response.outputs)}
        got0 = np.frombuffer(response.raw_output_contents[out["OUTPUT0"]], np.int32)
        got1 = np.frombuffer(response.raw_output_contents[out["OUTPUT1"]], np.int32)
        np.testing.assert_array_equal(got0.reshape(batch, 16), a + b)
        np.testing.assert_array_equal(got1.reshape(batch, 16), a - b)
    index = client.get_model_repository_index().models
    assert all(m.state == "READY" for m in index)


def test_bytes_elements_count_at_their_memory_cost(limited_stub) -> None:
    """A BYTES element costs a Python str (~60 bytes) however short it is on the wire, so the
    limit counts it at 64 bytes: LIMIT // 64 + 1 one-byte strings are refused before decoding."""
    n = LIMIT // 64 + 1
    data = serialize_bytes([b"a"] * n)  # 5 bytes each on the wire: far below LIMIT
    request = raw_request("identity_bytes", [("INPUT0", "BYTES", [1, n], data)])
    msg = rpc_error(INVALID, limited_stub.ModelInfer, request)
    assert msg == (
        f"input 'INPUT0' for model 'identity_bytes' declares shape [1,{n}] ({n} BYTES elements "
        f"at 64 bytes each: {n * 64} bytes), which exceeds the server's tensor size limit of "
        f"{LIMIT} bytes"
    )
    n = LIMIT // 64
    request = raw_request(
        "identity_bytes", [("INPUT0", "BYTES", [1, n], serialize_bytes([b"a"] * n))]
    )
    reply = limited_stub.ModelInfer(request)
    assert reply.raw_output_contents[0] == serialize_bytes([b"a"] * n)
