"""RepositoryModelLoad with `file:` overrides, as Triton's lifecycle tests use them
(docs/protocol.md#repository-rpcs, docs/limits.md#model-file-overrides).

The model is made of the override files alone, in a private temporary directory: never the
repository's files, never written into the repository, gone after unload, reload and exit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY, rpc_error, triton_error, triton_simple_inputs

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

EXPLICIT = "--model-control-mode=explicit"
ONNX = (MODEL_REPOSITORY / "simple" / "1" / "model.onnx").read_bytes()
CONFIG = json.dumps({"max_batch_size": "8"})


def poll_failed(name: str) -> str:
    return f"failed to load '{name}', failed to poll from model repository"


def infer(client: grpcclient.InferenceServerClient, model: str) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = triton_simple_inputs(a)
    result = client.infer(model, inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


def overrides(tmp: Path) -> list[Path]:
    """The model directories the server holds for overrides (its TMPDIR is `tmp`)."""
    return sorted(p for p in tmp.glob("tributary-overrides-*/*/*") if p.is_dir())


@pytest.fixture
def served(server_factory, tmp_path, monkeypatch):
    repo = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, repo)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the server inherits it
    server = server_factory(repo, EXPLICIT, "--load-model=simple")
    with grpcclient.InferenceServerClient(server.url) as client:
        yield server, client, repo, tmp


def test_load_a_new_model_from_files(served) -> None:
    server, client, repo, tmp = served
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    client.load_model("fresh", config=CONFIG, files={"file:1/model.onnx": ONNX})
    assert client.is_model_ready("fresh", "1")
    infer(client, "fresh")
    index = client.get_model_repository_index()
    assert ("fresh", "1", "READY") in [(m.name, m.version, m.state) for m in index.models]
    assert client.get_model_config("fresh").config.name == "fresh"
    # never written into the repository
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
    [first] = overrides(tmp)
    assert first.name == "fresh" and (first / "1" / "model.onnx").read_bytes() == ONNX
    assert oct(first.parent.stat().st_mode & 0o777) == "0o700"

    # a reload with new files replaces the directory (the old one goes)
    client.load_model("fresh", config=CONFIG, files={"file:2/model.onnx": ONNX})
    assert client.is_model_ready("fresh", "2")
    assert not client.is_model_ready("fresh", "1")  # only the override files make the model
    [second] = overrides(tmp)
    assert second != first and not first.exists()

    client.unload_model("fresh")
    assert overrides(tmp) == []
    # without overrides the name must be in the repository: Triton's failed poll
    message = triton_error(grpc.StatusCode.INTERNAL, client.load_model, "fresh")
    assert message == poll_failed("fresh")

    # a repository model overridden by files, then loaded back from the repository
    client.load_model("simple", config=CONFIG, files={"file:3/model.onnx": ONNX})
    assert client.is_model_ready("simple", "3") and not client.is_model_ready("simple", "1")
    assert len(overrides(tmp)) == 1
    client.load_model("simple")
    assert client.is_model_ready("simple", "1")
    assert overrides(tmp) == []

    client.load_model("again", config=CONFIG, files={"file:1/model.onnx": ONNX})
    assert len(overrides(tmp)) == 1
    assert server.terminate() == 0
    assert list(tmp.glob("tributary-overrides-*")) == []  # shutdown removes the folder


def test_file_overrides_need_config_and_safe_paths(served) -> None:
    server, client, repo, tmp = served
    # Triton's rule and answer (the reason follows Triton's text)
    message = triton_error(
        grpc.StatusCode.INTERNAL,
        client.load_model,
        "simple",
        files={"file:1/model.onnx": ONNX},
    )
    assert message.startswith(poll_failed("simple"))
    assert "Load parameter 'config' must be specified for model file override" in message
    for path in (
        "A" * 256,  # Triton's simple_grpc_model_control case: a component over NAME_MAX
        "1/../../../evil",
        "../1/model.onnx",
        "/etc/evil",
        "1//model.onnx",
        "1/./model.onnx",
        "1\\..\\evil",
        "1/a\x00b",
        "1/a\nb",
        "../labels.txt",
        "warmup/../../evil",
        "1/" + "a/" * 600 + "b",
    ):
        message = triton_error(
            grpc.StatusCode.INTERNAL,
            client.load_model,
            "simple",
            config=CONFIG,
            files={"file:" + path: b"x"},
        )
        assert message.startswith(poll_failed("simple")), (path, message)
    # a path that is a directory for another file
    message = triton_error(
        grpc.StatusCode.INTERNAL,
        client.load_model,
        "simple",
        config=CONFIG,
        files={"file:1/a": b"x", "file:1/a/b": b"y"},
    )
    assert "directory has been created as a file" in message
    for name in ("../evil", "a/b", ".hidden", "..", "x" * 300):
        message = triton_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            client.load_model,
            name,
            config=CONFIG,
            files={"file:1/model.onnx": ONNX},
        )
        assert message.startswith("invalid model name"), message
    assert overrides(tmp) == []
    assert not (repo.parent / "evil").exists() and not (tmp / "evil").exists()
    # a bad model in the files (auto-complete reads it: Triton's failed poll); the directory
    # goes, the reason in the index names no server path, simple keeps serving
    message = triton_error(
        grpc.StatusCode.INTERNAL,
        client.load_model,
        "broken",
        config=CONFIG,
        files={"file:1/model.onnx": b"not onnx"},
    )
    assert message == poll_failed("broken")
    assert overrides(tmp) == []
    [reason] = [m.reason for m in client.get_model_repository_index().models if m.name == "broken"]
    assert reason and str(tmp) not in reason and "broken/1/model.onnx" in reason, reason
    assert client.is_model_ready("simple") and client.is_server_live()
    infer(client, "simple")


def test_override_limits_are_checked_before_writing(served) -> None:
    server, client, repo, tmp = served
    param = pb.ModelRepositoryParameter
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        many = {f"file:1/f{i}": param(bytes_param=b"") for i in range(65)}
        many["config"] = param(string_param=CONFIG)
        text = rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.RepositoryModelLoad,
            pb.RepositoryModelLoadRequest(model_name="simple", parameters=many),
        )
        assert text == "load of model 'simple' has 65 file overrides; at most 64 are allowed"
    assert overrides(tmp) == []


FULL = {
    "max_batch_size": 8,
    "platform": "onnxruntime_onnx",
    "input": [{"name": f"INPUT{i}", "data_type": "TYPE_INT32", "dims": [16]} for i in range(2)],
    "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_INT32", "dims": [16]} for i in range(2)],
}


def test_failed_loads_leave_no_directory(served) -> None:
    """A complete config gets past auto-complete, so the version load itself fails: the
    directory it was written to must go (else failed loads fill the live-bytes bound)."""
    server, client, repo, tmp = served
    for _ in range(3):
        with pytest.raises(Exception, match="load failed for model 'bad'"):
            client.load_model(
                "bad", config=json.dumps(FULL), files={"file:1/model.onnx": b"not onnx"}
            )
        assert overrides(tmp) == []
    client.load_model("good", config=json.dumps(FULL), files={"file:1/model.onnx": ONNX})
    [serving] = overrides(tmp)
    for _ in range(3):  # a failed reload: the old instance and its directory serve on
        with pytest.raises(Exception, match="load failed for model 'good'"):
            client.load_model(
                "good", config=json.dumps(FULL), files={"file:1/model.onnx": b"garbage"}
            )
        assert overrides(tmp) == [serving]
    infer(client, "good")


def test_labels_and_warmup_files_through_overrides(served) -> None:
    """Triton takes any relative `file:` path inside the model directory, so a config's
    label_filename and warmup files can come with the load."""
    server, client, repo, tmp = served
    config = json.loads(json.dumps(FULL))
    config["output"][0]["label_filename"] = "labels.txt"
    config["model_warmup"] = [
        {
            "name": "from_file",
            "batch_size": 2,
            "inputs": {
                f"INPUT{i}": {"data_type": "TYPE_INT32", "dims": [16], "input_data_file": "in.bin"}
                for i in range(2)
            },
        }
    ]
    files = {
        "file:1/model.onnx": ONNX,
        "file:labels.txt": "".join(f"l{i}\n" for i in range(16)).encode(),
        "file:warmup/in.bin": np.arange(16, dtype="<i4").tobytes(),
    }
    client.load_model("labelled", config=json.dumps(config), files=files)
    assert client.is_model_ready("labelled")
    infer(client, "labelled")
    shown = client.get_model_config("labelled").config
    assert shown.output[0].label_filename == "labels.txt"
    assert "warmup 'from_file' done" in server.log()
    [model_dir] = overrides(tmp)
    assert (model_dir / "labels.txt").is_file() and (model_dir / "warmup" / "in.bin").is_file()
