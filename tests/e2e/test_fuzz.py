"""Fuzzing ModelInfer and ModelStreamInfer: undecodable bytes and hostile-but-decodable requests.

What this file pins down ("bad input gets a clear error and costs nothing else"):
- bytes that are not a ModelInferRequest are INVALID_ARGUMENT, never INTERNAL ("Exception
  deserializing request!" is grpcio's answer when the server lets grpcio parse for it);
- nothing a client sends becomes INTERNAL, UNKNOWN or a hang (DEADLINE_EXCEEDED under a 10 s
  per-call timeout): each RPC has one error boundary, and INTERNAL is kept for real bugs;
- a stream answers a bad request with an `error_message` reply, in request order, and stays
  open: a valid request after the garbage, on the same stream, gets a valid answer;
- after all that the server is still live, ready, serving and no bigger: 3,000 undecodable
  requests cost no memory (grpcio leaks ~15 KB for each one it fails to deserialize).

Hypothesis runs derandomized with a fixed example budget, no database and no shrinking, so a CI
run is reproducible and bounded in time even when the server hangs (a hang costs one timeout,
not one per shrink step); the falsifying example is still printed. Strategies only send BYTES
elements that are decimal numbers or not UTF-8 at all, because `simple_string` casts its strings
to INT32 inside ONNX Runtime, and a model failing on data it cannot cast is a backend error
(INTERNAL, as in Triton), not a server bug.

The fuzz runs against its own server (module-scoped), so a crash or leak found here cannot
spill into other test modules, and the memory numbers are this file's traffic only.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from e2e_support import MODEL_REPOSITORY, TYPED_FIELD, rss_kib, serialize_bytes, simple_request
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
TIMEOUT = 10.0  # seconds per call: anything slower counts as a hang
INT32_MAX = 2**31 - 1  # the server's default message and tensor size limits
Code = grpc.StatusCode
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAVAILABLE, Code.UNIMPLEMENTED}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The example repository's signatures (model_repository/*/config.pbtxt):
# name -> (max_batch_size, [(input, datatype, dims)], [outputs])
SIGNATURES: dict[str, tuple[int, list[tuple[str, str, list[int]]], list[str]]] = {
    "simple": (8, [("INPUT0", "INT32", [16]), ("INPUT1", "INT32", [16])], ["OUTPUT0", "OUTPUT1"]),
    "simple_int8": (8, [("INPUT0", "INT8", [16]), ("INPUT1", "INT8", [16])], ["OUTPUT0"]),
    "simple_string": (
        8,
        [("INPUT0", "BYTES", [16]), ("INPUT1", "BYTES", [16])],
        ["OUTPUT0", "OUTPUT1"],
    ),
    "simple_identity": (8, [("INPUT0", "BYTES", [-1])], ["OUTPUT0"]),
    "digits": (64, [("input", "FP32", [64])], ["label", "probabilities"]),
}
ELEMENT_SIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
    "BYTES": 4,  # the length prefix: the least any element takes
}
_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(server_factory) -> Iterator[Any]:
    server = server_factory(MODEL_REPOSITORY)
    yield server
    server.terminate(timeout=20)


@pytest.fixture(scope="module")
def channel(fuzz_server) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(
        fuzz_server.url,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def infer_bytes(channel) -> Any:
    """ModelInfer, bytes in and bytes out: the server, not our client, parses the request."""
    return channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)


@pytest.fixture(scope="module")
def stream_bytes(channel) -> Any:
    return channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)


# -- wire helpers -----------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def parse(payload: bytes) -> pb.ModelInferRequest | None:
    """What the server's parser will see; None when the bytes are not a ModelInferRequest."""
    try:
        return pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        return None


def declares_huge(request: pb.ModelInferRequest | None, payload_len: int) -> bool:
    """RESOURCE_EXHAUSTED is fair only for a message over the limit or a tensor implying one."""
    if payload_len > INT32_MAX:
        return True
    if request is None:
        return False
    for tensor in request.inputs:
        count = math.prod(abs(d) for d in tensor.shape)
        if count * ELEMENT_SIZE.get(tensor.datatype, 1) > INT32_MAX:
            return True
    return False


