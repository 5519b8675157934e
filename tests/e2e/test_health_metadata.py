"""Health, metadata, config and repository RPCs as tritonclient, raw stubs and grpc.health see them.

Mirrors what Triton's simple_grpc_health_metadata example checks (docs/protocol.md,
docs/model-config.md), against the session server over model_repository/.
"""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY, rpc_error, triton_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tributary_client._proto import grpc_service_pb2 as pb

HEADERS = {"test": "1", "dummy": "2"}
MODELS = sorted(p.name for p in MODEL_REPOSITORY.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def health_stub(server):
    channel = grpc.insecure_channel(server.url)
    yield health_pb2_grpc.HealthStub(channel)
    channel.close()


# -- liveness and readiness ------------------------------------------------------------------------


def test_server_live_and_ready_with_extra_headers(client) -> None:
    assert client.is_server_live(headers=HEADERS) is True
    assert client.is_server_ready(headers=HEADERS) is True
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_for_every_committed_model(client, model: str) -> None:
    assert client.is_model_ready(model, headers=HEADERS) is True
    assert client.is_model_ready(model, "1") is True


@pytest.mark.parametrize(
    ("model", "version"),
    [("no_such_model", ""), ("simple", "2"), ("simple", "abc"), ("simple", "-1")],
)
def test_model_ready_false_is_ok_not_an_error(client, stub, model: str, version: str) -> None:
    # docs/protocol.md: unknown model, absent version or bad version string -> ready=false, OK.
    assert client.is_model_ready(model, version) is False
    assert stub.ModelReady(pb.ModelReadyRequest(name=model, version=version)).ready is False


# -- server and model metadata ------------------------------------------------------------------


def test_server_metadata_default_name_and_extensions(client) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "tributary"
    assert meta.version
    # perf_analyzer reads server-side stats only when "statistics" is listed.
    for ext in ("model_configuration", "model_repository", "statistics", "classification"):
        assert ext in meta.extensions
    # only what is implemented is advertised: clients probe these before using the RPCs
    for ext in ("system_shared_memory", "cuda_shared_memory", "trace", "logging", "sequence"):
        assert ext not in meta.extensions
    as_json = client.get_server_metadata(as_json=True)
    assert as_json["name"] == "tributary"
    assert set(as_json["extensions"]) == set(meta.extensions)


def test_server_metadata_name_follows_id_flag(server_factory, tmp_path) -> None:
    import build_models

    build_models.build_simple(tmp_path)
    triton = server_factory(tmp_path, "--id=triton")
    with grpcclient.InferenceServerClient(triton.url) as c:
        assert c.get_server_metadata().name == "triton"
        assert c.is_server_ready()
    assert triton.terminate() == 0


def test_model_metadata_simple(client) -> None:
    meta = client.get_model_metadata("simple")
    assert meta.name == "simple"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    got_in = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    got_out = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    assert got_in == [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    assert got_out == [("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])]
    assert client.get_model_metadata("simple", "1") == meta


def test_model_metadata_shows_dims_not_reshape(client) -> None:
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    shapes = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert shapes == {"label": ("INT64", ["-1", "1"]), "probabilities": ("FP32", ["-1", "10"])}
    identity = client.get_model_metadata("simple_identity")
    assert [(t.datatype, list(t.shape)) for t in identity.inputs] == [("BYTES", [-1, -1])]


def test_model_metadata_unknown_model_and_version(client) -> None:
    msg = triton_error(grpc.StatusCode.NOT_FOUND, client.get_model_metadata, "no_such_model")
    assert msg == "Request for unknown model: 'no_such_model' is not found"
    msg = triton_error(grpc.StatusCode.NOT_FOUND, client.get_model_metadata, "simple", "7")
    assert msg == "Request for unknown model: 'simple' version 7 is not found"
    msg = triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.get_model_metadata, "simple", "x")
    assert "failed to get model version from specified version string 'x'" in msg


# -- model config ---------------------------------------------------------------------------------


def test_model_config_is_normalised(client) -> None:
    config = client.get_model_config("simple").config
    assert config.name == "simple"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 1
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.name == "simple"
    kind = type(group).Kind.Name(group.kind)
    assert kind in ("KIND_CPU", "KIND_GPU")
    assert group.count == (2 if kind == "KIND_CPU" else 1)
    # inputs and outputs given: no backend auto-complete, hence no dynamic batching
    assert not config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]
    assert config.optimization.input_pinned_memory.enable is True


def test_model_config_fills_preferred_batch_size(client) -> None:
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["dynamic_batching"]["preferred_batch_size"] == [64]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["probabilities"]["label_filename"] == "labels.txt"
    assert outputs["label"]["dims"] == ["1"]


def test_model_config_unknown_model(client) -> None:
    msg = triton_error(grpc.StatusCode.NOT_FOUND, client.get_model_config, "no_such_model")
    assert "Request for unknown model" in msg
    assert "'no_such_model'" in msg


# -- grpc.health.v1 ----------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_grpc_health_check_serving(health_stub, service: str) -> None:
    reply = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_watch_first_message_is_serving(health_stub) -> None:
    stream = health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    try:
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stream.cancel()


# -- repository RPCs ------------------------------------------------------------------------------


def test_repository_index_lists_every_model_ready(client) -> None:
    index = client.get_model_repository_index().models
    assert sorted(m.name for m in index) == MODELS
    for entry in index:
        assert (entry.version, entry.state, entry.reason) == ("1", "READY", "")
    ready = client.get_model_repository_index(as_json=True)
    assert len(ready["models"]) == len(MODELS)


def test_repository_index_ready_filter(stub) -> None:
    reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert sorted(m.name for m in reply.models) == MODELS


def test_repository_index_rejects_repository_name(stub) -> None:
    msg = rpc_error(
        grpc.StatusCode.UNIMPLEMENTED,
        stub.RepositoryIndex,
        pb.RepositoryIndexRequest(repository_name="elsewhere"),
    )
    assert msg == "'repository_name' specification is not supported"


def test_load_and_unload_refused_in_none_mode(client) -> None:
    text = "explicit model load / unload is not allowed if polling is enabled"
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.load_model, "simple") == text
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.unload_model, "simple") == text
    assert client.is_model_ready("simple")  # nothing was unloaded


@pytest.mark.parametrize(
    "name, version, message",
    [
        ("no_such_model", "", "requested model 'no_such_model' is not available"),
        ("no_such_model", "1", "requested model 'no_such_model' is not available"),
        ("simple", "7", "requested model version is not available for model 'simple'"),
        ("simple", "abc", "requested model version is not available for model 'simple'"),
        ("simple", "-1", "requested model version is not available for model 'simple'"),
    ],
)
def test_statistics_for_unavailable_models(client, name, version, message) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics(name, version)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == message


def test_statistics_scopes(client) -> None:
    every = client.get_inference_statistics("", as_json=True)["model_stats"]
    names = {s["name"] for s in every}
    assert {"simple", "simple_string", "digits"} <= names
    one = client.get_inference_statistics("simple", "1", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("simple", "1")]
    latest = client.get_inference_statistics("simple", as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in latest] == [("simple", "1")]
