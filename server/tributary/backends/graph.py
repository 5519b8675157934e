"""Read an ONNX model's input/output metadata without committing to an execution setup.

Config auto-complete and load-time validation need the graph's names, types and shapes, but
must not decide providers, threads or instance counts: that is the backend's job. A CPU-only
session is the cheapest faithful reader (it applies the same type inference ONNX Runtime will
use when serving), and it is dropped as soon as the metadata is copied out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from tributary.datatypes import BY_ONNX, DType
from tributary.errors import ModelLoadError

Dim = int | None


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output; `None` dims are symbolic or unknown (batchable)."""

    name: str
    dtype: DType
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphInfo:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    def input(self, name: str) -> GraphTensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> GraphTensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def _dim(value: object) -> Dim:
    # ORT reports fixed dims as ints, symbolic ones by their parameter name (str), and unknown
    # ones as None; negative ints also appear for some exporters' "dynamic" marker.
    if isinstance(value, int) and value >= 0:
        return value
    return None


def _tensor(arg: ort.NodeArg, path: Path, kind: str) -> GraphTensor:
    dtype = BY_ONNX.get(arg.type)
    if dtype is None:
        raise ModelLoadError(
            f"unsupported datatype '{arg.type}' for {kind} '{arg.name}' of model file '{path}'"
        )
    shape = arg.shape if isinstance(arg.shape, list | tuple) else []
    return GraphTensor(arg.name, dtype, tuple(_dim(d) for d in shape))


def read_graph(model_path: Path) -> GraphInfo:
    """Describe the graph at `model_path`; any failure to open it is a `ModelLoadError`."""
    if not model_path.is_file():
        raise ModelLoadError(f"unable to find model file '{model_path}'")
    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
        raise ModelLoadError(f"failed to read ONNX model '{model_path}': {exc}") from exc
    return GraphInfo(
        inputs=tuple(_tensor(a, model_path, "input") for a in session.get_inputs()),
        outputs=tuple(_tensor(a, model_path, "output") for a in session.get_outputs()),
    )