def call_unary(infer_bytes: Any, payload: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        reply = infer_bytes(payload, timeout=TIMEOUT)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", b""
    return Code.OK, "", reply


def check_unary(infer_bytes: Any, payload: bytes) -> grpc.StatusCode:
    """Send one ModelInfer and hold its answer to the rules in the module docstring."""
    request = parse(payload)
    code, details, reply = call_unary(infer_bytes, payload)
    allowed = ALLOWED | (
        {Code.RESOURCE_EXHAUSTED} if declares_huge(request, len(payload)) else set()
    )
    assert code in allowed, f"{code.name}: {details!r} for {len(payload)} bytes {payload[:300]!r}"
    if request is None:
        assert code == Code.INVALID_ARGUMENT, f"undecodable bytes got {code.name}: {details!r}"
    if code == Code.OK:
        response = pb.ModelInferResponse.FromString(reply)
        assert request is not None
        assert response.model_name == request.model_name
        assert response.id == request.id
        assert len(response.outputs) == len(response.raw_output_contents)
    else:
        assert details, f"{code.name} without a message"
    return code


VALID_ID = "valid-after-fuzz"


def valid_simple() -> tuple[bytes, np.ndarray, np.ndarray]:
    request, a, b = simple_request(batch=2, request_id=VALID_ID)
    return request.SerializeToString(), a, b


def assert_valid_simple_reply(response: pb.ModelInferResponse, a: np.ndarray, b: np.ndarray):
    assert response.id == VALID_ID
    outputs = {
        o.name: np.frombuffer(raw, np.int32).reshape(tuple(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + b)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - b)


def run_stream(
    stream_bytes: Any, payloads: Sequence[bytes], *, check_ids: bool
) -> list[pb.ModelStreamInferResponse]:
    """Send all payloads on one stream, then a valid request; check the stream's answers.

    One reply per request, in request order; every error reply carries error_message; the
    stream itself ends OK and the valid request after the garbage gets a correct answer.
    With `check_ids` (payloads we serialized ourselves), every reply, error or not, echoes its
    request's id (docs/protocol.md#streams). Mutated bytes may parse in protobuf yet be refused by a
    stricter server scanner (e.g. a top-level group), so their ids are not checked.
    """
    valid, a, b = valid_simple()
    sent = [*payloads, valid]
    try:
        replies = [
            pb.ModelStreamInferResponse.FromString(r)
            for r in stream_bytes(iter(sent), timeout=TIMEOUT)
        ]
    except grpc.RpcError as err:
        pytest.fail(
            f"stream ended {err.code().name}: {err.details()!r} after {[p[:120] for p in sent]}"
        )
    assert len(replies) == len(sent), f"{len(sent)} requests, {len(replies)} replies: {replies}"
    for payload, reply in zip(payloads, replies, strict=False):
        request = parse(payload)
        if request is None:
            assert reply.error_message, f"undecodable {payload[:120]!r} answered without error"
        if reply.error_message:
            assert "internal error" not in reply.error_message.lower(), reply.error_message
            if check_ids and request is not None:
                assert reply.infer_response.id == request.id, reply
        else:
            assert request is not None
            assert reply.infer_response.id == request.id
            assert reply.infer_response.model_name == request.model_name
    last = replies[-1]
    assert not last.error_message, f"valid request after fuzz failed: {last.error_message}"
    assert_valid_simple_reply(last.infer_response, a, b)
    return replies


# -- a. byte-level fuzz -----------------------------------------------------------------------


def _seeds() -> list[bytes]:
    """Valid requests of every shape the mutations start from."""
    simple, _, _ = simple_request(batch=1, request_id="seed-0", outputs=["OUTPUT0"])
    simple.parameters["priority"].uint64_param = 1
    simple.parameters["timeout"].int64_param = 1_000_000
    strings = pb.ModelInferRequest(model_name="simple_string", model_version="1", id="seed-1")
    for name in ("INPUT0", "INPUT1"):
        strings.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
        strings.raw_input_contents.append(serialize_bytes([str(i).encode() for i in range(16)]))
    identity = pb.ModelInferRequest(model_name="simple_identity", id="seed-2")
    tensor = identity.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 3])
    tensor.contents.bytes_contents.extend([b"a", b"bc", b"\xc3\xa9"])
    digits = pb.ModelInferRequest(model_name="digits", id="seed-3")
    tensor = digits.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(np.linspace(0, 16, 128).tolist())
    out = digits.outputs.add(name="probabilities")
    out.parameters["classification"].int64_param = 3
    typed = pb.ModelInferRequest(model_name="simple", id="seed-4")
    typed.parameters["sequence_id"].int64_param = 7
    for name in ("INPUT0", "INPUT1"):
        t = typed.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend(range(16))
    return [m.SerializeToString() for m in (simple, strings, identity, digits, typed)]


