"""The real grpcurl binary against the session server, through server reflection only.

No .proto files are passed: everything grpcurl knows comes from reflection, including the
model_config.proto dependency (docs/protocol.md, grpcurl notes).
"""

from __future__ import annotations

import base64
import json
import subprocess

import numpy as np
import pytest
from e2e_support import MODEL_REPOSITORY, deserialize_bytes, serialize_bytes

SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def grpcurl_run(grpcurl, server):
    def run(*args: str, data: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        cmd = [grpcurl, "-plaintext", "-max-time", "30"]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        cmd += [server.url, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if ok:
            assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        return proc

    return run


def test_list_services(grpcurl_run) -> None:
    services = set(grpcurl_run("list").stdout.split())
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert services & {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


def test_list_methods(grpcurl_run) -> None:
    methods = set(grpcurl_run("list", SERVICE).stdout.split())
    for rpc in ("ServerLive", "ServerReady", "ModelMetadata", "ModelInfer", "ModelConfig"):
        assert f"{SERVICE}.{rpc}" in methods
    assert len(methods) == 20  # Triton's full RPC list


def test_describe_service(grpcurl_run) -> None:
    text = grpcurl_run("describe", SERVICE).stdout
    assert f"{SERVICE} is a service" in text
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns " in text


def test_describe_model_config_from_dependency(grpcurl_run) -> None:
    text = grpcurl_run("describe", "inference.ModelConfig").stdout
    assert "inference.ModelConfig is a message" in text
    assert "max_batch_size = 4" in text
    assert "instance_group = 7" in text


def test_server_ready(grpcurl_run) -> None:
    assert json.loads(grpcurl_run(f"{SERVICE}/ServerReady").stdout) == {"ready": True}


def test_model_metadata(grpcurl_run) -> None:
    meta = json.loads(grpcurl_run(f"{SERVICE}/ModelMetadata", data={"name": "simple"}).stdout)
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": ["-1", "16"]}


def test_model_metadata_unknown_model_status(grpcurl_run) -> None:
    proc = grpcurl_run(f"{SERVICE}/ModelMetadata", data={"name": "nope"}, ok=False)
    assert proc.returncode == 64 + 5  # grpcurl exits 64 + status code; NOT_FOUND = 5
    assert "Request for unknown model: 'nope' is not found" in proc.stderr


def test_model_infer_with_typed_json(grpcurl_run) -> None:
    a = list(range(16))
    b = [3] * 16
    request = {
        "model_name": "simple",
        "id": "from-grpcurl",
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "INT32",
                "shape": [1, 16],
                "contents": {"int_contents": a},
            },
            {
                "name": "INPUT1",
                "datatype": "INT32",
                "shape": ["1", "16"],
                "contents": {"int_contents": b},
            },
        ],
    }
    reply = json.loads(grpcurl_run(f"{SERVICE}/ModelInfer", data=request).stdout)
    assert reply["id"] == "from-grpcurl"
    assert reply["model_version"] == "1"
    assert [o["name"] for o in reply["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert reply["outputs"][0]["shape"] == ["1", "16"]
    raw = [np.frombuffer(base64.b64decode(r), np.int32) for r in reply["raw_output_contents"]]
    np.testing.assert_array_equal(raw[0], np.array(a) + np.array(b))
    np.testing.assert_array_equal(raw[1], np.array(a) - np.array(b))


def test_model_infer_with_base64_raw_and_bytes(grpcurl_run) -> None:
    values = [b"x\x00y", "\u2603".encode(), b""]
    request = {
        "model_name": "simple_identity",
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 3]}],
        "raw_input_contents": [base64.b64encode(serialize_bytes(values)).decode()],
    }
    reply = json.loads(grpcurl_run(f"{SERVICE}/ModelInfer", data=request).stdout)
    assert deserialize_bytes(base64.b64decode(reply["raw_output_contents"][0])) == values


