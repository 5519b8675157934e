"""Client system shared memory (docs/protocol.md#shared-memory, docs/limits.md#shared-memory).

A real server with --allow-client-shm=true, driven by tritonclient and its shm utilities the way
Triton's example clients (simple_grpc_shm_client, simple_grpc_shm_string_client,
reuse_infer_objects_client) drive it, plus raw-stub requests for every error text, hostile keys
and bounds, an unregister while a request is in flight, and the default (off) behaviour.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import build_models
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from e2e_support import MODEL_REPOSITORY, rpc_error, triton_error, wait_for
from onnx import TensorProto, helper, numpy_helper
from tritonclient import utils

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc

DISABLED = (
    "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."
)
_keys = itertools.count()


def _key(tag: str) -> str:
    return f"/tributary_test_{os.getpid()}_{tag}_{next(_keys)}"


@pytest.fixture
def regions():
    """Create shm regions for a test; every one is destroyed afterwards."""
    made: list = []

    def make(tag: str, size: int):
        key = _key(tag)
        handle = shm.create_shared_memory_region(key[1:], key, size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _slow_model(root: Path) -> None:
    """OUTPUT0 = INPUT0 (FP32 [16]), after 24 chained 2048x1024x1024 matmuls (~100 GFLOP)."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [16])
    w = numpy_helper.from_array(np.eye(1024, dtype=np.float32) * 0.5, "W")
    a = numpy_helper.from_array(np.ones((), dtype=np.float32), "A")
    shape = numpy_helper.from_array(np.array([2048, 1024], dtype=np.int64), "S")
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "Z")
    # A depends on the input, so ONNX Runtime cannot fold the chain away at load time
    nodes = [
        helper.make_node("ReduceSum", ["INPUT0"], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "Z"], ["rz"]),
        helper.make_node("Add", ["A", "rz"], ["a1"]),
        helper.make_node("Expand", ["a1", "S"], ["A1"]),
    ]
    last = "A1"
    for i in range(24):
        nodes.append(helper.make_node("MatMul", [last, "W"], [f"m{i}"]))
        last = f"m{i}"
    nodes += [
        helper.make_node("ReduceSum", [last], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "Z"], ["z"]),
        helper.make_node("Add", ["INPUT0", "z"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(nodes, "slow", [x], [y], initializer=[w, a, zero, shape])
    config = (
        'name: "slow"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]\n'
    )
    build_models.write_model(root, "slow", build_models.make_model(graph), config)


@pytest.fixture(scope="module")
def shm_server(server_factory, tmp_path_factory):
    extra = tmp_path_factory.mktemp("shm_repo")
    _slow_model(extra)
    return server_factory([MODEL_REPOSITORY, extra], "--allow-client-shm=true")


@pytest.fixture(scope="module")
def sclient(shm_server):
    c = grpcclient.InferenceServerClient(shm_server.url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture(scope="module")
def sstub(shm_server):
    channel = grpc.insecure_channel(shm_server.url)
    yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "sclient" in request.fixturenames:
        request.getfixturevalue("sclient").unregister_system_shared_memory()


def _simple_inputs() -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return a, np.ones((1, 16), dtype=np.int32)


# -- off by default --------------------------------------------------------------------------


def region_inputs(region: str, nbytes: int) -> list[grpcclient.InferInput]:
    """`simple`'s INPUT0 and INPUT1 from one registered region, back to back."""
    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
    ]
    inputs[0].set_shared_memory(region, nbytes)
    inputs[1].set_shared_memory(region, nbytes, offset=nbytes)
    return inputs


def test_off_by_default(client, stub) -> None:
    for call, args in [
        (client.register_system_shared_memory, ("r", "/k", 64)),
        (client.unregister_system_shared_memory, ()),
        (client.unregister_system_shared_memory, ("r",)),
        (client.register_cuda_shared_memory, ("r", b"eA==", 0, 64)),
        (client.unregister_cuda_shared_memory, ()),
    ]:
        assert triton_error(grpc.StatusCode.UNIMPLEMENTED, call, *args) == DISABLED
    assert client.get_system_shared_memory_status(as_json=True) == {}
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    inp = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    inp.set_shared_memory("r", 64)
    raw = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    raw.set_data_from_numpy(np.zeros((1, 16), np.int32))
    text = triton_error(grpc.StatusCode.NOT_FOUND, client.infer, "simple", [inp, raw])
    assert text == "Unable to find shared memory region: 'r'"
    assert "system_shared_memory" not in client.get_server_metadata().extensions


# -- Triton's example clients, as call sequences -------------------------------------------------


def test_simple_shm_client_sequence(sclient, regions) -> None:
    """simple_grpc_shm_client: inputs at two offsets of one region, outputs in another."""
    sclient.unregister_system_shared_memory()
    sclient.unregister_cuda_shared_memory()
    a, b = _simple_inputs()
    nbytes = a.nbytes
    out_key, out_handle = regions("out", nbytes * 2)
    sclient.register_system_shared_memory("output_data", out_key, nbytes * 2)
    in_key, in_handle = regions("in", nbytes * 2)
    shm.set_shared_memory_region(in_handle, [a])
    shm.set_shared_memory_region(in_handle, [b], offset=nbytes)
    sclient.register_system_shared_memory("input_data", in_key, nbytes * 2)

    inputs = region_inputs("input_data", nbytes)
    outputs = [
        grpcclient.InferRequestedOutput("OUTPUT0"),
        grpcclient.InferRequestedOutput("OUTPUT1"),
    ]
    outputs[0].set_shared_memory("output_data", nbytes)
    outputs[1].set_shared_memory("output_data", nbytes, offset=nbytes)
    result = sclient.infer("simple", inputs, outputs=outputs)

    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert list(response.raw_output_contents) == [b"", b""]
    out0 = result.get_output("OUTPUT0")
    got0 = shm.get_contents_as_numpy(
        out_handle, utils.triton_to_np_dtype(out0.datatype), out0.shape
    )
    out1 = result.get_output("OUTPUT1")
    got1 = shm.get_contents_as_numpy(
        out_handle, utils.triton_to_np_dtype(out1.datatype), out1.shape, offset=nbytes
    )
    np.testing.assert_array_equal(got0, a + b)
    np.testing.assert_array_equal(got1, a - b)

    status = sclient.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["input_data"] == {
        "name": "input_data",
        "key": in_key,
        "byte_size": str(nbytes * 2),
    }
    assert set(status) == {"input_data", "output_data"}
    one = sclient.get_system_shared_memory_status("output_data", as_json=True)["regions"]
    assert set(one) == {"output_data"}
    sclient.unregister_system_shared_memory()
    assert sclient.get_system_shared_memory_status(as_json=True) == {}
    assert "system_shared_memory" in sclient.get_server_metadata().extensions


def test_simple_shm_string_client_sequence(sclient, regions) -> None:
    """simple_grpc_shm_string_client: BYTES inputs and outputs, length-prefixed in shm."""
    a = np.array([str(x).encode() for x in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    ser_a, ser_b = utils.serialize_byte_tensor(a), utils.serialize_byte_tensor(b)
    size_a, size_b = utils.serialized_byte_size(ser_a), utils.serialized_byte_size(ser_b)
    in0_key, in0 = regions("s_in0", size_a)
    in1_key, in1 = regions("s_in1", size_b)
    shm.set_shared_memory_region(in0, [ser_a])
    shm.set_shared_memory_region(in1, [ser_b])
    sclient.register_system_shared_memory("input0_data", in0_key, size_a)
    sclient.register_system_shared_memory("input1_data", in1_key, size_b)
    out_size = 64 * 16
    out0_key, out0 = regions("s_out0", out_size)
    out1_key, out1 = regions("s_out1", out_size)
    sclient.register_system_shared_memory("output0_data", out0_key, out_size)
    sclient.register_system_shared_memory("output1_data", out1_key, out_size)

    inputs = [
        grpcclient.InferInput("INPUT0", [1, 16], "BYTES"),
        grpcclient.InferInput("INPUT1", [1, 16], "BYTES"),
    ]
    inputs[0].set_shared_memory("input0_data", size_a)
    inputs[1].set_shared_memory("input1_data", size_b)
    outputs = [
        grpcclient.InferRequestedOutput("OUTPUT0"),
        grpcclient.InferRequestedOutput("OUTPUT1"),
    ]
    outputs[0].set_shared_memory("output0_data", out_size)
    outputs[1].set_shared_memory("output1_data", out_size)
    result = sclient.infer("simple_string", inputs, outputs=outputs)

    o0 = result.get_output("OUTPUT0")
    got0 = shm.get_contents_as_numpy(out0, np.object_, o0.shape)
    o1 = result.get_output("OUTPUT1")
    got1 = shm.get_contents_as_numpy(out1, np.object_, o1.shape)
    assert [int(x) for x in got0.reshape(-1)] == [x + 1 for x in range(16)]
    assert [int(x) for x in got1.reshape(-1)] == [x - 1 for x in range(16)]


def test_reuse_infer_objects_sequence(sclient, regions) -> None:
    """reuse_infer_objects_client: the same objects in shm, then unset_shared_memory + raw;
    and one input in shm beside one raw input (the raw buffer belongs to the raw input)."""
    a, b = _simple_inputs()
    nbytes = a.nbytes
    in_key, in_handle = regions("r_in", nbytes * 2)
    shm.set_shared_memory_region(in_handle, [a, b])
    sclient.register_system_shared_memory("in", in_key, nbytes * 2)
    out_key, out_handle = regions("r_out", nbytes * 2)
    sclient.register_system_shared_memory("out", out_key, nbytes * 2)
    i0, i1 = region_inputs("in", nbytes)
    o0 = grpcclient.InferRequestedOutput("OUTPUT0")
    o1 = grpcclient.InferRequestedOutput("OUTPUT1")
    o0.set_shared_memory("out", nbytes)
    o1.set_shared_memory("out", nbytes, offset=nbytes)
    sclient.infer("simple", [i0, i1], outputs=[o0, o1])
    got = shm.get_contents_as_numpy(out_handle, np.int32, [2, 16])
    np.testing.assert_array_equal(got, np.concatenate([a + b, a - b]))

    # mixed: INPUT0 raw, INPUT1 in shm; outputs back on the wire
    i0.set_data_from_numpy(a * 3)  # drops its shared memory parameters
    o0.unset_shared_memory()
    o1.unset_shared_memory()
    result = sclient.infer("simple", [i1, i0], outputs=[o0, o1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 3 + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a * 3 - b)

    i1.set_data_from_numpy(b)
    result = sclient.infer("simple", [i0, i1], outputs=[o0, o1])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 3 + b)


# -- RPC errors ------------------------------------------------------------------------------


def test_register_errors(sclient, regions) -> None:
    key, _ = regions("e", 128)
    sclient.register_system_shared_memory("r", key, 64)
    text = triton_error(
        grpc.StatusCode.ALREADY_EXISTS, sclient.register_system_shared_memory, "r", key, 64
    )
    assert text == "shared memory region 'r' already in manager"
    missing = _key("missing")
    text = triton_error(
        grpc.StatusCode.INTERNAL, sclient.register_system_shared_memory, "m", missing, 64
    )
    assert text == f"Unable to open shared memory region: '{missing}'"
    for offset, size in [(0, 129), (64, 65), (128, 1), (2**62, 2**62), (0, 2**63)]:
        text = triton_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            sclient.register_system_shared_memory,
            "b",
            key,
            size,
            offset,
        )
        assert "exceeds the 128 bytes" in text, text
    triton_error(
        grpc.StatusCode.INVALID_ARGUMENT, sclient.register_system_shared_memory, "z", key, 0
    )
    triton_error(
        grpc.StatusCode.INVALID_ARGUMENT, sclient.register_system_shared_memory, "", key, 8
    )
    # unregister of an unknown name is fine; status of one is NOT_FOUND
    sclient.unregister_system_shared_memory("nope")
    text = triton_error(grpc.StatusCode.NOT_FOUND, sclient.get_system_shared_memory_status, "nope")
    assert text == "Unable to find system shared memory region: 'nope'"


def test_cuda_shared_memory_without_gpus(sclient) -> None:
    text = triton_error(
        grpc.StatusCode.INVALID_ARGUMENT, sclient.register_cuda_shared_memory, "c", b"eA==", 0, 64
    )
    assert text == "failed to register CUDA shared memory region: 'c', GPUs not supported"
    sclient.unregister_cuda_shared_memory()
    sclient.unregister_cuda_shared_memory("c")
    assert sclient.get_cuda_shared_memory_status(as_json=True) == {}


def test_hostile_keys(sclient, regions, tmp_path) -> None:
    key, _ = regions("target", 64)
    link = Path("/dev/shm") / f"tributary_test_{os.getpid()}_link"
    fifo = Path("/dev/shm") / f"tributary_test_{os.getpid()}_fifo"
    folder = Path("/dev/shm") / f"tributary_test_{os.getpid()}_dir"
    link.symlink_to(Path("/dev/shm") / key[1:])
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "plain").write_bytes(b"\0" * 64)
    try:
        hostile = [
            "/" + link.name,  # a symlink, even to a valid object
            "/" + fifo.name,  # would block a plain open
            "/" + folder.name,
            "/etc/passwd",
            "../etc/passwd",
            "/../" + key[1:],
            key[1:] + "/..",
            str(tmp_path / "plain"),
            "/a\0b",
            "/",
            "",
            ".",
            "..",
            "/" + "x" * 300,
        ]
        for bad in hostile:
            text = triton_error(
                grpc.StatusCode.INTERNAL, sclient.register_system_shared_memory, "h", bad, 64
            )
            assert text.startswith("Unable to open shared memory region: "), (bad, text)
        assert sclient.get_system_shared_memory_status(as_json=True) == {}
        # the same object by its plain name, without the leading "/", is fine
        sclient.register_system_shared_memory("ok", key[1:], 64)
    finally:
        link.unlink()
        fifo.unlink()
        folder.rmdir()


def test_region_cap(sclient, regions) -> None:
    key, _ = regions("cap", 64)
    for i in range(1024):
        sclient.register_system_shared_memory(f"c{i}", key, 64)
    text = triton_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, sclient.register_system_shared_memory, "x", key, 64
    )
    assert "the server allows 1024 registered regions" in text
    sclient.unregister_system_shared_memory()
    sclient.register_system_shared_memory("x", key, 64)


@pytest.fixture
def sparse():
    """Sparse shm objects of any size (ftruncate: no memory is used); removed afterwards."""
    made: list[Path] = []

    def make(tag: str, size: int) -> str:
        key = _key(tag)
        path = Path("/dev/shm") / key[1:]
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        made.append(path)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return key

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def test_mapped_bytes_default_cap(sclient, sparse) -> None:
    """A 64 TiB sparse object costs nothing to make; mapping a few dozen such windows used to
    exhaust the server's address space (then any request's allocation failed and the server
    stopped answering). By default at most 64 GiB are mapped at once."""
    key = sparse("huge", 1 << 46)
    for i in range(100):
        text = triton_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            sclient.register_system_shared_memory,
            f"huge{i}",
            key,
            1 << 46,
        )
    assert text == (
        "failed to register shared memory region 'huge99': 70368744177664 more bytes would "
        "exceed the 68719476736 bytes of shared memory the server maps at once "
        "(--client-shm-max-bytes; 0 mapped now)"
    )
    assert sclient.get_system_shared_memory_status(as_json=True) == {}
    assert sclient.is_server_live()