SEEDS = _seeds()
# Length-delimited tags of ModelInferRequest's fields 1..7, a varint tag, and invalid ones:
# field 0, wire types 3/4 (groups), 6 and 7 (undefined).
LEN_TAGS = [(field << 3) | 2 for field in range(1, 8)]
ODD_TAGS = [0x00, 0x02, 0x0B, 0x0C, 0x0E, 0x0F, 0x3B, 0x3C, 0x3E, 0x3F]
HUGE_LENGTHS = [2**28, 2**31 - 1, 2**31, 2**32 + 5, 2**63, 2**64 - 1]


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ["flip", "truncate", "insert", "overwrite", "delete", "random", "huge", "odd"]
                + ["append_seed", "overlong_varint"]
            )
        )
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            pos = min(pos, len(data) - 1)
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif kind == "random":
            data = bytearray(draw(st.binary(max_size=256)))
        elif kind == "huge":  # a field whose declared length runs far past the end
            length = draw(st.sampled_from(HUGE_LENGTHS) | st.integers(2**20, 2**64 - 1))
            data[pos:pos] = bytes([draw(st.sampled_from(LEN_TAGS))]) + varint(length)
        elif kind == "odd":
            data[pos:pos] = bytes([draw(st.sampled_from(ODD_TAGS))]) + draw(st.binary(max_size=4))
        elif kind == "append_seed":  # concatenation merges: repeated fields grow
            data += draw(st.sampled_from(SEEDS))
        elif kind == "overlong_varint":
            data[pos:pos] = b"\x08" + b"\xff" * draw(st.integers(10, 20)) + b"\x01"
    return bytes(data)


