"""Every datatype through the server, bit for bit, and the `simple` model's arithmetic.

A temporary repository holds one ONNX Identity model per KServe datatype; what comes back
through tritonclient (raw) and through typed contents (raw stub) must equal, bit for bit, what
ONNX Runtime in this process returns for the same inputs (docs/protocol.md#tensors).
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import (
    DTYPES,
    MODEL_REPOSITORY,
    TYPED_FIELD,
    identity_model,
    output_arrays,
    rpc_error,
)

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

ALL = list(DTYPES)
# dims [-1] for half of them, fixed [4] for the other half
DIMS = {dt: ([-1] if i % 2 == 0 else [4]) for i, dt in enumerate(ALL)}
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_NAN_PAYLOAD = {2: 0x7E01, 4: 0x7FC00123, 8: 0x7FF8000000000123}
_NEG_NAN = {2: 0xFE00, 4: 0xFFC00000, 8: 0xFFF8000000000000}
STRINGS = [
    b"",
    b"a\x00b",
    b"\x00\x01\x02\x03",
    "h\u00e9llo \u2603 \U0001f600".encode(),
    b"plain ascii",
    b"\x7f",
    b" ",
]


def model_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


@pytest.fixture(scope="module")
def dtype_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("dtypes")
    for dt in ALL:
        identity_model(repo, model_name(dt), dt, DIMS[dt], mbs=8)
    return repo


@pytest.fixture(scope="module")
def dtype_server(server_factory, dtype_repo):
    server = server_factory(dtype_repo)
    yield server
    assert server.terminate() == 0


@pytest.fixture(scope="module")
def dclient(dtype_server):
    with grpcclient.InferenceServerClient(dtype_server.url) as c:
        yield c


@pytest.fixture(scope="module")
def dstub(dtype_server):
    channel = grpc.insecure_channel(dtype_server.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def sessions(dtype_repo) -> dict[str, ort.InferenceSession]:
    return {
        dt: ort.InferenceSession(
            str(dtype_repo / model_name(dt) / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        for dt in ALL
    }


def sample(datatype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random values with the datatype's edge cases mixed in at random positions."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[datatype][0]
    n = math.prod(shape)
    if datatype == "BYTES":
        flat = np.empty(n, dtype=object)
        for i in range(n):
            flat[i] = STRINGS[i] if i < len(STRINGS) else bytes(rng.integers(32, 127, i % 9))
        return rng.permutation(flat).reshape(shape)
    if datatype == "BOOL":
        values = rng.integers(0, 2, n).astype(bool)
        edges = np.array([True, False])
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        edges = np.array([info.min, info.max, 0, 1, info.min + 1, info.max - 1], dtype=dtype)
    else:
        info = np.finfo(dtype)
        values = (rng.standard_normal(n) * 1000).astype(dtype)
        bits = _BITS[dtype.itemsize]
        nans = np.array([_NAN_PAYLOAD[dtype.itemsize], _NEG_NAN[dtype.itemsize]], dtype=bits)
        edges = np.concatenate(
            [
                nans.view(dtype),
                np.array([np.inf, -np.inf, -0.0, 0.0, info.max, info.min], dtype=dtype),
                np.array([info.tiny, info.smallest_subnormal], dtype=dtype),
            ]
        )
    k = min(n, len(edges))
    values[:k] = edges[:k]
    return rng.permutation(values).reshape(shape)


def shape_for(datatype: str, batch: int) -> tuple[int, ...]:
    return (batch, 7) if DIMS[datatype] == [-1] else (batch, 4)


def ort_reference(session: ort.InferenceSession, datatype: str, data: np.ndarray) -> np.ndarray:
    if datatype == "BYTES":
        # ORT string tensors take str; bytes come back as UTF-8.
        text = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(data)
        out = session.run(None, {"INPUT0": text})[0]
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(out)
    return session.run(None, {"INPUT0": data})[0]


def assert_bit_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
        return
    assert got.dtype == want.dtype
    bits = _BITS[want.dtype.itemsize]
    assert np.array_equal(got.view(bits), want.view(bits))


# -- raw tensors through tritonclient -------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_raw_roundtrip_matches_in_process_ort(dclient, sessions, datatype: str, batch: int):
    shape = shape_for(datatype, batch)
    data = sample(datatype, shape, seed=batch * 100 + ALL.index(datatype))
    inp = grpcclient.InferInput("INPUT0", list(shape), datatype)
    inp.set_data_from_numpy(data)
    result = dclient.infer(model_name(datatype), [inp])
    out = result.get_output("OUTPUT0")
    assert out.datatype == datatype
    assert list(out.shape) == list(shape)
    got = result.as_numpy("OUTPUT0")
    want = ort_reference(sessions[datatype], datatype, data)
    assert_bit_identical(got, want)
    assert_bit_identical(got, data)  # an identity: also the input itself


# -- typed contents through the raw stub ---------------------------------------------------------


@pytest.mark.parametrize("datatype", list(TYPED_FIELD))
def test_typed_contents_decode_from_raw_output(dstub, sessions, datatype: str) -> None:
    shape = shape_for(datatype, 3)
    data = sample(datatype, shape, seed=7 + ALL.index(datatype))
    request = pb.ModelInferRequest(model_name=model_name(datatype), id=f"typed-{datatype}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=list(shape))
    getattr(tensor.contents, TYPED_FIELD[datatype]).extend(data.reshape(-1).tolist())
    response = dstub.ModelInfer(request)
    assert response.id == f"typed-{datatype}"
    assert not response.outputs[0].HasField("contents")  # always raw
    got = output_arrays(response)["OUTPUT0"]
    want = ort_reference(sessions[datatype], datatype, data)
    if want.dtype.kind == "f":
        # typed floats travel as protobuf float/double: compare values, NaN and the sign of zero
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))
    else:
        assert_bit_identical(got, want)


def test_fp16_has_no_typed_field(dstub) -> None:
    request = pb.ModelInferRequest(model_name="id_fp16")
    tensor = request.inputs.add(name="INPUT0", datatype="FP16", shape=shape_for("FP16", 1))
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    msg = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, dstub.ModelInfer, request)
    assert msg == (
        "unexpected explicit tensor data for input tensor 'INPUT0' for model 'id_fp16' of type "
        "'FP32', expected datatype 'FP16'"
    )


def test_narrow_ints_keep_low_bytes(dstub) -> None:
    # INT8/INT16 ride in int_contents, UINT8/UINT16 in uint_contents
    for datatype, values in [
        ("INT8", [-128, 127, -1, 0]),
        ("INT16", [-32768, 32767, -1, 0]),
        ("UINT8", [0, 255, 1, 128]),
        ("UINT16", [0, 65535, 1, 32768]),
    ]:
        request = pb.ModelInferRequest(model_name=model_name(datatype))
        tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape_for(datatype, 1))
        n = math.prod(shape_for(datatype, 1))
        getattr(tensor.contents, TYPED_FIELD[datatype]).extend((values * n)[:n])
        got = output_arrays(dstub.ModelInfer(request))["OUTPUT0"]
        assert got.dtype == DTYPES[datatype][0]
        assert got.reshape(-1).tolist() == (values * n)[:n]


# -- simple: arithmetic, outputs, ids and versions -----------------------------------------------


@pytest.fixture(scope="module")
def simple_session() -> ort.InferenceSession:
    path = MODEL_REPOSITORY / "simple" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def simple_inputs(batch: int, seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(-(2**30), 2**30, (batch, 16), dtype=np.int32)
    b = rng.integers(-(2**30), 2**30, (batch, 16), dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


@pytest.mark.parametrize("batch", range(1, 9))
def test_simple_add_sub_for_every_batch_size(client, simple_session, batch: int) -> None:
    inputs, a, b = simple_inputs(batch, seed=batch)
    result = client.infer("simple", inputs)
    sum_, diff = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert sum_.dtype == np.int32 and sum_.shape == (batch, 16)
    np.testing.assert_array_equal(sum_, a + b)
    np.testing.assert_array_equal(diff, a - b)
    want = simple_session.run(None, {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(sum_, want[0])
    np.testing.assert_array_equal(diff, want[1])


def test_requested_output_subset(client) -> None:
    inputs, a, b = simple_inputs(2, seed=11)
    result = client.infer("simple", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_requested_outputs_come_back_in_requested_order(client) -> None:
    inputs, a, b = simple_inputs(1, seed=12)
    wanted = [
        grpcclient.InferRequestedOutput("OUTPUT1"),
        grpcclient.InferRequestedOutput("OUTPUT0"),
    ]
    result = client.infer("simple", inputs, outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1", "OUTPUT0"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def test_no_requested_outputs_returns_all_in_config_order(client) -> None:
    inputs, a, b = simple_inputs(3, seed=13)
    result = client.infer("simple", inputs, outputs=None)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert [o.datatype for o in response.outputs] == ["INT32", "INT32"]
    assert [list(o.shape) for o in response.outputs] == [[3, 16], [3, 16]]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_response_echoes_id_name_and_concrete_version(client) -> None:
    inputs, _, _ = simple_inputs(1, seed=14)
    response = client.infer("simple", inputs, request_id="my request id").get_response()
    assert response.id == "my request id"
    assert response.model_name == "simple"
    assert response.model_version == "1"
    explicit = client.infer("simple", inputs, model_version="1").get_response()
    assert explicit.model_version == "1"
    assert explicit.id == ""
