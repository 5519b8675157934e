"""Model configuration: read `config.pbtxt`, normalise and auto-complete it like Triton does.

Users bring Triton repositories and read the ModelConfig RPC back, so the normalised config
must carry the same defaults Triton fills in (docs/model-config.md). This module never opens
an inference session: graph metadata comes through a `graph_reader`, which keeps it testable
and keeps provider choices in the backend. Load-time checks live in `config_check` and are
re-exported here so callers have one place to import from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from google.protobuf import text_format

from tributary.backends.graph import GraphInfo, GraphTensor, read_graph
from tributary.config_check import (
    RefusedConfig,
    inside_model_dir,
    read_labels,
    read_text_file,
    shown,
    validate,
)
from tributary.datatypes import DType, from_config
from tributary.errors import InvalidArgument, ModelLoadError
from tributary_client._proto import model_config_pb2 as mc

__all__ = [
    "MAX_CONFIG_FILE_BYTES",
    "GraphReader",
    "RefusedConfig",
    "check_config_name",
    "check_paths",
    "ModelSignature",
    "TensorSpec",
    "list_versions",
    "load_config",
    "model_file",
    "normalize",
    "parse_config",
    "parse_version",
    "select_versions",
    "signature",
    "validate",
    "versions_of",
]

PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"  # tributary.ensemble runs these
BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"
DEFAULT_SEQUENCE_IDLE_US = 1_000_000
MAX_CONFIG_FILE_BYTES = 4 * 1024 * 1024  # Triton's largest real configs are a few KiB

# ORT reads and writes these through the config (parameters, accelerator parameters): they
# are paths too, so they get the same rules as the files the config itself names.
_PATH_PARAMETERS = ("trt_engine_cache_path", "trt_timing_cache_path")
_PATH_WORDS = ("path", "file", "folder", "dir")

GraphReader = Callable[[Path], GraphInfo]
_Group = mc.ModelInstanceGroup


@dataclass(frozen=True)
class TensorSpec:
    """What clients see of one tensor: config dims (no batch dim, -1 = variable)."""

    name: str
    dtype: DType
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None  # model-side shape without batch dim; None = same as dims
    optional: bool = False
    labels: tuple[str, ...] | None = None  # classification labels from label_filename


@dataclass(frozen=True)
class ModelSignature:
    """The request-validation view of a loaded model, free of protobuf."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    _inputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _outputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs", {t.name: t for t in self.inputs})
        object.__setattr__(self, "_outputs", {t.name: t for t in self.outputs})

    @property
    def batching(self) -> bool:
        """Whether requests carry a leading batch dimension."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs.get(name)


# -- reading ------------------------------------------------------------------------------------


def parse_config(text: str, source: str) -> mc.ModelConfig:
    """Parse pbtxt text; `source` is only for the message, so users know which file is bad."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelLoadError(f"failed to read text proto from {source}: {exc}") from exc


def load_config(
    model_dir: Path, *, config_name: str | None = None, override: mc.ModelConfig | None = None
) -> mc.ModelConfig:
    """The raw config of a model; a missing config.pbtxt reads as empty (auto-complete fills it).

    Messages name the file relative to the repository (`m/config.pbtxt`): they reach clients.
    """
    if override is not None:
        config = mc.ModelConfig()
        config.CopyFrom(override)
        return config
    model = model_dir.name
    path = model_dir / "config.pbtxt"
    if config_name:
        check_config_name(config_name, model)
        custom = model_dir / "configs" / f"{config_name}.pbtxt"
        if custom.is_file():
            path = custom
    if not path.is_file():
        return mc.ModelConfig()
    source = f"{model}/{path.relative_to(model_dir).as_posix()}"
    text = read_text_file(path, MAX_CONFIG_FILE_BYTES, model, f"model config '{source}'")
    return parse_config(text, source)


def check_config_name(name: str, model: str | None = None) -> None:
    """--model-config-name picks `configs/<name>.pbtxt`: a file name, never a path."""
    if not name or "/" in name or "\x00" in name or name in (".", ".."):
        where = f"unable to load model '{model}', " if model else ""
        raise RefusedConfig(
            f"{where}model config name '{shown(name)}' must be a plain file name "
            "(no '/', no NUL) naming configs/<name>.pbtxt inside the model directory"
        )


