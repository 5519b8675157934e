"""tributary.http.translate in-process: HTTP bodies to messages and back, without sockets."""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np
import pytest

from tributary.errors import (
    AlreadyExists,
    Cancelled,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from tributary.http import translate as tr
from tributary_client._proto import grpc_service_pb2 as pb


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Internal("x"), 500),
        (NotFound("x"), 404),
        (Unavailable("x"), 503),
        (Unimplemented("x"), 501),
        (InvalidArgument("x"), 400),
        (AlreadyExists("x"), 400),
        (Cancelled("x"), 400),
        (ResourceExhausted("x"), 400),
    ],
)
def test_status_codes_follow_tritons_mapping(error, status: int) -> None:
    assert tr.http_status(error) == status


def body_of(head: dict, *binaries: bytes) -> tuple[memoryview, int]:
    text = json.dumps(head).encode()
    return memoryview(text + b"".join(binaries)), len(text)


def test_binary_inputs_are_views_of_the_body_in_input_order() -> None:
    a, b = np.arange(4, dtype="<i4").tobytes(), np.ones(4, dtype="<i4").tobytes()
    head = {
        "id": "7",
        "parameters": {"priority": 2, "binary_data_output": True, "flag": True, "f": 0.5},
        "inputs": [
            {
                "name": "A",
                "datatype": "INT32",
                "shape": [4],
                "parameters": {"binary_data_size": 16},
            },
            {
                "name": "B",
                "datatype": "INT32",
                "shape": [4],
                "parameters": {"binary_data_size": 16},
            },
        ],
        "outputs": [{"name": "OUT", "parameters": {"binary_data": False, "classification": 2}}],
    }
    body, length = body_of(head, a, b)
    request, raws, plan = tr.infer_request(body, length, "m", "1")
    assert (request.model_name, request.model_version, request.id) == ("m", "1", "7")
    assert request.parameters["priority"].int64_param == 2
    assert request.parameters["flag"].bool_param is True
    assert request.parameters["f"].double_param == 0.5
    assert "binary_data_output" not in request.parameters  # HTTP-only: not forwarded
    assert [bytes(r) for r in raws] == [a, b]
    assert all(isinstance(r, memoryview) and r.obj is body.obj for r in raws)  # no copy
    assert "binary_data_size" not in request.inputs[0].parameters
    assert request.outputs[0].parameters["classification"].int64_param == 2
    assert "binary_data" not in request.outputs[0].parameters
    assert plan.wants_binary("OUT") is False and plan.wants_binary("OTHER") is True