TRUNCATED = SEEDS[0][: len(SEEDS[0]) // 2]
HUGE_FIELD = b"\x0a" + varint(2**63) + b"simple"
HUGE_RAW = SEEDS[0] + b"\x3a" + varint(2**31 - 1) + b"\0" * 64  # raw_input_contents claiming 2 GiB


@settings(FUZZ, max_examples=1000)
@given(payload=mutated_bytes())
@example(payload=b"")
@example(payload=TRUNCATED)
@example(payload=HUGE_FIELD)
@example(payload=HUGE_RAW)
@example(payload=b"\x0b\x0c")  # an empty group
@example(payload=b"\xff" * 11)  # a varint tag that never ends
def test_mutated_bytes_unary(infer_bytes, payload: bytes) -> None:
    check_unary(infer_bytes, payload)


@settings(FUZZ, max_examples=100)
@given(payloads=st.lists(mutated_bytes(), min_size=1, max_size=4))
@example(payloads=[TRUNCATED])
@example(payloads=[HUGE_FIELD, HUGE_RAW, b"\xff" * 11])
def test_mutated_bytes_stream_stays_open(stream_bytes, payloads: list[bytes]) -> None:
    run_stream(stream_bytes, payloads, check_ids=False)


def test_every_undecodable_example_really_is_undecodable() -> None:
    """Guards the oracles above: these bytes must not parse as a ModelInferRequest."""
    for payload in (TRUNCATED, HUGE_FIELD, HUGE_RAW, b"\xff" * 11, *UNDECODABLE):
        assert parse(payload) is None, payload[:40]


# -- b. structure-aware fuzz ------------------------------------------------------------------

INT64 = st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63 - 1, -(2**63), 1_000_000]) | st.integers(
    -(2**63), 2**63 - 1
)
UINT64 = st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
DIM = st.sampled_from(
    [0, 1, 2, 8, 9, 16, 64, 65, -1, -2, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
) | st.integers(-3, 20)
SHAPE = st.lists(DIM, max_size=8) | st.integers(9, 300).map(lambda n: [1] * n)
DATATYPES = sorted(ELEMENT_SIZE)
DATATYPE = st.sampled_from(DATATYPES + ["", "int32", "FP8", "STRING", "TYPE_INT32", "UINT128"])
NAMES = st.sampled_from([*SIGNATURES, "", "missing", "SIMPLE", "simple ", "../simple"]) | st.text(
    max_size=40
)
VERSIONS = (
    st.sampled_from(
        ["", "1", "2", "0", "-1", "+1", "01", " 1", "1.0", "1e3", "0x1", "١", "1" * 19]
        + [str(2**63), str(2**63 - 1), str(-(2**63)), str(2**64), "9" * 5000, "-" + "9" * 5000]
    )
    | st.integers(-(2**70), 2**70).map(str)
    | st.text(max_size=20)
)
IDS = st.sampled_from(["", "id-1", "x" * 1000]) | st.text(max_size=16)
PARAM_KEYS = st.sampled_from(
    ["priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "custom"]
    + ["triton_enable_empty_final_response", "triton_", "triton_grpc_error", "headers"]
    + ["binary_data_output", "shared_memory_region", "classification", ""]
) | st.text(max_size=12)
TENSOR_PARAM_KEYS = st.sampled_from(
    ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]
    + ["classification", "binary_data", "binary_data_size", "custom"]
)


def _param(kind: str, value: Any) -> pb.InferParameter:
    return pb.InferParameter(**{kind: value}) if kind else pb.InferParameter()


PARAM_VALUES = (
    st.booleans().map(lambda v: _param("bool_param", v))
    | INT64.map(lambda v: _param("int64_param", v))
    | UINT64.map(lambda v: _param("uint64_param", v))
    | st.text(max_size=16).map(lambda v: _param("string_param", v))
    | st.floats().map(lambda v: _param("double_param", v))
    | st.just(_param("", None))
)


def _numeric_strings(rng: np.random.Generator, n: int) -> list[bytes]:
    return [str(v).encode() for v in rng.integers(-50_000, 50_000, n)]


def _raw_exact(rng: np.random.Generator, datatype: str, count: int, bad_utf8: bool) -> bytes:
    if datatype == "BYTES":
        values = _numeric_strings(rng, count)
        if bad_utf8 and values:
            values[int(rng.integers(count))] = b"\xff\xfe"
        return serialize_bytes(values)
    return rng.bytes(count * ELEMENT_SIZE[datatype])


def _typed_exact(contents: Any, rng: np.random.Generator, datatype: str, count: int) -> None:
    field = TYPED_FIELD.get(datatype)
    if field is None:  # FP16/BF16 have no typed field: send something anyway
        contents.int_contents.extend(range(count))
    elif datatype == "BYTES":
        contents.bytes_contents.extend(_numeric_strings(rng, count))
    else:
        values = rng.integers(0, 100, count).astype(_NUMPY[datatype])
        getattr(contents, field).extend(values.tolist())


@st.composite
def typed_random(draw: st.DrawFn) -> pb.InferTensorContents:
    """Any typed field, any values: out-of-range for the datatype, NaN, many fields at once."""
    contents = pb.InferTensorContents()
    fields = draw(st.lists(st.sampled_from(sorted(set(TYPED_FIELD.values()))), max_size=3))
    n = st.lists
    for field in fields:
        if field == "bool_contents":
            values = draw(n(st.booleans(), max_size=20))
        elif field in ("int_contents",):
            values = draw(n(st.integers(-(2**31), 2**31 - 1), max_size=20))
        elif field == "uint_contents":
            values = draw(n(st.integers(0, 2**32 - 1), max_size=20))
        elif field == "int64_contents":
            values = draw(n(INT64, max_size=20))
        elif field == "uint64_contents":
            values = draw(n(UINT64, max_size=20))
        elif field in ("fp32_contents", "fp64_contents"):
            values = draw(n(st.floats(width=32 if field == "fp32_contents" else 64), max_size=20))
        else:
            values = draw(n(st.sampled_from([b"1", b"-7", b"\xff", b"42"]), max_size=20))
        getattr(contents, field).extend(values)
    return contents


def _implied_count(shape: Sequence[int]) -> int | None:
    """Elements a shape declares, when it is small enough to really send."""
    if any(d < 0 for d in shape):
        return None
    count = math.prod(shape)
    return count if count <= 4096 else None


@st.composite
def plausible_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A real model's request, right or nearly right, then up to three things broken."""
    model = draw(st.sampled_from(sorted(SIGNATURES)))
    mbs, inputs, outputs = SIGNATURES[model]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.sampled_from([1, 1, 2, mbs, mbs + 1, 0]))
    typed = draw(st.booleans())
    request = pb.ModelInferRequest(
        model_name=model, model_version=draw(st.sampled_from(["", "", "", "1", "2"])), id=draw(IDS)
    )
    for name, datatype, dims in inputs:
        shape = [batch] + [d if d > 0 else draw(st.integers(0, 5)) for d in dims]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        count = math.prod(shape)
        if typed:
            _typed_exact(tensor.contents, rng, datatype, count)
        else:
            bad_utf8 = draw(st.sampled_from([False, False, False, True]))
            request.raw_input_contents.append(_raw_exact(rng, datatype, count, bad_utf8))
    for name in draw(st.lists(st.sampled_from(outputs), max_size=3, unique=True)):
        out = request.outputs.add(name=name)
        if draw(st.sampled_from([False, False, False, True])):
            top_k = st.integers(1, 5).map(lambda k: _param("int64_param", k)) | PARAM_VALUES
            out.parameters["classification"].CopyFrom(draw(top_k))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):  # often whole, to reach a model
        _break(draw, request)
    return request