def test_mapped_bytes_cap(server_factory, regions, sparse) -> None:
    cap = 3 << 30
    srv = server_factory(
        MODEL_REPOSITORY, "--allow-client-shm=true", f"--client-shm-max-bytes={cap}"
    )
    c = grpcclient.InferenceServerClient(srv.url)
    big = sparse("big", 1 << 46)
    small, handle = regions("small", 128)
    refused = grpc.StatusCode.RESOURCE_EXHAUSTED
    text = triton_error(refused, c.register_system_shared_memory, "whole", big, 1 << 46)
    assert f"exceed the {cap} bytes" in text and "(--client-shm-max-bytes" in text, text
    c.register_system_shared_memory("a", big, 2 << 30)
    c.register_system_shared_memory("b", big, 1 << 30, 2 << 30)  # exactly at the cap
    text = triton_error(refused, c.register_system_shared_memory, "c", small, 128)
    assert text.endswith(f"(--client-shm-max-bytes; {cap} mapped now)"), text
    assert c.is_server_live()
    # unregistering gives the bytes back; the server still serves requests in shared memory
    c.unregister_system_shared_memory("b")
    c.register_system_shared_memory("in", small, 128)
    a, b = _simple_inputs()
    shm.set_shared_memory_region(handle, [a, b])
    inputs = region_inputs("in", 64)
    result = c.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    c.unregister_system_shared_memory()
    c.register_system_shared_memory("whole", big, cap)
    assert c.is_server_live()
    c.unregister_system_shared_memory()
    c.close()


