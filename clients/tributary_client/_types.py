"""Plain result types: what callers get back instead of protobuf messages.

Protobuf messages are kept only where their structure is the point (ModelConfig, statistics);
everything a caller reads field by field becomes a frozen dataclass or a Mapping so it can be
compared, printed and type-checked without knowing the .proto.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._errors import InferenceServerError

ParamValue = bool | int | float | str


class InferResult(Mapping[str, np.ndarray]):
    """Outputs of one inference by name, in the order the server returned them.

    Arrays decoded from raw buffers are read-only views (no copy); BYTES outputs are object
    arrays of `bytes`.
    """

    __slots__ = ("_outputs", "model_name", "model_version", "id", "parameters")

    def __init__(
        self,
        outputs: dict[str, np.ndarray],
        *,
        model_name: str,
        model_version: str,
        id: str,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> None:
        self._outputs = outputs
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.parameters: Mapping[str, ParamValue] = dict(parameters or {})

    def __getitem__(self, name: str) -> np.ndarray:
        return self._outputs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._outputs.items())
        return (
            f"InferResult(model={self.model_name!r}, version={self.model_version!r}, "
            f"id={self.id!r}, {{{shapes}}})"
        )


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One answer on a stream: exactly one of `result` / `error` is set.

    Per-request failures do not end a stream (docs/protocol.md#streams), so they arrive as values in
    order with the successes instead of as exceptions that would stop iteration.
    """

    id: str
    result: InferResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self) -> InferResult:
        """The result, or raise the request's error (with `code=None`: streams carry none)."""
        if self.result is None:
            raise InferenceServerError(None, self.error or "stream response carried no result")
        return self.result


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class ModelIndex:
    """One entry of the repository index; `version`/`state` are "" for never-loaded models."""

    name: str
    version: str
    state: str
    reason: str = field(default="")


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One request for `AsyncClient.stream`: the keyword arguments of `infer`, as a value."""

    inputs: Mapping[str, np.ndarray]
    request_id: str = ""
    outputs: Sequence[str] | None = None
    parameters: Mapping[str, ParamValue] | None = None
    priority: int | None = None
    timeout_us: int | None = None
    classification: Mapping[str, int] | None = None
