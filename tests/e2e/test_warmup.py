"""model_warmup with input_data_file: files under <model>/warmup/, checked before they are read;
a failing sample fails the load with its name (docs/model-config.md#warmup)."""

from __future__ import annotations

import struct
from pathlib import Path

import build_models
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import triton_error

EXPLICIT = "--model-control-mode=explicit"


def warmup(name: str, dtype: str, dims: str, source: str, batch: int = 2, count: int = 2) -> str:
    return (
        f'model_warmup [{{ name: "{name}" batch_size: {batch} count: {count} inputs {{ '
        f'key: "INPUT0" value {{ data_type: {dtype} dims: {dims} {source} }} }} }}]\n'
    )


def identity(repo: Path, name: str, dtype: str, extra: str) -> Path:
    type_name = {"FP32": "TYPE_FP32", "STRING": "TYPE_STRING"}[dtype]
    config = (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f'input [{{ name: "INPUT0" data_type: {type_name} dims: [-1] }}]\n'
        f'output [{{ name: "OUTPUT0" data_type: {type_name} dims: [-1] }}]\n' + extra
    )
    model_dir = build_models.build_identity(repo, name, dtype, config=config)
    (model_dir / "warmup").mkdir()
    return model_dir


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    repo.mkdir()
    d = identity(
        repo, "fp", "FP32", warmup("from_file", "TYPE_FP32", "[4]", 'input_data_file: "in.bin"')
    )
    (d / "warmup" / "in.bin").write_bytes(np.arange(4, dtype="<f4").tobytes() + b"extra")
    d = identity(
        repo, "text", "STRING", warmup("words", "TYPE_STRING", "[2]", 'input_data_file: "w.bin"')
    )
    (d / "warmup" / "w.bin").write_bytes(
        b"".join(struct.pack("<I", len(w)) + w for w in (b"hi", b""))
    )
    d = identity(
        repo, "short", "FP32", warmup("too_short", "TYPE_FP32", "[4]", 'input_data_file: "in.bin"')
    )
    (d / "warmup" / "in.bin").write_bytes(b"\0" * 15)
    identity(
        repo,
        "escape",
        "FP32",
        warmup("outside", "TYPE_FP32", "[1]", 'input_data_file: "../config.pbtxt"'),
    )
    identity(
        repo, "missing", "FP32", warmup("absent", "TYPE_FP32", "[1]", 'input_data_file: "nope.bin"')
    )
    identity(repo, "variable", "FP32", warmup("var", "TYPE_FP32", "[-1]", "zero_data: true"))
    d = identity(
        repo,
        "badbytes",
        "STRING",
        warmup("count", "TYPE_STRING", "[2]", 'input_data_file: "w.bin"'),
    )
    (d / "warmup" / "w.bin").write_bytes(struct.pack("<I", 1) + b"x")  # one element, not two
    return repo


def test_warmup_from_files(server_factory, repo: Path) -> None:
    server = server_factory(repo, EXPLICIT, "--load-model=fp", "--load-model=text")
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("fp") and client.is_model_ready("text")
        log = server.log()
        assert "warmup 'from_file' done" in log and "warmup 'words' done" in log

        def refused(model: str, *mentions: str) -> None:
            message = triton_error(grpc.StatusCode.INVALID_ARGUMENT, client.load_model, model)
            assert message.startswith(f"load failed for model '{model}': version 1"), message
            for text in mentions:
                assert text in message, message
            assert not client.is_model_ready(model)

        refused(
            "short",
            "warmup 'too_short' failed",
            "warmup setting expects 16 bytes, but the data provided only has 15 bytes",
        )
        refused("escape", "warmup 'outside'", "must name a file inside the model directory")
        refused("missing", "warmup 'absent'", "file 'warmup/nope.bin': cannot read it")
        refused("variable", "warmup 'var'", "all variable-size dimensions are specified")
        refused("badbytes", "warmup 'count'", "expected 2 length-prefixed BYTES elements")
    assert server.terminate() == 0