def test_key_prefix(server_factory, regions) -> None:
    """--client-shm-key-prefix: another process's object outside the prefix cannot be
    registered, so it can be neither read nor written through a model (shm_xtenant.py)."""
    prefix = f"tributary_test_{os.getpid()}_ok"
    srv = server_factory(
        MODEL_REPOSITORY, "--allow-client-shm=true", f"--client-shm-key-prefix=/{prefix}"
    )
    c = grpcclient.InferenceServerClient(srv.url)
    secret, handle = regions("secret", 64)  # exists, the server's user can open it
    shm.set_shared_memory_region(handle, [np.frombuffer(b"SECRET".ljust(64, b"."), np.uint8)])
    missing = _key("missing")
    for key in (secret, secret[1:], missing, "/etc/passwd", "/" + prefix[:-1]):
        text = triton_error(
            grpc.StatusCode.INVALID_ARGUMENT, c.register_system_shared_memory, "x", key, 64
        )
        assert text == (
            f"failed to register shared memory region 'x': key '{key}' does not start with "
            f"'{prefix}' (--client-shm-key-prefix)"
        ), text
    assert c.get_system_shared_memory_status(as_json=True) == {}
    # inside the prefix: as usual, with or without the leading "/"
    ok, ok_handle = regions("ok", 128)
    assert ok[1:].startswith(prefix)
    c.register_system_shared_memory("in", ok, 128)
    c.register_system_shared_memory("in2", ok[1:], 64)
    inside_missing = f"/{prefix}_missing"
    text = triton_error(
        grpc.StatusCode.INTERNAL, c.register_system_shared_memory, "m", inside_missing, 64
    )
    assert text == f"Unable to open shared memory region: '{inside_missing}'"
    a, b = _simple_inputs()
    shm.set_shared_memory_region(ok_handle, [a, b])
    inputs = region_inputs("in", 64)
    np.testing.assert_array_equal(c.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)
    c.unregister_system_shared_memory()
    c.close()


