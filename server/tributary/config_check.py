"""Load-time checks of a normalised config against the ONNX graph it will serve.

A mismatch found here fails one model version with a message naming the model and the tensor;
found later it would fail every request with an opaque ONNX Runtime error. Messages follow
Triton's wording (`unable to load model '<m>', ...`) so operators can search for them.
Split from `config` only to keep both modules small; import it through `tributary.config`.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from math import prod
from pathlib import Path, PurePosixPath

from tributary import errors
from tributary.backends.graph import GraphInfo, GraphTensor
from tributary.datatypes import BY_CONFIG
from tributary.errors import ModelLoadError
from tributary.text import printable
from tributary_client._proto import model_config_pb2 as mc

_Control = mc.ModelSequenceBatching.Control

MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024  # a label file is one line per class, never this big
_SHOWN_CHARS = 200  # how much of a config's own value an error message repeats


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
    out: list[int] = []
    run: list[int] = []
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
    for state in seq.state:
        for kind, tensor, name in (
            ("input", graph.input(state.input_name), state.input_name),
            ("output", graph.output(state.output_name), state.output_name),
        ):
            if tensor is None:
                raise ModelLoadError(
                    f"unable to load model '{model}', sequence state {kind} '{name}' is not "
                    "provided by the model"
                )
            if tensor.dtype.config != state.data_type:
                raise ModelLoadError(
                    f"unable to load model '{model}', unexpected datatype "
                    f"{_type_name(state.data_type)} for sequence state {kind} '{name}', model "
                    f"provides {tensor.dtype.config_name}"
                )
        names.add(state.input_name)
    return names


def _control_type(control: mc.ModelSequenceBatching.Control) -> int | None:
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
    path = inside_model_dir(model, "label_filename", output.label_filename, model_dir)
    what = f"label file '{shown(output.label_filename)}' for output '{output.name}'"
    text = read_text_file(path, MAX_LABEL_FILE_BYTES, model, what)
    return tuple(text.splitlines())


# -- the files a config names -------------------------------------------------------------------


class RefusedConfig(ModelLoadError):
    """A config names a file the server will not read: outside its model directory, too big.

    Other config problems read as Triton's "failed to poll" and keep their reason for the log
    and RepositoryIndex; this one goes back to the client as is (INVALID_ARGUMENT), because it
    is the client's to fix and its text repeats only the config's own values.
    """


def shown(value: str) -> str:
    """A config value as an error message may repeat it: cut like every echoed name
    (`errors.shown`, first, since the value may be a client's megabyte), then printable."""
    return printable(errors.shown(value, _SHOWN_CHARS))


def inside_model_dir(
    model: str, field: str, value: str, model_dir: Path, *, base: Path | None = None
) -> Path:
    """The resolved path `value` names (relative to `base`, default the model directory).

    A config may be a client's load override, so every path it names must stay inside the
    model's directory. The lexical rules (relative, no `..`, no NUL) come first, so nothing
    outside is even stat'ed; then symlinks are resolved and the target must still be inside
    the resolved model directory (or the resolved `base`: an operator may link a version
    directory to other storage; what a config names inside it still cannot leave it). Links
    that stay inside keep working: Kubernetes ConfigMap mounts reach their files through
    `..data/` links in the same directory.
    """
    refused = RefusedConfig(
        f"unable to load model '{model}', {field} '{shown(value)}' must name a file inside "
        "the model directory"
    )
    pure = PurePosixPath(value)
    if "\x00" in value or pure.is_absolute() or ".." in pure.parts:
        raise refused
    roots = {Path(os.path.realpath(model_dir))}
    if base is not None:  # e.g. a version directory the operator linked to other storage
        roots.add(Path(os.path.realpath(base)))
    target = Path(os.path.realpath((base or model_dir) / value))
    if not any(target.is_relative_to(root) for root in roots):
        raise refused
    return target


def read_text_file(path: Path, limit: int, model: str, what: str) -> str:
    """UTF-8 text of a regular file of at most `limit` bytes, never holding more than that.

    `what` names the file for messages, relative to the repository: the text may reach a
    client, so it carries no absolute path and no OSError text (which would repeat one).
    """
    prefix = f"unable to load model '{model}',"
    too_big = RefusedConfig(f"{prefix} {what} is larger than the {limit}-byte limit")
    try:
        # O_NONBLOCK: a FIFO must not hang the load; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelLoadError(f"{prefix} failed to read {what}: {_os_reason(exc)}") from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{prefix} {what} is not a regular file")
        if info.st_size > limit:
            raise too_big
        try:
            data = file.read(limit + 1)  # sizes can lie (/proc), so the read is bounded too
        except OSError as exc:
            raise ModelLoadError(f"{prefix} failed to read {what}: {_os_reason(exc)}") from exc
    if len(data) > limit:
        raise too_big
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(
            f"{prefix} {what} is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from exc


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _constant(text: str) -> Callable[[re.Match[str]], str]:
    """A `re.sub` replacement that inserts `text` literally (no group references)."""
    return lambda _match: text


def repository_relative(text: str, model_dir: Path, roots: Sequence[Path]) -> str:
    """`text` with server paths replaced by paths relative to the model repository.

    Errors from the loader (ONNX Runtime's among them) name the files they failed on in full;
    clients get `simple/1/model.onnx` instead, while the server log keeps the original.
    """
    prefixes: dict[str, str] = {}
    for root in roots:
        for form in (str(root), os.path.abspath(root), os.path.realpath(root)):
            prefixes[form] = ""
    for form in (str(model_dir), os.path.abspath(model_dir), os.path.realpath(model_dir)):
        prefixes[form] = model_dir.name  # a model directory may link to outside its root
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix in ("", "/", "."):
            continue
        short = prefixes[prefix]
        # Whole path components only: `/repo/simple` is not a prefix of `/repo/simple_int8`.
        start = r"(?<![\w./+@-])" + re.escape(prefix)
        text = re.sub(start + "/", _constant(short + "/" if short else ""), text)
        if os.path.isabs(prefix):  # a relative one bare could be any word of the message
            bare = short or "<model repository>"
            text = re.sub(start + r"(?![\w.+@-])", _constant(bare), text)
    return text
