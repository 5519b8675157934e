"""backends/graph.py: ONNX metadata as GraphInfo, with failures as ModelLoadError."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tributary.backends.graph import GraphTensor, read_graph
from tributary.datatypes import BY_NAME
from tributary.errors import ModelLoadError


def test_read_graph_simple(tmp_path: Path, bm) -> None:
    d = bm.build_simple(tmp_path)
    info = read_graph(d / "1" / "model.onnx")
    int32 = BY_NAME["INT32"]
    assert info.inputs == (
        GraphTensor("INPUT0", int32, (None, 16)),
        GraphTensor("INPUT1", int32, (None, 16)),
    )
    assert [t.name for t in info.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert info.input("INPUT1") == info.inputs[1] and info.input("OUTPUT0") is None


def test_read_graph_strings_scalars_and_unknown_dims(tmp_path: Path, bm) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["S"], ["T"]), helper.make_node("Identity", ["F"], ["G"])],
        "g",
        [
            helper.make_tensor_value_info("S", TensorProto.STRING, ["batch", None]),
            helper.make_tensor_value_info("F", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("T", TensorProto.STRING, ["batch", None]),
            helper.make_tensor_value_info("G", TensorProto.FLOAT, []),
        ],
    )
    path = bm.write_model(tmp_path, "g", bm.make_model(graph), None) / "1" / "model.onnx"
    info = read_graph(path)
    assert info.inputs == (
        GraphTensor("S", BY_NAME["BYTES"], (None, None)),
        GraphTensor("F", BY_NAME["FP32"], ()),
    )


def test_read_graph_unsupported_type_names_tensor(tmp_path: Path, bm) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["X"], ["SEQ"])],
        "seq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_sequence_value_info("SEQ", TensorProto.FLOAT, [2])],
    )
    path = bm.write_model(tmp_path, "seq", bm.make_model(graph), None) / "1" / "model.onnx"
    with pytest.raises(ModelLoadError, match="output 'SEQ'"):
        read_graph(path)


def test_read_graph_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unable to find"):
        read_graph(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        read_graph(bad)
    onnx.save(onnx.ModelProto(), str(tmp_path / "empty.onnx"))
    with pytest.raises(ModelLoadError):
        read_graph(tmp_path / "empty.onnx")