def test_health_check(grpcurl_run) -> None:
    reply = json.loads(grpcurl_run("grpc.health.v1.Health/Check").stdout)
    assert reply == {"status": "SERVING"}
    named = grpcurl_run("grpc.health.v1.Health/Check", data={"service": SERVICE}).stdout
    assert json.loads(named) == {"status": "SERVING"}


REFLECTION = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
LIST = {"list_services": ""}


def _reflect(channel, service: str, request):
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(call(iter([request]), timeout=10))


def test_reflection_v1_and_v1alpha(server) -> None:
    """grpcurl 1.9+ and Postman ask for grpc.reflection.v1 first; older tools for v1alpha.
    The messages are the same under both packages, so v1alpha's classes read v1's bytes."""
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    channel = grpc.insecure_channel(server.url)
    try:
        for service in REFLECTION:
            reply = _reflect(channel, service, reflection_pb2.ServerReflectionRequest(**LIST))
            names = {s.name for s in reply.list_services_response.service}
            assert {
                "inference.GRPCInferenceService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names
            reply = _reflect(
                channel,
                service,
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            )
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(b)
                for b in reply.file_descriptor_response.file_descriptor_proto
            ]
            assert [f.package for f in files] == ["grpc.reflection.v1"]
            assert files[0].service[0].method[0].input_type == (
                ".grpc.reflection.v1.ServerReflectionRequest"
            )
    finally:
        channel.close()


def test_reflection_can_be_turned_off(server_factory) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    srv = server_factory(MODEL_REPOSITORY, "--allow-grpc-reflection=false")
    channel = grpc.insecure_channel(srv.url)
    try:
        for service in REFLECTION:
            with pytest.raises(grpc.RpcError) as info:
                _reflect(channel, service, reflection_pb2.ServerReflectionRequest(**LIST))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def test_stateful_accumulator_through_grpcurl(grpcurl_run) -> None:
    """Typed JSON contents and sequence parameters: the server keeps the running sum."""
    values = [5, -2, 10]
    sums = []
    for i, v in enumerate(values):
        params = {"sequence_id": {"string_param": "grpcurl-acc"}}
        if i == 0:
            params["sequence_start"] = {"bool_param": True}
        if i == len(values) - 1:
            params["sequence_end"] = {"bool_param": True}
        request = {
            "model_name": "accumulator",
            "parameters": params,
            "inputs": [
                {
                    "name": "INPUT",
                    "datatype": "INT32",
                    "shape": [1, 1],
                    "contents": {"int_contents": [v]},
                }
            ],
        }
        reply = json.loads(grpcurl_run(f"{SERVICE}/ModelInfer", data=request).stdout)
        raw = base64.b64decode(reply["raw_output_contents"][0])
        sums.append(int(np.frombuffer(raw, dtype="<i4")[0]))
    assert sums == np.cumsum(values).tolist()


def test_ensemble_infer(grpcurl_run) -> None:
    """digits_pipeline with typed contents: grpcurl's JSON, the ensemble's reply."""
    x = np.load(MODEL_REPOSITORY / "digits" / "expected_outputs.npz")
    raw = np.round(x["input"][:2].astype(np.float32) * 255 / 16).astype(np.uint8)
    request = {
        "model_name": "digits_pipeline",
        "inputs": [
            {
                "name": "PIXELS",
                "datatype": "UINT8",
                "shape": [2, 64],
                "contents": {"uint_contents": [int(v) for v in raw.ravel()]},
            }
        ],
        "outputs": [{"name": "LABEL"}, {"name": "TOP_LABELS"}],
    }
    reply = json.loads(grpcurl_run(f"{SERVICE}/ModelInfer", data=request).stdout)
    assert reply["model_name"] == "digits_pipeline"
    assert [o["name"] for o in reply["outputs"]] == ["LABEL", "TOP_LABELS"]
    label = np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), dtype="<i8")
    np.testing.assert_array_equal(label, x["label"][:2])
    top = np.frombuffer(base64.b64decode(reply["raw_output_contents"][1]), dtype="<i8")
    assert top.reshape(2, 3)[:, 0].tolist() == x["label"][:2].tolist()