def test_json_data_becomes_the_raw_bytes_grpc_would_send() -> None:
    assert (
        tr.json_data_to_raw([[1, 2], [3, 4]], "INT16", [2, 2], "x")
        == np.array([1, 2, 3, 4], dtype="<i2").tobytes()
    )
    assert tr.json_data_to_raw([True, False], "BOOL", [2], "x") == b"\x01\x00"
    assert (
        tr.json_data_to_raw([0.5, 2], "FP16", [2], "x") == np.array([0.5, 2], dtype="<f2").tobytes()
    )
    assert tr.json_data_to_raw([["a", ""], ["é", "xyz"]], "BYTES", [2, 2], "x") == b"".join(
        struct.pack("<I", len(s)) + s for s in (b"a", b"", "é".encode(), b"xyz")
    )


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "reason"),
    [
        ([1, 2], "INT32", [3], "'data' has 2 elements but shape [3] needs 3"),
        ([1.5], "INT32", [1], "expected integers for INT32"),
        ([300], "UINT8", [1], "out of range for UINT8"),
        ([-1], "UINT32", [1], "out of range for UINT32"),
        ([1], "BOOL", [1], "expected true/false"),
        (["a"], "FP32", [1], "expected FP32 numbers"),
        ([[1, 2], [3]], "INT32", [3], "unable to parse 'data'"),
        ([1], "BYTES", [1], "BYTES 'data' must hold strings"),
        ([1], "BF16", [1], "cannot be sent as JSON 'data'"),
        ([1], "NOPE", [1], "cannot be sent as JSON 'data'"),
    ],
)
def test_bad_json_data_is_invalid_argument(data, datatype: str, shape, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        tr.json_data_to_raw(data, datatype, shape, "x")
    assert reason in info.value.message


def test_outputs_json_or_binary_as_asked() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    response.outputs.add(name="A", datatype="FP32", shape=[2])
    response.outputs.add(name="S", datatype="BYTES", shape=[2])
    response.outputs.add(name="M", datatype="INT32", shape=[1])  # written to shared memory
    a = np.array([1.5, -2], dtype="<f4").tobytes()
    s = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    plan = tr.InferPlan(False, {"A": True}, frozenset({"M"}))
    head, binaries = tr.infer_response(response, [a, s, b""], plan)
    reply = json.loads(head)
    assert reply["id"] == "r" and reply["model_version"] == "1"
    assert reply["outputs"][0] == {
        "name": "A",
        "datatype": "FP32",
        "shape": [2],
        "parameters": {"binary_data_size": 8},
    }
    assert reply["outputs"][1]["data"] == ["hi", ""]
    assert "data" not in reply["outputs"][2] and "parameters" not in reply["outputs"][2]
    assert binaries == [a]


def test_message_json_writes_64_bit_integers_as_numbers() -> None:
    stats = pb.ModelStatisticsResponse()
    entry = stats.model_stats.add(name="m", version="1", inference_count=2**40)
    entry.inference_stats.success.count = 3
    entry.batch_stats.add(batch_size=4)
    out = tr.message_json(stats)
    model = out["model_stats"][0]
    assert model["inference_count"] == 2**40
    assert model["inference_stats"]["success"] == {"count": 3, "ns": 0}
    assert model["batch_stats"][0]["batch_size"] == 4


@pytest.mark.parametrize(
    ("length", "reason"),
    [(10_000, "outside the request body"), (-1, "outside the request body")],
)
def test_header_length_must_fit_the_body(length: int, reason: str) -> None:
    body, _ = body_of({"inputs": []})
    with pytest.raises(InvalidArgument) as info:
        tr.infer_request(body, length, "m", "")
    assert reason in info.value.message


def test_deep_nesting_is_a_clean_400() -> None:
    with pytest.raises(InvalidArgument) as info:
        tr.parse_json(b"[" * 50_000 + b"]" * 50_000)
    assert "nested too deeply" in info.value.message


def test_load_request_decodes_files_and_keeps_config_text() -> None:
    request = tr.load_request(
        "m", {"parameters": {"config": '{"max_batch_size": 2}', "file:1/model.onnx": "AAE="}}
    )
    assert request.parameters["config"].string_param == '{"max_batch_size": 2}'
    assert request.parameters["file:1/model.onnx"].bytes_param == b"\x00\x01"
    with pytest.raises(InvalidArgument):
        tr.load_request("m", {"parameters": {"file:x": "!!"}})
    with pytest.raises(InvalidArgument):
        tr.load_request("m", {"parameters": {"config": [1]}})


def test_trace_settings_shapes() -> None:
    assert tr.trace_update({"trace_rate": "10", "trace_level": ["TIMESTAMPS"], "x": None}) == {
        "trace_rate": ["10"],
        "trace_level": ["TIMESTAMPS"],
        "x": None,
    }
    assert tr.trace_json({"trace_level": ["OFF"], "trace_rate": ["1000"]}) == {
        "trace_level": ["OFF"],
        "trace_rate": "1000",
    }
    with pytest.raises(InvalidArgument):
        tr.trace_update({"trace_rate": 5})


def test_grpc_code_is_what_the_status_comes_from() -> None:
    class Odd(InvalidArgument):
        code = grpc.StatusCode.NOT_FOUND

    assert tr.http_status(Odd("x")) == 404