# -- inference errors (raw stub: exact parameters) -------------------------------------------


def _param(**kw) -> pb.InferParameter:
    return pb.InferParameter(**kw)


def _request(in0: dict | None, in1_raw: bool = True, outputs=()) -> pb.ModelInferRequest:
    a, b = _simple_inputs()
    request = pb.ModelInferRequest(model_name="simple")
    t0 = request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    for k, v in (in0 or {}).items():
        t0.parameters[k].CopyFrom(v)
    request.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    if in0 is None:
        request.raw_input_contents.append(a.tobytes())
    if in1_raw:
        request.raw_input_contents.append(b.tobytes())
    for name, params in outputs:
        out = request.outputs.add(name=name)
        for k, v in params.items():
            out.parameters[k].CopyFrom(v)
    return request


def test_infer_errors(sclient, sstub, regions) -> None:
    key, handle = regions("ie", 128)
    a, _ = _simple_inputs()
    shm.set_shared_memory_region(handle, [a])
    sclient.register_system_shared_memory("r", key, 128)
    region = _param(string_param="r")
    size = _param(int64_param=64)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (
            {"shared_memory_region": _param(int64_param=1), "shared_memory_byte_size": size},
            bad,
            "invalid value type for 'shared_memory_region' parameter for tensor 'INPUT0', "
            "expected string_param.",
        ),
        (
            {"shared_memory_region": region},
            bad,
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' "
            "parameter for tensor 'INPUT0'",
        ),
        (
            {"shared_memory_offset": _param(int64_param=0), "shared_memory_byte_size": size},
            bad,
            "'shared_memory_offset' can not be specified without 'shared_memory_region' "
            "parameter for tensor 'INPUT0'",
        ),
        (
            {"shared_memory_region": _param(string_param="zz"), "shared_memory_byte_size": size},
            grpc.StatusCode.NOT_FOUND,
            "Unable to find shared memory region: 'zz'",
        ),
    ]
    invalid = "Invalid offset + byte size for shared memory region: 'r'"
    for offset, nbytes in [(-1, 64), (0, -64), (65, 64), (128, 1), (2**62, 2**62), (0, 2**63 - 1)]:
        params = {
            "shared_memory_region": region,
            "shared_memory_byte_size": _param(int64_param=nbytes),
            "shared_memory_offset": _param(int64_param=offset),
        }
        cases.append((params, bad, invalid))
    for params, code, text in cases:
        assert rpc_error(code, sstub.ModelInfer, _request(params)) == text
    # a window that fits but does not match the shape
    params = {"shared_memory_region": region, "shared_memory_byte_size": _param(int64_param=32)}
    assert "input byte size mismatch for input 'INPUT0'" in rpc_error(
        bad, sstub.ModelInfer, _request(params)
    )
    # typed contents beside shared memory
    request = _request({"shared_memory_region": region, "shared_memory_byte_size": size}, False)
    request.inputs[0].contents.int_contents.extend(range(16))
    request.inputs[1].contents.int_contents.extend(range(16))
    assert rpc_error(bad, sstub.ModelInfer, request) == (
        "unexpected 'content' provided when using shared memory for input tensor 'INPUT0' for "
        "model 'simple'"
    )
    # a raw buffer for the shm input too: one more than the inputs not in shared memory
    request = _request({"shared_memory_region": region, "shared_memory_byte_size": size})
    request.raw_input_contents.append(a.tobytes())
    assert "expected 1 raw_input_contents" in rpc_error(bad, sstub.ModelInfer, request)
    # outputs: too small, and with classification
    small = {"shared_memory_region": region, "shared_memory_byte_size": _param(int64_param=8)}
    text = rpc_error(
        grpc.StatusCode.INTERNAL, sstub.ModelInfer, _request(None, outputs=[("OUTPUT0", small)])
    )
    assert text == (
        "shared memory size specified with the request for output 'OUTPUT0' (8 bytes) should "
        "be at least 64 bytes to hold the results"
    )
    both = dict(small, classification=_param(int64_param=2))
    text = rpc_error(bad, sstub.ModelInfer, _request(None, outputs=[("OUTPUT0", both)]))
    assert text == "output can't set both 'shared_memory_region' and 'classification'"
    # the server is fine and the region still works
    params = {"shared_memory_region": region, "shared_memory_byte_size": size}
    response = sstub.ModelInfer(_request(params))
    assert (
        np.frombuffer(response.raw_output_contents[0], np.int32).tolist()
        == (a + 1).ravel().tolist()
    )


