"""Model repositories as a user lays them out: broken models, version policies, auto-complete,
an empty repository (docs/protocol.md,
docs/model-config.md, docs/flags.md).

Each server here exists because its repository or flags are the point; they are shared per
module.
"""

from __future__ import annotations

from pathlib import Path

import build_models
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import triton_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

BROKEN = ("bad_io", "bad_syntax", "corrupt")


def client_for(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.url)


def health_status(server) -> int:
    with grpc.insecure_channel(server.url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return reply.status


def simple_inputs(batch: int = 1) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 5, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


# -- broken models beside healthy ones ----------------------------------------------------------


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("broken")
    build_models.build_simple(repo, "good")
    # config expects an input the graph does not have
    bad_io = build_models.simple_config("bad_io").replace('"INPUT1"', '"INPUT9"')
    build_models.build_simple(repo, "bad_io", config=bad_io)
    corrupt = build_models.build_simple(repo, "corrupt")
    (corrupt / "1" / "model.onnx").write_bytes(b"this is not an ONNX protobuf")
    syntax = build_models.build_simple(repo, "bad_syntax")
    (syntax / "config.pbtxt").write_text('name: "bad_syntax"\nmax_batch_size: [ 8\n')
    return repo


@pytest.fixture(scope="module")
def strict(server_factory, broken_repo):
    server = server_factory(broken_repo, "--exit-on-error=false")
    yield server
    assert server.terminate() == 0


@pytest.fixture(scope="module")
def lax(server_factory, broken_repo):
    server = server_factory(broken_repo, "--exit-on-error=false", "--strict-readiness=false")
    yield server
    assert server.terminate() == 0


def test_exit_on_error_by_default(server_factory, broken_repo) -> None:
    server = server_factory(broken_repo, start=False)
    server.launch()
    code = server.wait_exit(timeout=60)
    assert code != 0
    assert not server.port_file.exists()  # never announced itself as serving
    log = server.log()
    for name in BROKEN:
        assert f"'{name}'" in log, f"log does not name {name}:\n{log}"
    assert "failed to load" in log


def test_healthy_models_serve_beside_broken_ones(strict) -> None:
    with client_for(strict) as c:
        assert c.is_server_live()
        assert c.is_model_ready("good")
        inputs, a, b = simple_inputs(2)
        result = c.infer("good", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        for name in BROKEN:
            assert c.is_model_ready(name) is False


def test_strict_readiness_is_false_with_a_broken_model(strict) -> None:
    with client_for(strict) as c:
        assert c.is_server_ready() is False
    assert health_status(strict) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_readiness_without_strictness(lax) -> None:
    with client_for(lax) as c:
        assert c.is_server_ready() is True
        assert c.is_model_ready("good") is True
        assert c.is_model_ready("corrupt") is False
    assert health_status(lax) == health_pb2.HealthCheckResponse.SERVING


def test_index_shows_broken_models_with_reasons(strict, broken_repo) -> None:
    with client_for(strict) as c:
        index = c.get_model_repository_index().models
    by_name: dict[str, list] = {}
    for entry in index:
        by_name.setdefault(entry.name, []).append(entry)
    assert sorted(by_name) == ["bad_io", "bad_syntax", "corrupt", "good"]
    assert [(e.version, e.state, e.reason) for e in by_name["good"]] == [("1", "READY", "")]
    for name in BROKEN:
        assert all(e.state == "UNAVAILABLE" and e.reason for e in by_name[name]), by_name[name]
    assert "INPUT9" in by_name["bad_io"][0].reason
    assert "model.onnx" in by_name["corrupt"][0].reason
    syntax_reason = by_name["bad_syntax"][0].reason
    assert "bad_syntax/config.pbtxt" in syntax_reason
    # clients are told paths relative to the repository, never the server's absolute ones
    assert all(str(broken_repo) not in e.reason for e in index)


def test_infer_on_broken_model_is_refused(strict) -> None:
    inputs, _, _ = simple_inputs()
    with client_for(strict) as c:
        msg = triton_error(grpc.StatusCode.NOT_FOUND, c.infer, "corrupt", inputs)
        assert msg == "Request for unknown model: 'corrupt' has no available versions"
        msg = triton_error(grpc.StatusCode.UNAVAILABLE, c.infer, "corrupt", inputs, "1")
        assert msg == "Request for unknown model: 'corrupt' version 1 is not at ready state"


# -- version policies and auto-complete -----------------------------------------------------------


def add_constant_model(value: int) -> object:
    """OUTPUT0 = INPUT0 + value over INT32 [N,4]: each version answers differently."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.INT32, [], [value])
            ),
            helper.make_node("Add", ["INPUT0", "c"], ["OUTPUT0"]),
        ],
        f"add_{value}",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT32, ["N", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["N", 4])],
    )
    return build_models.make_model(graph)


POLICIES = {
    "latest2": ("{ latest { num_versions: 2 } }", ["2", "3"]),
    "every": ("{ all { } }", ["1", "2", "3"]),
    "chosen": ("{ specific { versions: [ 1, 3 ] } }", ["1", "3"]),
}


def versioned_config(name: str, policy: str) -> str:
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f"version_policy: {policy}\n"
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 4 ] } ]\n'
    )


@pytest.fixture(scope="module")
def versions_server(server_factory, tmp_path_factory):
    repo = tmp_path_factory.mktemp("versions")
    for name, (policy, _) in POLICIES.items():
        for v in (1, 2, 3):
            build_models.write_model(
                repo,
                name,
                add_constant_model(100 * v),
                versioned_config(name, policy),
                versions=(v,),
            )
    build_models.build_identity(repo, "auto", "FP32", write_config=False)
    fixed = build_models.identity_graph("INT64", (3,))
    build_models.write_model(repo, "auto_fixed", fixed, None)
    server = server_factory(repo)
    yield server
    assert server.terminate() == 0


def add_constant(c: grpcclient.InferenceServerClient, model: str, version: str = ""):
    x = np.array([[1, 2, 3, 4]], dtype=np.int32)
    inp = grpcclient.InferInput("INPUT0", [1, 4], "INT32")
    inp.set_data_from_numpy(x)
    result = c.infer(model, [inp], model_version=version)
    return result.get_response().model_version, result.as_numpy("OUTPUT0") - x


@pytest.mark.parametrize("model", list(POLICIES))
def test_version_policy_selects_versions(versions_server, model: str) -> None:
    expected = POLICIES[model][1]
    with client_for(versions_server) as c:
        assert list(c.get_model_metadata(model).versions) == expected
        highest = expected[-1]
        version, delta = add_constant(c, model)  # "" runs the highest READY version
        assert version == highest
        np.testing.assert_array_equal(delta, np.full((1, 4), 100 * int(highest)))
        for v in ("1", "2", "3"):
            assert c.is_model_ready(model, v) is (v in expected)
            if v in expected:
                version, delta = add_constant(c, model, v)
                assert version == v
                np.testing.assert_array_equal(delta, np.full((1, 4), 100 * int(v)))
            else:
                msg = triton_error(grpc.StatusCode.NOT_FOUND, add_constant, c, model, v)
                assert msg == f"Request for unknown model: '{model}' version {v} is not found"
        index = [e for e in c.get_model_repository_index().models if e.name == model]
        assert [(e.version, e.state) for e in index] == [(v, "READY") for v in expected]


def test_auto_complete_from_graph(versions_server) -> None:
    with client_for(versions_server) as c:
        config = c.get_model_config("auto").config
        assert config.name == "auto"
        assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
        assert config.max_batch_size == 4  # onnxruntime's default-max-batch-size
        assert config.HasField("dynamic_batching")
        assert list(config.dynamic_batching.preferred_batch_size) == [4]
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("INPUT0", 11, [-1])  # TYPE_FP32
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
            ("OUTPUT0", 11, [-1])
        ]
        data = np.arange(12, dtype=np.float32).reshape(4, 3)
        inp = grpcclient.InferInput("INPUT0", [4, 3], "FP32")
        inp.set_data_from_numpy(data)
        np.testing.assert_array_equal(c.infer("auto", [inp]).as_numpy("OUTPUT0"), data)
        too_big = grpcclient.InferInput("INPUT0", [5, 3], "FP32")
        too_big.set_data_from_numpy(np.zeros((5, 3), np.float32))
        msg = triton_error(grpc.StatusCode.INVALID_ARGUMENT, c.infer, "auto", [too_big])
        assert msg.endswith("inference request batch-size must be <= 4 for 'auto'")


def test_auto_complete_without_batching(versions_server) -> None:
    with client_for(versions_server) as c:
        config = c.get_model_config("auto_fixed").config
        assert config.max_batch_size == 0
        assert not config.HasField("dynamic_batching")
        assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT0", [3])]
        meta = c.get_model_metadata("auto_fixed")
        assert [(t.datatype, list(t.shape)) for t in meta.inputs] == [("INT64", [3])]
        inp = grpcclient.InferInput("INPUT0", [3], "INT64")
        inp.set_data_from_numpy(np.array([-1, 0, 2**62], np.int64))
        out = c.infer("auto_fixed", [inp]).as_numpy("OUTPUT0")
        assert out.tolist() == [-1, 0, 2**62]


def test_disable_auto_complete_config(server_factory, tmp_path) -> None:
    build_models.build_identity(tmp_path, "auto", "FP32", write_config=False)
    server = server_factory(tmp_path, "--disable-auto-complete-config", "--exit-on-error=false")
    with client_for(server) as c:
        assert c.is_model_ready("auto") is False
        assert c.is_server_ready() is False
        (entry,) = c.get_model_repository_index().models
        assert entry.name == "auto" and entry.state == "UNAVAILABLE"
        assert "INPUT0" in entry.reason
    assert server.terminate() == 0


def test_empty_repository_is_not_ready(server_factory, tmp_path) -> None:
    server = server_factory(tmp_path)
    with client_for(server) as c:
        assert c.is_server_live() is True
        assert c.is_server_ready() is False  # never vacuously ready
        assert list(c.get_model_repository_index().models) == []
    assert health_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.terminate() == 0
