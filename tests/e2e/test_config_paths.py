"""Files a config names stay inside the model's directory, and clients never see server paths.

A security finding: in explicit mode any client could send RepositoryModelLoad with a config
override whose `label_filename` is `../../../../etc/passwd` (classification then returned the
file's lines) or whose `default_model_filename` is any ONNX file on the disk; load errors and
RepositoryIndex reasons handed out absolute server paths. One explicit-mode server serves the
whole module; each test loads what it needs, so the order does not matter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY, triton_error
from google.protobuf import json_format, text_format

from tributary_client._proto import model_config_pb2 as mc

EXPLICIT = "--model-control-mode=explicit"
DIGIT_NAMES = (MODEL_REPOSITORY / "digits" / "labels.txt").read_text().splitlines()
LABEL_LIMIT = 16 * 1024 * 1024  # tributary.config_check.MAX_LABEL_FILE_BYTES


def clone(repo: Path, source: str, name: str) -> Path:
    """A copy of a committed model under another name (the config's name follows)."""
    target = repo / name
    shutil.copytree(MODEL_REPOSITORY / source, target)
    config = target / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{source}"', f'name: "{name}"'))
    return target


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("paths")
    repo = base / "models"
    shutil.copytree(MODEL_REPOSITORY, repo)
    (clone(repo, "simple", "corrupt") / "1" / "model.onnx").write_bytes(b"not an ONNX protobuf")
    (clone(repo, "simple", "bad_config") / "config.pbtxt").write_text("max_batch_size: [")
    missing = clone(repo, "digits", "missing_labels")
    (missing / "labels.txt").unlink()
    big = clone(repo, "digits", "big_labels")
    with (big / "labels.txt").open("wb") as f:
        f.truncate(LABEL_LIMIT + 1)  # sparse: the server must refuse it, not read it
    escape = clone(repo, "digits", "escaping_labels")
    (escape / "labels.txt").unlink()
    (escape / "labels.txt").symlink_to("/etc/passwd")
    # an ONNX file outside the repository, which no config may name
    shutil.copytree(MODEL_REPOSITORY / "simple", base / "outside" / "simple")
    return repo


@pytest.fixture(scope="module")
def explicit(server_factory, repo):
    server = server_factory(repo, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as client:
        yield server, client


def override(model: str, *, labels: str | None = None, model_file: str | None = None) -> str:
    """The model's own config.pbtxt as a JSON load override, with one path changed."""
    config = text_format.Parse(
        (MODEL_REPOSITORY / model / "config.pbtxt").read_text(), mc.ModelConfig()
    )
    if labels is not None:
        [out] = [o for o in config.output if o.label_filename]
        out.label_filename = labels
    if model_file is not None:
        config.default_model_filename = model_file
    return json_format.MessageToJson(config)


def inside(model: str, field: str, value: str) -> str:
    return (
        f"unable to load model '{model}', {field} '{value}' must name a file inside the model "
        "directory"
    )


def classify(client: grpcclient.InferenceServerClient) -> list[str]:
    """Top-3 labels `digits` gives for one blank image."""
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    wanted = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer("digits", [inp], outputs=[wanted])
    return [v.decode().split(":", 2)[2] for v in result.as_numpy("probabilities").reshape(-1)]


def reasons(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], str]:
    index = client.get_model_repository_index()
    return {(m.name, m.version): m.reason for m in index.models}


def to_root(repo: Path) -> str:
    """`../` enough times to reach / from a model directory of `repo`."""
    return "../" * len((repo / "digits").resolve().parts)


@pytest.mark.parametrize(
    "label",
    ["../../../../etc/passwd", "ROOT/etc/passwd", "/etc/passwd", "/proc/self/environ"],
    ids=["four-up", "up-to-root", "absolute", "environ"],
)
def test_label_filename_outside_the_model_is_refused(explicit, repo, label: str) -> None:
    _, client = explicit
    label = label.replace("ROOT/", to_root(repo))
    client.unload_model("digits")
    message = triton_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.load_model,
        "digits",
        config=override("digits", labels=label),
    )
    assert message == inside("digits", "label_filename", label)
    assert not client.is_model_ready("digits")
    assert reasons(client)[("digits", "")] == message


def test_refused_reload_keeps_serving_the_real_labels(explicit, repo) -> None:
    _, client = explicit
    client.load_model("digits")
    assert set(classify(client)) <= set(DIGIT_NAMES)
    passwd = to_root(repo) + "etc/passwd"
    message = triton_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.load_model,
        "digits",
        config=override("digits", labels=passwd),
    )
    assert message == inside("digits", "label_filename", passwd)
    assert client.is_model_ready("digits")
    labels = classify(client)
    assert set(labels) <= set(DIGIT_NAMES), labels
    assert not any("root:" in label for label in labels)


def test_label_symlink_escaping_the_model_is_refused(explicit) -> None:
    """config.pbtxt names `labels.txt`, a link to /etc/passwd: the rule is the same."""
    _, client = explicit
    message = triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, "escaping_labels")
    assert message == inside("escaping_labels", "label_filename", "labels.txt")
    assert reasons(client)[("escaping_labels", "")] == message
    assert not client.is_model_ready("escaping_labels")


def test_default_model_filename_outside_the_model_is_refused(explicit, repo) -> None:
    _, client = explicit
    outside = repo.parent / "outside" / "simple" / "1" / "model.onnx"
    for name in (
        str(outside),
        "../../outside/simple/1/model.onnx",
        "../../simple_int8/1/model.onnx",
    ):
        message = triton_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            client.load_model,
            "simple",
            config=override("simple", model_file=name),
        )
        assert message == inside("simple", "default_model_filename", name)
        assert not client.is_model_ready("simple")
    # the same override naming the model's own file still loads
    client.load_model("simple", config=override("simple", model_file="model.onnx"))
    assert client.is_model_ready("simple")
    client.unload_model("simple")


def test_oversize_label_file_is_refused(explicit) -> None:
    _, client = explicit
    message = triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, "big_labels")
    assert message == (
        "load failed for model 'big_labels': version 1 is at UNAVAILABLE state: unable to load "
        "model 'big_labels', label file 'labels.txt' for output 'probabilities' is larger than "
        f"the {LABEL_LIMIT}-byte limit"
    )
    assert not client.is_model_ready("big_labels")


def test_load_errors_and_index_reasons_name_no_server_path(explicit, repo) -> None:
    _, client = explicit
    paths = {str(repo), os.path.realpath(repo), str(repo.parent)}
    errors = [
        triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, "corrupt"),
        triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, "missing_labels"),
        triton_error(grpc.StatusCode.INTERNAL, client.load_model, "bad_config"),
    ]
    assert "'corrupt/1/model.onnx'" in errors[0]
    assert errors[1] == (
        "load failed for model 'missing_labels': version 1 is at UNAVAILABLE state: unable to "
        "load model 'missing_labels', failed to read label file 'labels.txt' for output "
        "'probabilities': No such file or directory"
    )
    found = reasons(client)
    assert "'corrupt/1/model.onnx'" in found[("corrupt", "1")]
    assert found[("bad_config", "")].startswith(
        "failed to read text proto from bad_config/config.pbtxt: "
    )
    texts = errors + [r for r in found.values() if r]
    assert len(texts) >= 6
    for text in texts:
        assert not any(p in text for p in paths), text
    # ModelReady and inference for the failed model say nothing about files either
    assert not client.is_model_ready("corrupt")
    inp = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    message = triton_error(grpc.StatusCode.NOT_FOUND, client.infer, "corrupt", [inp])
    assert not any(p in message for p in paths), message
