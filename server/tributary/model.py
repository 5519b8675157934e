"""A loaded model version: signature + instances + scheduler + statistics.

`build_loader` returns the callable the repository uses to turn a normalised config into a
servable. Translating protobuf scheduling settings into the scheduler's plain `BatchPolicy`
happens here, so the scheduler never sees protobuf. Warmup runs before the version is READY.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.onnxruntime import OrtInstance, create_instances
from .backends.ops import random_ops
from .config import ModelSignature, signature
from .config_check import inside_model_dir
from .constants import DEFAULT_MAX_TENSOR_BYTES
from .datatypes import from_config
from .ensemble import EnsembleModel, build_ensemble, is_ensemble
from .errors import InferenceError, InvalidArgument, ModelLoadError
from .scheduler import (
    BatchPolicy,
    QueuePolicy,
    Scheduler,
    SequencePolicy,
    SequenceScheduler,
    make_scheduler,
)
from .scheduler.cache import ModelCache, ResponseCache, refuse_unsupported
from .scheduler.sequence import Control, StateSpec
from .stats import ModelStats
from .tensors import check_size_limit

if TYPE_CHECKING:
    from .repository import ModelRepository

log = logging.getLogger("tributary.model")

WARMUP_FOLDER = "warmup"  # Triton's: input_data_file names a file in <model>/warmup/
MAX_WARMUP_FILE_BYTES = 64 * 1024 * 1024  # a BYTES sample file (numeric ones read their size)
MAX_WARMUP_COUNT = 1000  # runs of one warmup sample (a client can set it by config override)


def _queue_policy(p: Any) -> QueuePolicy:
    return QueuePolicy(
        reject_on_timeout=p.timeout_action == 0,
        default_timeout_us=int(p.default_timeout_microseconds),
        allow_timeout_override=bool(p.allow_timeout_override),
        max_queue_size=int(p.max_queue_size),
    )


def batch_policy(config: Any) -> BatchPolicy:
    """The scheduler's view of `dynamic_batching` (absent: every request runs on its own)."""
    if not config.HasField("dynamic_batching") or config.max_batch_size <= 0:
        return BatchPolicy(max_batch_size=max(0, config.max_batch_size))
    db = config.dynamic_batching
    return BatchPolicy(
        max_batch_size=config.max_batch_size,
        dynamic=True,
        preferred_batch_sizes=tuple(int(x) for x in db.preferred_batch_size),
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preserve_ordering=bool(db.preserve_ordering),
        priority_levels=int(db.priority_levels),
        default_priority_level=int(db.default_priority_level),
        default_queue_policy=_queue_policy(db.default_queue_policy),
        priority_queue_policy={
            int(k): _queue_policy(v) for k, v in db.priority_queue_policy.items()
        },
    )


INITIAL_STATE_FOLDER = "initial_state"  # Triton's: data_file names a file in <model>/initial_state/
MAX_CANDIDATE_SEQUENCES = 65536
"""Sequence slots per instance (oldest: max_candidate_sequences, direct: max_batch_size): every
slot is bookkeeping the server holds, and a config override could ask for billions."""
_CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")


def _controls(config: Any) -> tuple[Control, ...]:
    model = config.name
    kinds = {0: "START", 1: "READY", 2: "END", 3: "CORRID"}  # ModelSequenceBatching.Control.Kind
    out: list[Control] = []
    for control_input in config.sequence_batching.control_input:
        for c in control_input.control:
            kind = kinds.get(c.kind, "")
            if not kind:
                raise ModelLoadError(f"model '{model}': unknown sequence control kind {c.kind}")
            if kind == "CORRID":
                dtype = from_config(c.data_type) if c.data_type else None
                if dtype is None or dtype.config_name not in _CORRID_TYPES:
                    raise ModelLoadError(
                        f"unable to load model '{model}', unexpected control data type, expected "
                        "TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32, or TYPE_STRING for "
                        f"CONTROL_SEQUENCE_CORRID for {model}"
                    )
                out.append(Control(kind, control_input.name, dtype.numpy, wire=dtype.name))
                continue
            pairs = [
                (c.int32_false_true, np.dtype(np.int32)),
                (c.fp32_false_true, np.dtype(np.float32)),
                (c.bool_false_true, np.dtype(np.bool_)),
            ]
            given = [(list(v), t) for v, t in pairs if len(v)]
            if len(given) != 1 or len(given[0][0]) != 2:
                raise ModelLoadError(
                    f"unable to load model '{model}', sequence control '{control_input.name}' "
                    "must give exactly two values in one of int32_false_true, fp32_false_true "
                    "or bool_false_true"
                )
            (false, true), numpy = given[0]
            out.append(Control(kind, control_input.name, numpy, false, true, wire=""))
    return tuple(out)


