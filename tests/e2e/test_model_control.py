"""Explicit model control: --model-control-mode=explicit, --load-model, RepositoryModelLoad and
RepositoryModelUnload as Triton's simple_grpc_model_control example and qa use them
(docs/protocol.md#errors, docs/protocol.md#repository-rpcs, docs/flags.md, docs/protocol.md).

Each test that changes what is loaded gets its own server, so no test depends on another's
leftovers; the repositories are copies, so the committed one is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY, rpc_error, triton_error
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

TRIBUTARY = Path(sys.executable).parent / "tributary"
MODELS = sorted(p.name for p in MODEL_REPOSITORY.iterdir() if p.is_dir())
POLLING = "explicit model load / unload is not allowed if polling is enabled"
EXPLICIT = "--model-control-mode=explicit"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed repository, copied: the servers here only read it."""
    target = tmp_path_factory.mktemp("control") / "models"
    shutil.copytree(MODEL_REPOSITORY, target)
    return target


@pytest.fixture
def explicit(server_factory, repo):
    """A fresh explicit-mode server with nothing loaded, and a tritonclient for it."""
    server = server_factory(repo, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as client:
        yield server, client
    assert server.terminate() == 0


def health(server) -> int:
    with grpc.insecure_channel(server.url) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )


def index(client: grpcclient.InferenceServerClient) -> list[tuple[str, str, str, str]]:
    reply = client.get_model_repository_index()
    return sorted((m.name, m.version, m.state, m.reason) for m in reply.models)


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        return reply.read().decode()


def infer_simple(client: grpcclient.InferenceServerClient, batch: int = 1) -> None:
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("simple", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def failed_poll(name: str) -> str:
    return f"failed to load '{name}', failed to poll from model repository"


# -- start-up -----------------------------------------------------------------------------------


def test_nothing_loaded_without_load_model(explicit) -> None:
    server, client = explicit
    # every directory is listed, none known to the lifecycle yet
    assert index(client) == [(name, "", "", "") for name in MODELS]
    assert client.is_server_live()
    # docs/architecture.md: ready is never vacuously true, so zero loaded models means not ready
    assert not client.is_server_ready()
    assert health(server) == NOT_SERVING
    assert not client.is_model_ready("simple")
    assert 'model="simple"' not in scrape(server)


def test_load_model_at_start_loads_only_those(server_factory, repo) -> None:
    server = server_factory(repo, EXPLICIT, "--load-model=simple")
    with grpcclient.InferenceServerClient(server.url) as client:
        expected = [(n, "1", "READY", "") if n == "simple" else (n, "", "", "") for n in MODELS]
        assert index(client) == expected
        assert client.is_server_ready()
        assert health(server) == SERVING
        infer_simple(client)
    assert server.terminate() == 0


def test_load_model_star_loads_all(server_factory, repo) -> None:
    server = server_factory(repo, EXPLICIT, "--load-model=*")
    with grpcclient.InferenceServerClient(server.url) as client:
        assert index(client) == [(n, "1", "READY", "") for n in MODELS]
        assert client.is_server_ready()
    assert server.terminate() == 0


def test_load_model_of_a_missing_model_fails_start_up(server_factory, repo) -> None:
    server = server_factory(repo, EXPLICIT, "--load-model=no_such_model", start=False)
    server.launch()
    assert server.wait_exit() == 1
    assert "failed to load all models" in server.log()


# -- the simple_grpc_model_control sequence -----------------------------------------------------


def test_load_reload_unload(explicit) -> None:
    server, client = explicit
    client.load_model("simple")
    assert client.is_model_ready("simple")
    assert client.is_server_ready()
    assert health(server) == SERVING
    infer_simple(client)
    assert 'nv_inference_count{model="simple",version="1"} 1' in scrape(server)

    # malformed JSON: the poll fails, the reason is in the log, the old model keeps serving
    bad = '"parameters": {"config": {{"max_batch_size": "16"}}}'
    message = triton_error(grpc.StatusCode.INTERNAL, client.load_model, "simple", config=bad)
    assert message == failed_poll("simple")
    assert "Invalid config override" in server.log()
    assert client.is_model_ready("simple")

    # protobuf-JSON override (int64 as a string) replaces config.pbtxt; the graph fills the rest
    client.load_model("simple", config='{"max_batch_size":"16"}')
    config = client.get_model_config("simple", as_json=True)["config"]
    assert config["max_batch_size"] == 16
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
    infer_simple(client, batch=12)  # more rows than config.pbtxt's 8 allow

    # a load without override reads config.pbtxt again
    client.load_model("simple")
    assert client.get_model_config("simple", as_json=True)["config"]["max_batch_size"] == 8

    client.unload_model("simple")
    assert client.is_model_ready("simple") is False  # ready=false with OK, not an error
    assert ("simple", "1", "UNAVAILABLE", "unloaded") in index(client)
    assert not client.is_server_ready()
    assert health(server) == NOT_SERVING
    assert 'model="simple"' not in scrape(server)
    message = triton_error(grpc.StatusCode.NOT_FOUND, client.get_model_config, "simple")
    assert message == "Request for unknown model: 'simple' has no available versions"

    message = triton_error(grpc.StatusCode.INTERNAL, client.load_model, "wrong_model_name")
    assert message == failed_poll("wrong_model_name")

    # a file override path component over NAME_MAX: Triton's failed poll, the server lives
    files = {"file:" + "A" * 256: b"a"}
    message = triton_error(
        grpc.StatusCode.INTERNAL, client.load_model, "simple", config="{}", files=files
    )
    assert "failed to poll from model repository" in message
    assert client.is_server_live()

    # and it loads again after all that
    client.load_model("simple")
    assert client.is_server_ready()
    assert health(server) == SERVING
    infer_simple(client)


def test_reload_under_load_loses_no_request(explicit) -> None:
    """New version first, swap, then drain the old: requests in flight all succeed."""
    server, client = explicit
    client.load_model("simple")
    errors: list[BaseException] = []
    served: list[int] = []  # one entry per successful request (list.append is atomic)
    done = threading.Event()

    def hammer() -> None:
        with grpcclient.InferenceServerClient(server.url) as own:
            while not done.is_set():
                try:
                    infer_simple(own)
                except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)
                    return
                served.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(served) < 20 and not errors:
            done.wait(0.01)  # traffic is flowing before the first reload
        before = len(served)
        for _ in range(10):
            client.load_model("simple")
        during = len(served) - before
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert during > 0, "no request overlapped the reloads"
    assert client.is_model_ready("simple")