def test_stream_infer_with_shm(sclient, regions) -> None:
    a, b = _simple_inputs()
    key, handle = regions("st", 128)
    shm.set_shared_memory_region(handle, [a, b])
    sclient.register_system_shared_memory("st", key, 128)
    results: list = []
    done = threading.Event()

    def callback(result, error) -> None:
        results.append((result, error))
        if len(results) == 3:
            done.set()

    i0, i1 = region_inputs("st", 64)
    sclient.start_stream(callback)
    try:
        for n in range(3):
            sclient.async_stream_infer("simple", [i0, i1], request_id=str(n))
        assert done.wait(30)
    finally:
        sclient.stop_stream()
    for result, error in results:
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


# -- lifetime ---------------------------------------------------------------------------------


def _mapped(pid: int, key: str) -> bool:
    return f"/dev/shm{key}" in Path(f"/proc/{pid}/maps").read_text()


def test_unregister_while_in_flight(shm_server, sclient, regions) -> None:
    """Unregistering a region a running request reads and writes does not unmap it under the
    request: the request succeeds with the right data, later requests get NOT_FOUND, and the
    mapping goes once the request is done."""
    data = np.arange(16, dtype=np.float32)
    key, handle = regions("fly", 128)
    shm.set_shared_memory_region(handle, [data])
    sclient.register_system_shared_memory("fly", key, 128)
    pid = shm_server.proc.pid
    assert _mapped(pid, key)
    i0 = grpcclient.InferInput("INPUT0", [16], "FP32")
    i0.set_shared_memory("fly", 64)
    o0 = grpcclient.InferRequestedOutput("OUTPUT0")
    o0.set_shared_memory("fly", 64, offset=64)
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(sclient.infer("slow", [i0], outputs=[o0]))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    sclient.unregister_system_shared_memory("fly")
    assert thread.is_alive(), ("the slow model was not slow enough to test this", outcome)
    assert _mapped(pid, key)  # still mapped: the running request holds it
    text = triton_error(grpc.StatusCode.NOT_FOUND, sclient.infer, "slow", [i0], outputs=[o0])
    assert text == "Unable to find shared memory region: 'fly'"
    thread.join(60)
    assert not isinstance(outcome[0], Exception), outcome
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [16], 64), data)
    wait_for(lambda: not _mapped(pid, key), 10, "the unregistered region to be unmapped")
    assert sclient.is_server_live()