def _states(config: Any, model_dir: Path | None, max_tensor_bytes: int) -> tuple[StateSpec, ...]:
    """The implicit states with their initial values (Triton's checks and texts)."""
    model = config.name
    out: list[StateSpec] = []
    for st in config.sequence_batching.state:
        dtype = from_config(st.data_type)
        dims = tuple(int(d) for d in st.dims)
        initial: np.ndarray | None = None
        if len(st.initial_state) > 1:
            raise ModelLoadError(
                f"initial_state field for state input '{st.input_name}' must contain exactly "
                f"one or zero element. Found '{len(st.initial_state)}' elements."
            )
        if st.initial_state:
            init = st.initial_state[0]
            if init.data_type != st.data_type:
                raise ModelLoadError(
                    f"The data type used for 'initial_state' field of state "
                    f"'{st.input_name}' does not match the state data type."
                )
            shape = tuple(int(d) for d in init.dims)
            if len(shape) != len(dims):
                raise ModelLoadError(
                    "Number of dimensions in 'initial_state' doesn't match the size of 'state' "
                    f"dimensions for state input '{st.input_name}'. {len(shape)} != {len(dims)}"
                )
            for i, (a, b) in enumerate(zip(shape, dims, strict=True)):
                if a < 0:
                    raise ModelLoadError(
                        f"'initial_state' field for state input name '{st.input_name}' "
                        "contains variable dimensions."
                    )
                if b != -1 and a != b:
                    raise ModelLoadError(
                        f"'initial_state' dim for input name '{st.input_name}' doesn't match "
                        f"'state' dim description. {a} != {b} (dim {i})"
                    )
            try:
                check_size_limit(shape, dtype, max_tensor_bytes, st.input_name, model)
            except InvalidArgument as exc:
                raise ModelLoadError(exc.message) from None
            count = int(np.prod(shape, dtype=np.int64))
            if init.WhichOneof("state_data") == "data_file":
                if model_dir is None:
                    raise ModelLoadError("initial_state data_file needs the model directory")
                path = inside_model_dir(
                    model,
                    "initial_state data_file",
                    init.data_file,
                    model_dir,
                    base=model_dir / INITIAL_STATE_FOLDER,
                )
                what = f"state '{st.input_name}' file '{INITIAL_STATE_FOLDER}/{init.data_file}'"
                if dtype.name == "BYTES":
                    initial = _bytes_elements(_read_sample(path, None, what), count, what)
                    initial = initial.reshape(shape)
                else:
                    numpy = np.dtype(dtype.numpy)
                    data = _read_sample(path, count * numpy.itemsize, what)
                    initial = np.frombuffer(data, dtype=numpy.newbyteorder("<")).reshape(shape)
                    initial = initial.astype(numpy)
            elif dtype.name == "BYTES":
                initial = np.full(shape, "", dtype=object)
            else:
                initial = np.zeros(shape, dtype=dtype.numpy)
        out.append(StateSpec(st.input_name, st.output_name, dtype.numpy, dims, initial))
    return tuple(out)