def check_paths(config: mc.ModelConfig, model_dir: Path) -> None:
    """Refuse a config naming any file outside its model directory, before anything is read.

    Run on the raw config (a client's override included) ahead of auto-complete, which would
    otherwise open the model file it names; the readers check again where they open files.
    """
    model = model_dir.name
    for out in config.output:
        if out.label_filename:
            inside_model_dir(model, "label_filename", out.label_filename, model_dir)
    for version in select_versions(config, list_versions(model_dir)):
        model_file(model_dir, version, config)
    for key, value in config.parameters.items():
        if key.startswith("session.") and any(w in key for w in _PATH_WORDS):
            inside_model_dir(model, f"parameter '{key}'", value.string_value, model_dir)
    accelerators = config.optimization.execution_accelerators
    for acc in (*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator):
        for key, text in acc.parameters.items():
            if key in _PATH_PARAMETERS:
                inside_model_dir(model, key, text, model_dir)


def list_versions(model_dir: Path) -> list[int]:
    """Numeric version directories, ascending; Triton ignores other names and leading zeros."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isascii() and p.name.isdigit() and not p.name.startswith("0")
    )


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Versions the policy asks for among those on disk, ascending."""
    ordered = sorted(available)
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return ordered
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in ordered if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    return ordered[-count:] if count > 0 else []


def model_file(model_dir: Path, version: int, config: mc.ModelConfig) -> Path:
    """The ONNX file of a version; ORT models may be a directory holding model.onnx.

    `default_model_filename` is relative to the version directory (Triton's meaning) and must
    stay inside the model directory; `RefusedConfig` otherwise, before the file is stat'ed.
    """
    model = model_dir.name
    name = config.default_model_filename or DEFAULT_MODEL_FILENAME
    version_dir = model_dir / str(version)
    inside_model_dir(model, "default_model_filename", name, model_dir, base=version_dir)
    path = version_dir / name
    if path.is_dir():
        inner = f"{name.rstrip('/')}/{DEFAULT_MODEL_FILENAME}"
        inside_model_dir(model, "default_model_filename", inner, model_dir, base=version_dir)
        return path / DEFAULT_MODEL_FILENAME
    return path


# -- normalisation ------------------------------------------------------------------------------