def test_backend_load_failure(server_factory, tmp_path) -> None:
    shutil.copytree(MODEL_REPOSITORY / "simple", tmp_path / "simple")
    shutil.copytree(MODEL_REPOSITORY / "simple", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "config.pbtxt").write_text(
        (tmp_path / "simple" / "config.pbtxt").read_text().replace('"simple"', '"corrupt"')
    )
    (tmp_path / "corrupt" / "1" / "model.onnx").write_bytes(b"not an ONNX protobuf")
    server = server_factory(tmp_path, EXPLICIT, "--load-model=simple")
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_server_ready()
        message = triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, "corrupt")
        assert message.startswith(
            "load failed for model 'corrupt': version 1 is at UNAVAILABLE state: "
        )
        [entry] = [e for e in index(client) if e[0] == "corrupt"]
        assert entry[:3] == ("corrupt", "1", "UNAVAILABLE") and entry[3]
        assert not client.is_model_ready("corrupt")
        assert not client.is_server_ready()  # strict: a failed version counts
        assert health(server) == NOT_SERVING
        client.unload_model("corrupt")  # unloaded on purpose: no longer a failure
        assert client.is_server_ready()
        assert health(server) == SERVING
    assert server.terminate() == 0


# -- parameters and refusals --------------------------------------------------------------------


