"""Protobuf messages ⇄ SDK values, shared by the sync and asyncio clients.

Keeping every message-building rule here means the two clients differ only in how they wait
for the network, never in what they put on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._proto import grpc_service_pb2 as pb
from ._tensors import datatype_of, from_raw, from_typed, numpy_dtype, to_raw
from ._types import (
    InferResult,
    ModelIndex,
    ModelMetadata,
    ParamValue,
    ServerMetadata,
    StreamResult,
    TensorMetadata,
)

# Parameters the SDK sets from its own keyword arguments; passing them in `parameters` too would
# make the request ambiguous, so it is refused.
_KEYWORD_PARAMETERS = {"priority": "priority", "timeout": "timeout_us"}


def set_parameter(target: pb.InferParameter, value: ParamValue) -> None:
    """Store a Python value in the InferParameter oneof; bool before int (bool is an int)."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(f"parameter values must be bool, int, float or str, not {type(value)}")


def get_parameter(param: pb.InferParameter) -> ParamValue:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else ""


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    request_id: str = "",
    outputs: Sequence[str] | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
    priority: int | None = None,
    timeout_us: int | None = None,
    classification: Mapping[str, int] | None = None,
) -> pb.ModelInferRequest:
    """One ModelInferRequest with every input as a raw buffer, in the mapping's order.

    With `classification` and no `outputs`, only the classified outputs are requested: the
    protocol cannot say "all outputs, and classify this one".
    """
    if isinstance(outputs, str):
        raise TypeError("outputs must be a sequence of names, not a single string")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for key, value in (parameters or {}).items():
        if key in _KEYWORD_PARAMETERS:
            raise ValueError(f"pass '{key}' as the {_KEYWORD_PARAMETERS[key]}= keyword argument")
        set_parameter(request.parameters[key], value)
    if priority is not None:
        if priority < 0:
            raise ValueError("priority must be >= 0 (0 = the model's default level)")
        request.parameters["priority"].uint64_param = priority  # what current tritonclient sends
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    for name, value_in in inputs.items():
        array = np.asarray(value_in)
        datatype, raw = to_raw(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    names = list(outputs) if outputs is not None else []
    names += [n for n in (classification or {}) if n not in names]
    for name in names:
        tensor = request.outputs.add(name=name)
        if classification and name in classification:
            tensor.parameters["classification"].int64_param = classification[name]
    return request


def decode_response(response: pb.ModelInferResponse) -> InferResult:
    """InferResult from a response; outputs and raw buffers are matched by position."""
    raw = response.raw_output_contents
    outputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if index < len(raw):
            outputs[tensor.name] = from_raw(tensor.datatype, shape, raw[index])
        else:
            outputs[tensor.name] = from_typed(tensor.datatype, shape, tensor.contents)
    return InferResult(
        outputs,
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        parameters={k: get_parameter(v) for k, v in response.parameters.items()},
    )


def decode_stream_response(response: pb.ModelStreamInferResponse) -> StreamResult:
    if response.error_message:
        return StreamResult(id=response.infer_response.id, error=response.error_message)
    result = decode_response(response.infer_response)
    return StreamResult(id=result.id, result=result)


def server_metadata(response: pb.ServerMetadataResponse) -> ServerMetadata:
    return ServerMetadata(response.name, response.version, tuple(response.extensions))


def _tensors(
    items: Sequence[pb.ModelMetadataResponse.TensorMetadata],
) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)


def model_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=_tensors(response.inputs),
        outputs=_tensors(response.outputs),
    )


def repository_index(response: pb.RepositoryIndexResponse) -> list[ModelIndex]:
    return [ModelIndex(m.name, m.version, m.state, m.reason) for m in response.models]


def input_datatypes(metadata: ModelMetadata) -> dict[str, str]:
    """What `cast=True` works from: each input's datatype as the server declares it."""
    return {t.name: t.datatype for t in metadata.inputs}