def normalize(
    config: mc.ModelConfig,
    model_dir: Path,
    *,
    auto_complete: bool = True,
    default_max_batch_size: int = 4,
    gpu_count: int = 0,
    graph_reader: GraphReader = read_graph,
) -> mc.ModelConfig:
    """A new config with Triton's defaults filled in; the input is left untouched."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    model = model_dir.name
    if out.name and out.name != model:
        raise ModelLoadError(
            f"unexpected name '{out.name}' in configuration of model '{model}', "
            "the name must match the model directory name"
        )
    out.name = model
    if out.HasField("ensemble_scheduling") and out.platform != ENSEMBLE_PLATFORM:
        raise ModelLoadError(
            f"ensemble scheduling cannot be set for model '{model}' whose platform is not "
            f"{ENSEMBLE_PLATFORM}"
        )
    if out.platform == ENSEMBLE_PLATFORM:
        return _normalize_ensemble(out)
    if not out.default_model_filename:
        out.default_model_filename = DEFAULT_MODEL_FILENAME
    _fill_platform(out, model_dir)
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    if out.version_policy.HasField("latest") and out.version_policy.latest.num_versions < 1:
        raise ModelLoadError(f"model '{model}': version_policy latest must ask for >= 1 version")
    if out.max_batch_size < 0:
        raise ModelLoadError(
            f"unable to load model '{model}', max_batch_size must be >= 0, got {out.max_batch_size}"
        )
    if auto_complete and (not out.input or not out.output):
        _auto_complete(out, model_dir, default_max_batch_size, graph_reader)
    _fill_instance_groups(out, gpu_count)
    if out.HasField("dynamic_batching") and not out.dynamic_batching.preferred_batch_size:
        if out.max_batch_size > 0:
            out.dynamic_batching.preferred_batch_size.append(out.max_batch_size)
    if out.HasField("sequence_batching"):
        if out.sequence_batching.max_sequence_idle_microseconds == 0:
            out.sequence_batching.max_sequence_idle_microseconds = DEFAULT_SEQUENCE_IDLE_US
    if not out.optimization.HasField("input_pinned_memory"):
        out.optimization.input_pinned_memory.enable = True
    if not out.optimization.HasField("output_pinned_memory"):
        out.optimization.output_pinned_memory.enable = True
    return out


def _normalize_ensemble(config: mc.ModelConfig) -> mc.ModelConfig:
    """Triton fills little in for an ensemble: no instance groups, files or pinned-memory
    defaults (it has no instances); the step graph is checked when it loads (tributary.ensemble)."""
    model = config.name
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.version_policy.HasField("latest") and config.version_policy.latest.num_versions < 1:
        raise ModelLoadError(f"model '{model}': version_policy latest must ask for >= 1 version")
    if config.max_batch_size < 0:
        raise ModelLoadError(
            f"unable to load model '{model}', max_batch_size must be >= 0, got "
            f"{config.max_batch_size}"
        )
    if not config.input or not config.output:
        raise ModelLoadError(
            f"ensemble '{model}' must specify its inputs and outputs (ensembles are not "
            "auto-completed)"
        )
    if not config.HasField("ensemble_scheduling"):
        raise ModelLoadError(f"must specify 'step' for ensemble '{model}'")
    return config


def _fill_platform(config: mc.ModelConfig, model_dir: Path) -> None:
    model = config.name
    platform, backend = config.platform, config.backend
    if not platform and not backend:
        # Triton infers the backend from the model file when the config names none.
        versions = list_versions(model_dir)
        if any(model_file(model_dir, v, config).is_file() for v in versions):
            platform, backend = PLATFORM, BACKEND
        else:
            raise ModelLoadError(
                f"unable to load model '{model}': no platform or backend specified and no "
                f"version directory holds '{config.default_model_filename}'"
            )
    if platform not in ("", PLATFORM) or backend not in ("", BACKEND):
        shown = ", ".join(
            f"{k} '{v}'" for k, v in (("platform", platform), ("backend", backend)) if v
        )
        raise ModelLoadError(
            f"unable to load model '{model}': unsupported {shown}; only ONNX models "
            f"(platform '{PLATFORM}', backend '{BACKEND}') are served"
        )
    config.platform, config.backend = PLATFORM, BACKEND


def _fill_instance_groups(config: mc.ModelConfig, gpu_count: int) -> None:
    model = config.name
    if not config.instance_group:
        config.instance_group.add(name=model)
    for idx, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{model}_{idx}"
        if group.kind == _Group.KIND_AUTO:
            group.kind = _Group.KIND_GPU if gpu_count > 0 else _Group.KIND_CPU
        if group.count < 0:
            raise ModelLoadError(
                f"instance group '{group.name}' of model '{model}' must have count >= 1, "
                f"got {group.count}"
            )
        if group.count == 0:
            # ONNX Runtime on CPU gets two instances so one runs while the other batches.
            group.count = 2 if group.kind == _Group.KIND_CPU else 1
        if group.kind == _Group.KIND_GPU:
            if gpu_count == 0:
                raise ModelLoadError(
                    f"instance group '{group.name}' of model '{model}' has kind KIND_GPU "
                    "but no GPUs are available"
                )
            if not group.gpus:
                group.gpus.extend(range(gpu_count))
            bad = [g for g in group.gpus if not 0 <= g < gpu_count]
            if bad:
                raise ModelLoadError(
                    f"instance group '{group.name}' of model '{model}' specifies invalid or "
                    f"unsupported gpu id {bad[0]}; {gpu_count} GPU(s) available"
                )
        elif group.gpus and group.kind != _Group.KIND_MODEL:
            raise ModelLoadError(
                f"instance group '{group.name}' of model '{model}' has kind "
                f"{_Group.Kind.Name(group.kind)} but specifies one or more GPUs"
            )


def _auto_complete(
    config: mc.ModelConfig, model_dir: Path, default_max_batch_size: int, reader: GraphReader
) -> None:
    """Fill batching and missing I/O from the graph of the first selected version."""
    model = config.name
    versions = versions_of(model, config, model_dir)
    graph = reader(model_file(model_dir, versions[0], config))
    tensors = graph.inputs + graph.outputs
    batchable = bool(tensors) and all(t.shape and t.shape[0] is None for t in tensors)
    if batchable:
        if config.max_batch_size == 0:
            config.max_batch_size = default_max_batch_size
        scheduled = config.HasField("dynamic_batching") or config.HasField("sequence_batching")
        if config.max_batch_size > 1 and not scheduled:
            config.dynamic_batching.SetInParent()
    elif config.max_batch_size != 0:
        raise ModelLoadError(
            f"autofill failed for model '{model}': model does not support batching while "
            "non-zero max_batch_size is specified"
        )
    batching = config.max_batch_size > 0
    if not config.input:
        for t in graph.inputs:
            _fill_tensor(config.input.add(), t, batching)
    if not config.output:
        for t in graph.outputs:
            _fill_tensor(config.output.add(), t, batching)


def _fill_tensor(spec: mc.ModelInput | mc.ModelOutput, tensor: GraphTensor, batching: bool) -> None:
    spec.name = tensor.name
    spec.data_type = cast("mc.DataType", tensor.dtype.config)  # the enum's int value
    shape = tensor.shape[1:] if batching else tensor.shape
    if shape:
        spec.dims.extend(-1 if d is None else d for d in shape)
    else:
        # Scalars are shown to clients as [1]; with batching the model still sees [batch].
        spec.dims.append(1)
        if batching:
            spec.reshape.SetInParent()


# -- the serving view ---------------------------------------------------------------------------


def _spec(t: mc.ModelInput | mc.ModelOutput, labels: tuple[str, ...] | None) -> TensorSpec:
    return TensorSpec(
        name=t.name,
        dtype=from_config(t.data_type),
        dims=tuple(t.dims),
        reshape=tuple(t.reshape.shape) if t.HasField("reshape") else None,
        optional=bool(getattr(t, "optional", False)),
        labels=labels,
    )


def signature(config: mc.ModelConfig, model_dir: Path) -> ModelSignature:
    """The validation view of a normalised config; reads label files, so call it at load."""
    outputs = tuple(
        _spec(o, read_labels(config.name, o, model_dir) if o.label_filename else None)
        for o in config.output
    )
    return ModelSignature(
        name=config.name,
        platform=config.platform or config.backend,
        max_batch_size=config.max_batch_size,
        inputs=tuple(_spec(i, None) for i in config.input),
        outputs=outputs,
    )


_VERSION_RE = re.compile(r"\s*[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


def parse_version(version: str, model: str) -> int | None:
    """A request's version string; "" means "server chooses" (None). Texts are Triton's."""
    if version == "":
        return None
    # Length first: int() of a 5,000-digit string raises ValueError (Python's digit limit),
    # and no int64 needs more than 64 characters even with spaces and a sign.
    if len(version) > 64 or not _VERSION_RE.fullmatch(version) or abs(int(version)) > _INT64_MAX:
        raise InvalidArgument(
            f"failed to get model version from specified version string '{shown(version)}' "
            "(details: stol), version should be an integral value > 0"
        )
    value = int(version)
    if value < 0:
        raise InvalidArgument(
            f"invalid model version specified '{version}' , version should be an integral value > 0"
        )
    return value


def versions_of(model: str, config: mc.ModelConfig, model_dir: Path) -> list[int]:
    """Selected versions of a normalised config, or the error Triton gives when there are none."""
    versions = select_versions(config, list_versions(model_dir))
    if not versions:
        raise ModelLoadError(
            f"at least one version must be available under the version policy of model '{model}'"
        )
    return versions