def _break(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    kind = draw(
        st.sampled_from(
            ["datatype", "dim", "shape", "drop_input", "dup_input", "extra_raw", "drop_raw"]
            + ["mix", "byte_size", "param", "tensor_param", "output", "version", "input_name"]
        )
    )
    tensors = request.inputs
    index = draw(st.integers(0, max(len(tensors) - 1, 0)))
    if kind == "datatype" and tensors:
        tensors[index].datatype = draw(DATATYPE)
    elif kind == "dim" and tensors and tensors[index].shape:
        shape = tensors[index].shape
        shape[draw(st.integers(0, len(shape) - 1))] = draw(DIM)
    elif kind == "shape" and tensors:
        del tensors[index].shape[:]
        tensors[index].shape.extend(draw(SHAPE))
    elif kind == "drop_input" and tensors:
        del tensors[index]
        if index < len(request.raw_input_contents):
            del request.raw_input_contents[index]
    elif kind == "dup_input" and tensors:
        tensors.add().CopyFrom(tensors[index])
        if request.raw_input_contents:
            request.raw_input_contents.append(request.raw_input_contents[-1])
    elif kind == "extra_raw":
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif kind == "drop_raw" and request.raw_input_contents:
        del request.raw_input_contents[-1]
    elif kind == "mix" and tensors:
        tensors[index].contents.CopyFrom(draw(typed_random()))
    elif kind == "byte_size" and request.raw_input_contents:
        raw = request.raw_input_contents
        i = min(index, len(raw) - 1)
        raw[i] = raw[i][: draw(st.integers(0, len(raw[i])))] + draw(st.binary(max_size=8))
    elif kind == "param":
        request.parameters[draw(PARAM_KEYS)].CopyFrom(draw(PARAM_VALUES))
    elif kind == "tensor_param" and tensors:
        tensors[index].parameters[draw(TENSOR_PARAM_KEYS)].CopyFrom(draw(PARAM_VALUES))
    elif kind == "output":
        out = request.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "label", "nope", ""])))
        out.parameters[draw(TENSOR_PARAM_KEYS)].CopyFrom(draw(PARAM_VALUES))
    elif kind == "version":
        request.model_version = draw(VERSIONS)
    elif kind == "input_name" and tensors:
        tensors[index].name = draw(st.sampled_from(["INPUT0", "INPUT1", "input", "X", ""]))


