"""A loaded model version: signature + instances + scheduler + statistics.

`build_loader` returns the callable the repository uses to turn a normalised config into a
servable. Translating protobuf scheduling settings into the scheduler's plain `BatchPolicy`
happens here, so the scheduler never sees protobuf. Warmup runs before the version is READY.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .backends.onnxruntime import OrtInstance, create_instances
from .config import ModelSignature, signature
from .datatypes import from_config
from .errors import ModelLoadError
from .scheduler import BatchPolicy, QueuePolicy, Scheduler
from .stats import ModelStats

log = logging.getLogger("tributary.model")


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
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.signature = sig
        self.instances = instances
        self.scheduler = scheduler
        self.stats = stats
        self.load_seconds = load_seconds

    def close(self, timeout: float) -> None:
        self.scheduler.close(timeout)
        self.instances.clear()


def _warmup_inputs(sample: Any, spec_batch: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for name, inp in sample.inputs.items():
        dtype = from_config(inp.data_type)
        shape = (spec_batch, *inp.dims) if spec_batch else tuple(inp.dims)
        if inp.WhichOneof("input_data_type") == "input_data_file":
            raise ModelLoadError(
                f"warmup '{sample.name}': input_data_file is not supported; use zero_data or "
                "random_data"
            )
        if dtype.name == "BYTES":
            arr = np.full(shape, "0" if inp.zero_data else "1", dtype=object)
        elif inp.random_data:
            arr = rng.integers(0, 2, size=shape).astype(dtype.numpy)
        else:
            arr = np.zeros(shape, dtype=dtype.numpy)
        arrays[name] = arr
    return arrays


def warm_up(model: Model) -> None:
    """Run the config's model_warmup samples through every instance before READY."""
    for sample in model.config.model_warmup:
        batch = max(1, sample.batch_size) if model.signature.max_batch_size > 0 else 0
        inputs = _warmup_inputs(sample, batch)
        for spec in model.signature.inputs:
            if spec.reshape is not None and spec.name in inputs:
                lead = (batch,) if batch else ()
                inputs[spec.name] = inputs[spec.name].reshape(lead + spec.reshape)
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


def build_loader(
    gpus: int, cores: int | None = None
) -> Callable[[str, int, Any, Path, Path], Model]:
    """The repository's loader: config + files -> a READY `Model` (or an exception)."""

    def load(name: str, version: int, config: Any, model_path: Path, model_dir: Path) -> Model:
        start = time.monotonic()
        sig = signature(config, model_dir)
        instances = create_instances(config, model_path, gpus, cores)
        stats = ModelStats(name, version)
        scheduler = Scheduler(name, instances, batch_policy(config), stats)
        model = Model(
            name, version, config, sig, instances, scheduler, stats, time.monotonic() - start
        )
        try:
            warm_up(model)
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