def test_parameter_errors(explicit) -> None:
    server, _ = explicit
    param = pb.ModelRepositoryParameter
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def load(**kwargs) -> str:
            code = kwargs.pop("code", grpc.StatusCode.INVALID_ARGUMENT)
            return rpc_error(
                code, stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(**kwargs)
            )

        def unload(**kwargs) -> str:
            request = pb.RepositoryModelUnloadRequest(**kwargs)
            return rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.RepositoryModelUnload, request)

        assert (
            load(model_name="simple", parameters={"colour": param(string_param="red")})
            == "unrecognized load parameter 'colour'."
        )
        assert (
            load(model_name="simple", parameters={"config": param(int64_param=1)})
            == "invalid value type for load parameter 'config', expected string_param."
        )
        assert (
            load(model_name="simple", parameters={"file:1/model.onnx": param(string_param="x")})
            == "invalid value type for load parameter 'file:1/model.onnx', expected bytes_param."
        )
        assert (
            load(model_name="simple", repository_name="x", code=grpc.StatusCode.UNIMPLEMENTED)
            == "'repository_name' specification is not supported"
        )
        assert (
            unload(model_name="simple", parameters={"colour": param(bool_param=True)})
            == "unrecognized unload parameter 'colour'."
        )
        assert (
            unload(model_name="simple", parameters={"unload_dependents": param(string_param="x")})
            == "invalid value type for 'unload_dependents' parameter, expected bool_param."
        )
        assert (
            unload(model_name="no_such_model")
            == "failed to unload 'no_such_model', model is not found"
        )
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))
        stub.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(
                model_name="simple", parameters={"unload_dependents": param(bool_param=True)}
            )
        )
        reply = stub.ModelReady(pb.ModelReadyRequest(name="simple"))
        assert reply.ready is False


def test_none_mode_refuses_load_and_unload(client) -> None:
    """The session's default server runs in none mode (Triton checks parameters first)."""
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.load_model, "simple") == POLLING
    assert (
        triton_error(grpc.StatusCode.UNAVAILABLE, client.load_model, "simple", config="{}")
        == POLLING
    )
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.unload_model, "simple") == POLLING
    assert client.is_model_ready("simple")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRIBUTARY), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (
            ["--model-control-mode=poll", "--load-model=simple"],
            "--load-model needs --model-control-mode=explicit",  # tritonserver refuses it too
        ),
        (["--load-model=simple"], "--load-model needs --model-control-mode=explicit"),
        (["--model-control-mode=none", "--load-model=simple"], "needs --model-control-mode"),
        ([EXPLICIT, "--load-model=*", "--load-model=simple"], "must be the only --load-model"),
    ],
    ids=["load-model-poll-mode", "load-model-default", "load-model-none", "star-and-name"],
)
def test_control_command_lines_are_refused(args: list[str], mentions: str) -> None:
    proc = run_cli("--model-repository", str(MODEL_REPOSITORY), *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tributary: error: "), proc.stderr
    assert mentions in lines[0]


def test_what_a_client_sends_is_bounded_in_replies_and_in_the_log(explicit) -> None:
    """A config override may be at most what a config.pbtxt may be (4 MiB), refused before it
    is parsed; names a client sent come back clipped; the log never holds a client's
    megabytes, nor its line breaks or escape sequences."""
    server, _ = explicit
    param = pb.ModelRepositoryParameter
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        huge = '{"' + "Q" * (4 * 1024 * 1024) + '": 1}'
        text = rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(
                model_name="simple", parameters={"config": param(string_param=huge)}
            ),
        )
        assert text == (
            "config override for model 'simple' is larger than 4194304 bytes, the limit for a "
            "model configuration"
        )
        # Under the limit but invalid: Triton's failed-poll answer, the reason logged (clipped).
        bad = '{"' + "\x1b[2J\u2028E1201 forged" + "Z" * 1_000_000 + '": 1}'
        text = rpc_error(
            grpc.StatusCode.INTERNAL,
            stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(
                model_name="simple", parameters={"config": param(string_param=bad)}
            ),
        )
        assert text == failed_poll("simple")
        long_name = "n" * 5000
        for method, request in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=long_name)),
            (stub.ModelStatistics, pb.ModelStatisticsRequest(name=long_name)),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=long_name)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                method(request)
            assert len(info.value.details()) < 400, info.value.details()[:100]
            assert "(4744 more characters)" in info.value.details()
    log = server.log()
    assert "Invalid config override" in log
    assert max(len(line) for line in log.splitlines()) < 9000
    assert "\x1b" not in log and "\u2028" not in log
    assert not any(line.startswith("E1201 forged") for line in log.splitlines())
