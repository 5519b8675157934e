"""Reading the operators of an ONNX file from its wire format (tributary.backends.ops): the
graph, subgraphs of control flow, local functions; weights skipped; malformed files refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tributary.backends.ops import MAX_DEPTH, op_types, random_ops
from tributary.errors import ModelLoadError

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])


def save(tmp_path: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def test_top_level_operators_and_big_weights_skipped(tmp_path: Path) -> None:
    weights = numpy_helper.from_array(np.ones(4_000_000, np.float32)[:4].copy(), "w")
    big = numpy_helper.from_array(np.ones(2_000_000, np.float32), "unused")  # 8 MB skipped
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        "g",
        [X],
        [Y],
        initializer=[weights, big],
    )
    path = save(tmp_path, helper.make_model(graph))
    assert op_types(path) == {"Add", "Relu"}
    assert random_ops(path) == []


def test_random_operator_inside_an_if_branch_and_a_function(tmp_path: Path) -> None:
    then = helper.make_graph([helper.make_node("RandomNormalLike", ["x"], ["r"])], "then", [], [Y])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["r2"])], "else", [], [Y])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    func = helper.make_function(
        "local",
        "Noise",
        ["a"],
        ["b"],
        [helper.make_node("Bernoulli", ["a"], ["b"])],
        [helper.make_opsetid("", 21)],
    )
    graph = helper.make_graph([node], "g", [cond, X], [Y])
    model = helper.make_model(graph, functions=[func])
    path = save(tmp_path, model)
    assert {"If", "RandomNormalLike", "Identity", "Bernoulli"} <= op_types(path)
    assert random_ops(path) == ["Bernoulli", "RandomNormalLike"]


def test_malformed_and_missing_files_are_load_errors(tmp_path: Path) -> None:
    good = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [X], [Y])
    ).SerializeToString()
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="failed to read ONNX model"):
        op_types(truncated)
    empty = tmp_path / "e.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unable to read model file"):
        op_types(empty)
    with pytest.raises(ModelLoadError, match="unable to read model file"):
        op_types(tmp_path / "missing.onnx")


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand (protobuf's own parser stops at
    100 levels, so the deep file is written without it)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_nesting_is_bounded(tmp_path: Path) -> None:
    def nested(levels: int) -> bytes:
        graph = _field(1, _field(4, b"Relu"))  # GraphProto.node: NodeProto.op_type
        for _ in range(levels):  # an If whose then_branch (AttributeProto.g) is the graph
            node = _field(4, b"If") + _field(5, _field(6, graph))
            graph = _field(1, node)
        return _field(7, graph)  # ModelProto.graph

    shallow = tmp_path / "shallow.onnx"
    shallow.write_bytes(nested(MAX_DEPTH // 3 - 1))
    assert op_types(shallow) == {"If", "Relu"}
    deep = tmp_path / "deep.onnx"
    deep.write_bytes(nested(MAX_DEPTH))
    with pytest.raises(ModelLoadError, match="nested deeper"):
        op_types(deep)