@st.composite
def random_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Anything the schema allows: wild names, versions, datatypes, shapes, parameters."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    request = pb.ModelInferRequest(model_name=draw(NAMES), model_version=draw(VERSIONS))
    request.id = draw(IDS)
    for key, value in draw(st.dictionaries(PARAM_KEYS, PARAM_VALUES, max_size=4)).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["INPUT0", "INPUT1", "input"]) | st.text(max_size=8))
        tensor = request.inputs.add(name=name, datatype=draw(DATATYPE), shape=draw(SHAPE))
        for key, value in draw(
            st.dictionaries(TENSOR_PARAM_KEYS, PARAM_VALUES, max_size=2)
        ).items():
            tensor.parameters[key].CopyFrom(value)
        mode = draw(st.sampled_from(["exact_raw", "random_raw", "typed_exact", "typed", "none"]))
        count = _implied_count(tensor.shape)
        if mode == "exact_raw" and count is not None and tensor.datatype in ELEMENT_SIZE:
            request.raw_input_contents.append(_raw_exact(rng, tensor.datatype, count, False))
        elif mode in ("exact_raw", "random_raw"):
            request.raw_input_contents.append(draw(st.binary(max_size=128)))
        elif mode == "typed_exact" and count is not None:
            _typed_exact(tensor.contents, rng, tensor.datatype, count)
        elif mode == "typed":
            tensor.contents.CopyFrom(draw(typed_random()))
    for _ in range(draw(st.integers(-2, 2))):  # raw counts that do not match the inputs
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "label"]) | st.text()))
        for key, value in draw(
            st.dictionaries(TENSOR_PARAM_KEYS, PARAM_VALUES, max_size=2)
        ).items():
            out.parameters[key].CopyFrom(value)
    return request


REQUESTS = plausible_requests() | random_requests()


def _version_5000_digits() -> pb.ModelInferRequest:
    request, _, _ = simple_request(batch=1)
    request.model_version = "9" * 5000
    return request


def _huge_params() -> pb.ModelInferRequest:
    request, _, _ = simple_request(batch=1)
    request.parameters["timeout"].int64_param = 2**62
    request.parameters["priority"].uint64_param = 2**64 - 1
    request.parameters["sequence_id"].int64_param = -1
    return request


def _negative_timeout() -> pb.ModelInferRequest:
    request, _, _ = simple_request(batch=1)
    request.parameters["timeout"].int64_param = -1
    return request


def _huge_shape() -> pb.ModelInferRequest:
    request, _, _ = simple_request(batch=1)
    request.inputs[0].shape[:] = [2**62, 2**62]
    return request


EXPLICIT = [_version_5000_digits(), _huge_params(), _negative_timeout(), _huge_shape()]


@settings(FUZZ, max_examples=600)
@given(request=REQUESTS)
@example(request=EXPLICIT[0])
@example(request=EXPLICIT[1])
@example(request=EXPLICIT[2])
@example(request=EXPLICIT[3])
def test_hostile_requests_unary(infer_bytes, request: pb.ModelInferRequest) -> None:
    check_unary(infer_bytes, request.SerializeToString())


