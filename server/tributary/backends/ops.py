"""Which operators an ONNX model uses, read from the file's protobuf wire format.

The response cache must not answer for a model whose outputs are random draws (a cached
answer would repeat one draw forever), so a model that enables it is refused at load when its
graph holds a random operator. ONNX Runtime's session API does not list operators, and the
`onnx` package is not a server dependency; the fields needed are few and stable, so this
walks them directly over a memory map: ModelProto.graph (7) and .functions (25),
GraphProto.node (1), NodeProto.op_type (4) and .attribute (5), AttributeProto.g (6) and
.graphs (11) for the subgraphs of If/Loop/Scan, FunctionProto.node (7). Weights and every
other field are skipped by their length without being read, so a 1 GB model costs a few
page faults. Nesting is bounded (`MAX_DEPTH` message levels: three per nested subgraph), and a
malformed file is a `ModelLoadError`.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from tributary.errors import ModelLoadError

RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
"""ONNX operators whose outputs are random draws (default domain)."""

MAX_DEPTH = 64
"""Message levels walked at most (model → graph → node → attribute → graph ...: about 20
nested subgraphs); deeper files are refused, no real model comes close."""

_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE = 1
_NODE_OP_TYPE, _NODE_ATTRIBUTE = 4, 5
_ATTR_G, _ATTR_GRAPHS = 6, 11
_FUNCTION_NODE = 7

# which length-delimited fields of each message kind lead to what
_MODEL = {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"}
_GRAPH = {_GRAPH_NODE: "node"}
_NODE = {_NODE_ATTRIBUTE: "attribute"}
_ATTRIBUTE = {_ATTR_G: "graph", _ATTR_GRAPHS: "graph"}
_FUNCTION = {_FUNCTION_NODE: "node"}
_KINDS = {
    "model": _MODEL,
    "graph": _GRAPH,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "function": _FUNCTION,
}


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int, ops: set[str]) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested deeper than {MAX_DEPTH}")
    follow = _KINDS[kind]
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a field runs past its message")
            if kind == "node" and field == _NODE_OP_TYPE:
                ops.add(bytes(buf[pos : pos + length]).decode("utf-8", "replace"))
            elif field in follow:
                _walk(buf, pos, pos + length, follow[field], depth + 1, ops)
            pos += length
        else:
            raise _Malformed(f"unexpected wire type {wire}")
        if pos > end:
            raise _Malformed("a field runs past its message")


def op_types(model_path: Path) -> set[str]:
    """Every operator type used in the model's graph, its subgraphs and its functions."""
    ops: set[str] = set()
    try:
        with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                _walk(view, 0, len(view), "model", 0, ops)
            finally:
                view.release()
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise ModelLoadError(f"unable to read model file '{model_path}': {exc}") from exc
    except _Malformed as exc:
        raise ModelLoadError(f"failed to read ONNX model '{model_path}': {exc}") from exc
    return ops


def random_ops(model_path: Path) -> list[str]:
    """The random operators the model uses, sorted (empty: its outputs are deterministic as
    far as its graph says)."""
    return sorted(op_types(model_path) & RANDOM_OPS)