def sequence_policy(
    config: Any, model_dir: Path | None = None, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> SequencePolicy:
    """The sequence scheduler's view of `sequence_batching` (docs/model-config.md)."""
    sb = config.sequence_batching
    oldest = sb.WhichOneof("strategy_choice") == "oldest"
    if not oldest and config.max_batch_size > MAX_CANDIDATE_SEQUENCES:
        raise ModelLoadError(
            f"unable to load model '{config.name}', sequence batching (direct) keeps one slot "
            f"per batch row: max_batch_size must be at most {MAX_CANDIDATE_SEQUENCES}, got "
            f"{config.max_batch_size}"
        )
    common = SequencePolicy(
        max_batch_size=max(0, int(config.max_batch_size)),
        max_sequence_idle_us=int(sb.max_sequence_idle_microseconds) or 1_000_000,
        controls=_controls(config),
        states=_states(config, model_dir, max_tensor_bytes),
    )
    if oldest:
        o = sb.oldest
        if o.max_candidate_sequences < 0 or o.max_candidate_sequences > MAX_CANDIDATE_SEQUENCES:
            raise ModelLoadError(
                f"unable to load model '{config.name}', max_candidate_sequences must be between "
                f"0 and {MAX_CANDIDATE_SEQUENCES}, got {o.max_candidate_sequences}"
            )
        return dataclasses.replace(
            common,
            oldest=True,
            max_candidate_sequences=int(o.max_candidate_sequences),
            preferred_batch_sizes=tuple(int(x) for x in o.preferred_batch_size),
            max_queue_delay_us=int(o.max_queue_delay_microseconds),
            preserve_ordering=bool(o.preserve_ordering),
        )
    return dataclasses.replace(
        common,
        max_queue_delay_us=int(sb.direct.max_queue_delay_microseconds),
        minimum_slot_utilization=float(sb.direct.minimum_slot_utilization),
    )


class Model:
    """What the servicer talks to: one READY version of one model."""

    def __init__(
        self,
        name: str,
        version: int,
        config: Any,
        sig: ModelSignature,
        instances: list[OrtInstance],
        scheduler: Scheduler,
        stats: ModelStats,
        load_seconds: float,
        cache: ModelCache | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.signature = sig
        self.instances = instances
        self.scheduler = scheduler
        self.stats = stats
        self.load_seconds = load_seconds
        self.cache = cache

    def close(self, timeout: float) -> None:
        self.scheduler.close(timeout)
        self.instances.clear()
        if self.cache is not None:
            self.cache.close()  # this version's answers go with it


def _read_sample(path: Path, expected: int | None, what: str) -> bytes:
    """A warmup file's bytes: exactly `expected` (numeric; Triton ignores any excess) or the
    whole file up to MAX_WARMUP_FILE_BYTES (BYTES), sizes checked before reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelLoadError(
            f"{what}: cannot read it: {exc.strerror or type(exc).__name__}"
        ) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{what} is not a regular file")
        if expected is not None and info.st_size < expected:
            raise ModelLoadError(
                f"{what}: warmup setting expects {expected} bytes, but the data provided only "
                f"has {info.st_size} bytes"
            )
        limit = expected if expected is not None else MAX_WARMUP_FILE_BYTES
        if expected is None and info.st_size > limit:
            raise ModelLoadError(f"{what} is larger than the {limit}-byte limit")
        data = file.read(limit + (0 if expected is not None else 1))
    if len(data) > limit or (expected is not None and len(data) < expected):
        raise ModelLoadError(f"{what} changed size while it was read")
    return data


def _bytes_elements(data: bytes, count: int, what: str) -> np.ndarray:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    out: list[str] = []
    pos = 0
    while pos < len(data) and len(out) < count:
        if pos + 4 > len(data):
            break
        size = int.from_bytes(data[pos : pos + 4], "little")
        if pos + 4 + size > len(data):
            break
        try:
            out.append(data[pos + 4 : pos + 4 + size].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{what}: element {len(out)} is not UTF-8") from exc
        pos += 4 + size
    if len(out) != count or pos != len(data):
        raise ModelLoadError(
            f"{what}: expected {count} length-prefixed BYTES elements and nothing more"
        )
    return np.array(out, dtype=object)


def _warmup_inputs(
    model: str,
    sample: Any,
    spec_batch: int,
    model_dir: Path | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> dict[str, np.ndarray]:
    """The sample's inputs, each held to --max-tensor-bytes (like a request's) before any of
    it is allocated or read."""
    arrays: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for name, inp in sample.inputs.items():
        dtype = from_config(inp.data_type)
        dims = tuple(int(d) for d in inp.dims)
        if any(d < 0 for d in dims):
            raise ModelLoadError(
                "warmup setting expects all variable-size dimensions are specified for input "
                f"'{name}'"
            )
        shape = (spec_batch, *dims) if spec_batch else dims
        try:
            check_size_limit(shape, dtype, max_tensor_bytes, name, model)
        except InvalidArgument as exc:
            raise ModelLoadError(exc.message) from None
        if inp.WhichOneof("input_data_type") == "input_data_file":
            if model_dir is None:
                raise ModelLoadError("input_data_file needs the model directory")
            value = inp.input_data_file
            path = inside_model_dir(
                model, "input_data_file", value, model_dir, base=model_dir / WARMUP_FOLDER
            )
            what = f"input '{name}' file '{WARMUP_FOLDER}/{value}'"
            count = int(np.prod(dims, dtype=np.int64))
            if dtype.name == "BYTES":
                row = _bytes_elements(_read_sample(path, None, what), count, what).reshape(dims)
            else:
                itemsize = np.dtype(dtype.numpy).itemsize
                data = _read_sample(path, count * itemsize, what)
                row = np.frombuffer(data, dtype=np.dtype(dtype.numpy).newbyteorder("<"))
                row = row.reshape(dims).astype(dtype.numpy, copy=False)
            # Triton sends batch_size requests of this one sample; we send them as one batch.
            arr = np.repeat(row[np.newaxis], spec_batch, axis=0) if spec_batch else row
        elif dtype.name == "BYTES":
            arr = np.full(shape, "0" if inp.zero_data else "1", dtype=object)
        elif inp.random_data:
            arr = rng.integers(0, 2, size=shape).astype(dtype.numpy)
        else:
            arr = np.zeros(shape, dtype=dtype.numpy)
        arrays[name] = arr
    return arrays


def _check_warmup(model: Model, sample: Any) -> None:
    """Bounds a client's config override could otherwise push past memory or time."""
    max_batch = model.signature.max_batch_size
    if max_batch > 0 and sample.batch_size > max_batch:
        raise ModelLoadError(
            f"warmup setting batch_size {sample.batch_size} exceeds the model's max_batch_size "
            f"{max_batch}"
        )
    if sample.count > MAX_WARMUP_COUNT:
        raise ModelLoadError(
            f"warmup setting count {sample.count} exceeds the server's limit of {MAX_WARMUP_COUNT}"
        )


def warm_up(
    model: Model, model_dir: Path | None = None, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> None:
    """Run the config's model_warmup samples through every instance before READY; a sample
    that fails (its file included) fails the load, naming the sample. A sample with
    batch_size 0 is skipped, as Triton does."""
    for sample in model.config.model_warmup:
        if sample.batch_size == 0:
            log.debug("model '%s': skipping batch 0 warmup sample '%s'", model.name, sample.name)
            continue
        batch = sample.batch_size if model.signature.max_batch_size > 0 else 0
        try:
            _check_warmup(model, sample)
            inputs = _warmup_inputs(model.name, sample, batch, model_dir, max_tensor_bytes)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"model '{model.name}' warmup '{sample.name}' failed: {exc.message}"
            ) from exc
        for spec in model.signature.inputs:
            if spec.reshape is not None and spec.name in inputs:
                lead = (batch,) if batch else ()
                inputs[spec.name] = inputs[spec.name].reshape(lead + spec.reshape)
        scheduler = getattr(model, "scheduler", None)
        if isinstance(scheduler, SequenceScheduler):  # controls and states: not-ready rows
            inputs.update(scheduler.policy.idle_inputs(max(batch, 1)))
        outputs = tuple(o.name for o in model.signature.outputs)
        for _ in range(max(1, sample.count)):
            for instance in model.instances:
                try:
                    instance.run(inputs, outputs)
                except Exception as exc:
                    raise ModelLoadError(
                        f"model '{model.name}' warmup '{sample.name}' failed on instance "
                        f"'{instance.name}': {exc}"
                    ) from exc
        log.info(
            "model '%s' version %d: warmup '%s' done",
            model.name,
            model.version,
            sample.name,
            extra={"model": model.name},
        )


def _model_cache(
    name: str, version: int, config: Any, cache: ResponseCache | None, model_path: Path | None
) -> ModelCache | None:
    """The version's view of the response cache when its config enables it. Without a server
    cache (--cache-config) the setting has no effect, as in tritonserver (logged). A graph
    with random operators is refused: a cached answer would repeat one draw forever."""
    refuse_unsupported(config)
    if not config.response_cache.enable:
        return None
    drawn = random_ops(model_path) if model_path is not None else []
    if drawn:
        raise ModelLoadError(
            f"Response Cache does not support model {name}: its outputs are not deterministic "
            f"(operators {', '.join(drawn)}). Please disable the response cache."
        )
    if cache is None:
        log.warning(
            "model '%s' enables response_cache but the server has no cache "
            "(--cache-config local,size=<bytes>): every request runs the model",
            name,
            extra={"model": name},
        )
        return None
    return cache.for_model(name, version)


def build_loader(
    gpus: int,
    cores: int | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    *,
    cache: ResponseCache | None = None,
    repository: Callable[[], ModelRepository] | None = None,
) -> Callable[[str, int, Any, Path, Path], Model | EnsembleModel]:
    """The repository's loader: config + files -> a READY `Model` (or an exception).

    `max_tensor_bytes` (--max-tensor-bytes) bounds each warmup input too. `cache` is the
    server's response cache (None without --cache-config). `repository` gives ensembles the
    repository their steps resolve composing models in (None: ensembles are refused)."""

    def load(
        name: str, version: int, config: Any, model_path: Path, model_dir: Path
    ) -> Model | EnsembleModel:
        start = time.monotonic()
        sig = signature(config, model_dir)
        model_cache = _model_cache(
            name, version, config, cache, None if is_ensemble(config) else model_path
        )
        if is_ensemble(config):
            if repository is None:
                raise ModelLoadError(f"ensemble '{name}' cannot be served without a repository")
            return _load_ensemble(name, version, config, sig, repository(), model_cache)
        instances = create_instances(config, model_path, gpus, cores)
        stats = ModelStats(name, version)
        scheduler: Scheduler
        if config.HasField("sequence_batching"):
            policy = sequence_policy(config, model_dir, max_tensor_bytes)
            scheduler = SequenceScheduler(name, instances, policy, stats)
        else:
            scheduler = make_scheduler(name, instances, batch_policy(config), stats)
        model = Model(
            name,
            version,
            config,
            sig,
            instances,
            scheduler,
            stats,
            time.monotonic() - start,
            model_cache,
        )
        try:
            warm_up(model, model_dir, max_tensor_bytes)
        except Exception:
            model.close(0)
            raise
        model.load_seconds = time.monotonic() - start
        providers = sorted({p for i in instances for p in i.providers})
        log.info(
            "loaded model '%s' version %d: %d instance(s) on %s in %.2fs",
            name,
            version,
            len(instances),
            ", ".join(providers),
            model.load_seconds,
            extra={"model": name},
        )
        return model

    return load


def _load_ensemble(
    name: str,
    version: int,
    config: Any,
    sig: ModelSignature,
    repo: ModelRepository,
    model_cache: ModelCache | None,
) -> EnsembleModel:
    def lookup(model: str, wanted: int | None) -> Any:
        try:
            return repo.resolve(model, "" if wanted is None else str(wanted))
        except InferenceError:
            return None

    ensemble = build_ensemble(name, version, config, sig, repo.resolve, lookup)
    ensemble.cache = model_cache
    return ensemble