@settings(FUZZ, max_examples=100)
@given(requests=st.lists(REQUESTS, min_size=1, max_size=4))
@example(requests=EXPLICIT)
def test_hostile_requests_stream(stream_bytes, requests: list[pb.ModelInferRequest]) -> None:
    for i, request in enumerate(requests):
        request.id = f"fuzz-{i}"  # so each reply can be matched to its request
    run_stream(stream_bytes, [r.SerializeToString() for r in requests], check_ids=True)


@settings(FUZZ, max_examples=40)
@given(
    model=st.sampled_from(sorted(SIGNATURES)),
    buffers=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_raw_input_count_must_match_inputs(infer_bytes, model: str, buffers: int, seed: int):
    """A correct request but for the number of raw buffers: always INVALID_ARGUMENT."""
    _, inputs, _ = SIGNATURES[model]
    assume(buffers != len(inputs))
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, dims in inputs:
        shape = [1] + [d if d > 0 else 3 for d in dims]
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(_raw_exact(rng, datatype, math.prod(shape), False))
    code, details, _ = call_unary(infer_bytes, request.SerializeToString())
    assert code == Code.OK, f"the unbroken request failed: {code.name} {details}"
    raw = request.raw_input_contents
    if buffers < len(raw):
        del raw[buffers:]
    else:
        raw.extend([raw[0]] * (buffers - len(raw)))
    code, details, _ = call_unary(infer_bytes, request.SerializeToString())
    assert code == Code.INVALID_ARGUMENT, (
        f"{buffers} raw buffers for {len(inputs)} inputs: {code.name} {details!r}"
    )


# -- c. the server after the fuzz ------------------------------------------------------------


def test_server_healthy_after_fuzz(fuzz_server, channel, infer_bytes) -> None:
    assert fuzz_server.proc.poll() is None, "server exited during the fuzz"
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    started = time.monotonic()
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    payload, a, b = valid_simple()
    code, details, reply = call_unary(infer_bytes, payload)
    assert code == Code.OK, f"{code.name}: {details}"
    assert_valid_simple_reply(pb.ModelInferResponse.FromString(reply), a, b)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < 5, "health answers were slow after the fuzz"


def test_fuzz_left_no_tracebacks(fuzz_server) -> None:
    """Every bad request was answered at the boundary: nothing reached a log as a crash."""
    log = fuzz_server.log()
    found = [m.start() for m in re.finditer("Traceback", log)]
    assert not found, f"{len(found)} tracebacks; first:\n{log[found[0] : found[0] + 3000]}"


def _undecodable(n: int) -> list[bytes]:
    """n distinct messages that fail to parse (a length prefix running past the end)."""
    head = SEEDS[0][:40]
    return [head + b"\x3a" + varint(1_000_000 + i) + b"\0" * (i % 7) for i in range(n)]


UNDECODABLE = _undecodable(64)


def _send_all(infer_bytes: Any, count: int, window: int = 32) -> Counter:
    """`count` undecodable requests, `window` in flight at a time; their status codes."""
    codes: Counter = Counter()
    for start in range(0, count, window):
        futures = [
            infer_bytes.future(UNDECODABLE[(start + i) % len(UNDECODABLE)], timeout=TIMEOUT)
            for i in range(min(window, count - start))
        ]
        for future in futures:
            err = future.exception()
            codes[err.code().name if err is not None else "OK"] += 1
    return codes


def test_undecodable_requests_cost_no_memory(fuzz_server, infer_bytes) -> None:
    """3,000 undecodable requests after a warm-up: RSS stays within 20 MiB (grpcio: ~45 MB)."""
    pid = fuzz_server.proc.pid
    _send_all(infer_bytes, 500)  # warm-up: thread stacks, arenas, caches
    before = rss_kib(pid)
    codes = _send_all(infer_bytes, 3000)
    grown = rss_kib(pid) - before
    assert grown < 20 * 1024, f"server RSS grew {grown} KiB over 3,000 requests ({dict(codes)})"
    assert codes == Counter({"INVALID_ARGUMENT": 3000}), dict(codes)
