"""Load-time checks of a normalised config against the ONNX graph it will serve.

A mismatch found here fails one model version with a message naming the model and the tensor;
found later it would fail every request with an opaque ONNX Runtime error. Messages follow
Triton's wording (`unable to load model '<m>', ...`) so operators can search for them.
Split from `config` only to keep both modules small; import it through `tributary.config`.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod
from pathlib import Path

from tributary.backends.graph import GraphInfo, GraphTensor
from tributary.datatypes import BY_CONFIG
from tributary.errors import ModelLoadError
from tributary_client._proto import model_config_pb2 as mc

_Control = mc.ModelSequenceBatching.Control


def fmt_dims(dims: Iterable[int | None]) -> str:
    """Triton's shape notation: `[-1,16]`, no spaces, unknown dims as -1."""
    return "[" + ",".join("-1" if d is None else str(d) for d in dims) + "]"


def _type_name(value: int) -> str:
    return mc.DataType.Name(value) if value in mc.DataType.values() else str(value)


def validate(config: mc.ModelConfig, graph: GraphInfo, model_dir: Path | None = None) -> None:
    """Raise `ModelLoadError` unless `config` can serve `graph`; label files need `model_dir`."""
    model = config.name
    if config.max_batch_size < 0:
        raise ModelLoadError(
            f"unable to load model '{model}', max_batch_size must be >= 0, "
            f"got {config.max_batch_size}"
        )
    batch: tuple[int, ...] = (-1,) if config.max_batch_size > 0 else ()
    for kind, specs in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ModelLoadError(
                    f"unable to load model '{model}', {kind} '{spec.name}' is specified twice"
                )
            seen.add(spec.name)
            found = graph.input(spec.name) if kind == "input" else graph.output(spec.name)
            _check_tensor(model, kind, spec, found, batch)
    provided = {i.name for i in config.input} | _check_sequence(config, graph, batch)
    for tensor in graph.inputs:
        if tensor.name not in provided:
            raise ModelLoadError(
                f"unable to load model '{model}', model requires input '{tensor.name}' "
                "which is not in the configuration"
            )
    _check_batching(config)
    if model_dir is not None:
        for out in config.output:
            if out.label_filename:
                read_labels(model, out, model_dir)


def _check_tensor(
    model: str,
    kind: str,
    spec: mc.ModelInput | mc.ModelOutput,
    tensor: GraphTensor | None,
    batch: tuple[int, ...],
) -> None:
    prefix = f"unable to load model '{model}',"
    if tensor is None:
        raise ModelLoadError(
            f"{prefix} configuration expects {kind} '{spec.name}' "
            "which is not provided by the model"
        )
    if spec.data_type not in BY_CONFIG:
        raise ModelLoadError(
            f"{prefix} invalid datatype {_type_name(spec.data_type)} for {kind} '{spec.name}'"
        )
    if spec.data_type != tensor.dtype.config:
        raise ModelLoadError(
            f"{prefix} unexpected datatype {_type_name(spec.data_type)} for {kind} "
            f"'{spec.name}', model provides {tensor.dtype.config_name}"
        )
    dims = tuple(spec.dims)
    if not dims:
        raise ModelLoadError(f"{prefix} {kind} '{spec.name}' must specify 'dims'")
    if any(d == 0 or d < -1 for d in dims):
        raise ModelLoadError(
            f"{prefix} {kind} '{spec.name}' dims {fmt_dims(dims)} may only contain "
            "positive values or -1"
        )
    model_dims = dims
    if spec.HasField("reshape"):
        model_dims = tuple(spec.reshape.shape)
        if any(d == 0 or d < -1 for d in model_dims):
            raise ModelLoadError(
                f"{prefix} {kind} '{spec.name}' reshape {fmt_dims(model_dims)} may only contain "
                "positive values or -1"
            )
        if _segments(dims) != _segments(model_dims):
            raise ModelLoadError(
                f"{prefix} {kind} '{spec.name}' has different size for dims {fmt_dims(dims)} "
                f"and reshape {fmt_dims(model_dims)}"
            )
    expected = batch + model_dims
    if not _shape_matches(expected, tensor.shape, has_reshape=spec.HasField("reshape")):
        note = " (the leading -1 is the batch dimension, max_batch_size > 0)" if batch else ""
        raise ModelLoadError(
            f"{prefix} configuration dims {fmt_dims(expected)} for {kind} '{spec.name}' "
            f"don't match the model's shape {fmt_dims(tensor.shape)}{note}"
        )


def _segments(dims: tuple[int, ...]) -> list[int]:
    """Element counts between variable dims: dims and reshape must agree on each of them."""
    out, run = [], []
    for d in dims:
        if d == -1:
            out.append(prod(run))
            run = []
        else:
            run.append(d)
    out.append(prod(run))
    return out


def _shape_matches(
    expected: tuple[int, ...], actual: tuple[int | None, ...], *, has_reshape: bool
) -> bool:
    if not actual and expected == (1,) and not has_reshape:
        # A scalar graph tensor shown as [1] without batching, as auto-complete writes it.
        return True
    if len(expected) != len(actual):
        return False
    return all(a is None or a == e for e, a in zip(expected, actual, strict=True))


def _check_sequence(config: mc.ModelConfig, graph: GraphInfo, batch: tuple[int, ...]) -> set[str]:
    """Control and state tensors are fed by the server, so the graph must take them as declared."""
    if not config.HasField("sequence_batching"):
        return set()
    model = config.name
    names: set[str] = set()
    seq = config.sequence_batching
    for control_input in seq.control_input:
        tensor = graph.input(control_input.name)
        if tensor is None:
            raise ModelLoadError(
                f"unable to load model '{model}', sequence control input "
                f"'{control_input.name}' is not provided by the model"
            )
        for control in control_input.control:
            want = _control_type(control)
            if want is not None and want != tensor.dtype.config:
                raise ModelLoadError(
                    f"unable to load model '{model}', unexpected datatype {_type_name(want)} "
                    f"for sequence control input '{control_input.name}', model provides "
                    f"{tensor.dtype.config_name}"
                )
        names.add(control_input.name)
    names.update(state.input_name for state in seq.state)
    return names


def _control_type(control: _Control) -> int | None:
    if control.kind == _Control.CONTROL_SEQUENCE_CORRID:
        return control.data_type or None
    if control.int32_false_true:
        return mc.TYPE_INT32
    if control.fp32_false_true:
        return mc.TYPE_FP32
    if control.bool_false_true:
        return mc.TYPE_BOOL
    return None


def _check_batching(config: mc.ModelConfig) -> None:
    if not config.HasField("dynamic_batching"):
        return
    for size in config.dynamic_batching.preferred_batch_size:
        if size < 1 or size > config.max_batch_size:
            raise ModelLoadError(
                f"unable to load model '{config.name}', dynamic batching preferred size "
                f"{size} must be >= 1 and <= max_batch_size {config.max_batch_size}"
            )


def read_labels(model: str, output: mc.ModelOutput, model_dir: Path) -> tuple[str, ...]:
    """Classification labels of one output, one per line, relative to the model directory."""
    path = model_dir / output.label_filename
    try:
        return tuple(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"unable to load model '{model}', failed to read label file "
            f"'{output.label_filename}' for output '{output.name}': {exc}"
        ) from exc