class InputTypes:
    """`cast=True`'s memory, shared by the sync and asyncio clients: each (model, version)'s
    input datatypes, from one ModelMetadata, kept until this client loads or unloads the
    model (which may change them)."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str], dict[str, str]] = {}

    def get(self, model: str, version: str) -> dict[str, str] | None:
        return self._types.get((model, version))

    def remember(self, model: str, version: str, metadata: ModelMetadata) -> dict[str, str]:
        types = self._types[(model, version)] = input_datatypes(metadata)
        return types

    def forget(self, model: str) -> None:
        for key in [k for k in self._types if k[0] == model]:
            self._types.pop(key, None)


def cast_inputs(
    inputs: Mapping[str, Any], datatypes: Mapping[str, str], model: str
) -> dict[str, np.ndarray]:
    """Convert numeric inputs to the datatypes the model declares (`cast=True`).

    What is converted, every rule checked before anything is sent:

    - bool or integer -> an integer datatype (INT8..INT64, UINT8..UINT64, signed and unsigned
      either way) when every value fits the target's range; otherwise ValueError naming the
      input, its value range and the datatype. Nothing wraps around.
    - bool, integer or float -> a float datatype (FP16, FP32, FP64). Precision may be lost
      (float64 -> FP32 rounds, tiny values may become 0): that is what asking for the cast
      means. A finite value too large for the target (it would become inf) raises ValueError;
      NaN and infinities stay what they are.

    Float -> integer (truncation), anything -> BOOL but bool, numbers -> BYTES and strings ->
    numbers raise TypeError, as do names the model does not have (the server would refuse
    those anyway; this says why before anything is sent). The range check is one min/max (or,
    for floats, one isfinite) per array, never a Python loop over elements.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        array = np.asarray(value)
        want = datatypes.get(name)
        if want is None:
            known = ", ".join(sorted(datatypes)) or "none"
            raise TypeError(f"model '{model}' has no input '{name}' (inputs: {known})")
        have = datatype_of(array)
        if have == want:
            out[name] = array
            continue
        try:
            target = numpy_dtype(want)
        except TypeError:
            out[name] = array  # a datatype numpy cannot hold (BF16): send as is
            continue
        kinds = _CASTABLE_FROM.get(target.kind, "")
        if want == "BYTES" or array.dtype.kind not in kinds:
            raise TypeError(
                f"input '{name}' of model '{model}' is {want}; will not cast {array.dtype} to "
                f"it (only bool/int -> int, and bool/int/float -> float): convert it yourself"
            )
        out[name] = _checked_cast(array, target, f"input '{name}' of model '{model}'", want)
    return out


# Source dtype kinds (numpy's dtype.kind) that `cast=True` converts to each target kind.
_CASTABLE_FROM = {"i": "biu", "u": "biu", "f": "biuf"}


def _checked_cast(array: np.ndarray, target: np.dtype, what: str, want: str) -> np.ndarray:
    """`array.astype(target)`, refusing values the target cannot represent (see cast_inputs)."""
    if array.size == 0 or np.can_cast(array.dtype, target, "safe"):
        return array.astype(target)
    if target.kind in "iu":
        low, high = int(array.min()), int(array.max())  # Python ints: exact for uint64 too
        limits = np.iinfo(target)
        if low < limits.min or high > limits.max:
            raise ValueError(
                f"{what} is {want} ({limits.min}..{limits.max}), but the {array.dtype} values "
                f"given range over {low}..{high}: not sent; bring them into range yourself"
            )
        return array.astype(target)
    with np.errstate(over="ignore"):  # overflow is detected below, and raised as an error
        cast = array.astype(target)
    if not np.isfinite(cast).all():
        overflowed = np.isfinite(array) & ~np.isfinite(cast)
        if overflowed.any():
            finite = array[np.isfinite(array)]
            raise ValueError(
                f"{what} is {want} (finite magnitudes up to {float(np.finfo(target).max):g}), "
                f"but the finite {array.dtype} values given range over {finite.min():g}.."
                f"{finite.max():g}, which would become inf: not sent; scale or clip them yourself"
            )
    return cast


def load_request(
    name: str,
    *,
    config: str | Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> pb.RepositoryModelLoadRequest:
    """RepositoryModelLoad, Triton-style: `config` (JSON text, or a mapping dumped to JSON)
    replaces the model's config.pbtxt; `files` maps paths inside the model directory (with or
    without the protocol's "file:" prefix) to their contents."""
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        request.parameters["config"].string_param = text
    for path, content in (files or {}).items():
        key = path if path.startswith("file:") else f"file:{path}"
        request.parameters[key].bytes_param = bytes(content)
    return request


def unload_request(
    name: str, *, unload_dependents: bool = False
) -> pb.RepositoryModelUnloadRequest:
    request = pb.RepositoryModelUnloadRequest(model_name=name)
    request.parameters["unload_dependents"].bool_param = unload_dependents
    return request
