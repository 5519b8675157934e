"""Ensembles (`platform: "ensemble"`): loading one, i.e. checking its DAG, and the servable.

- `plan(config)`: the structural checks Triton makes on `ensemble_scheduling` before any
  composing model is looked at (every step names a model and maps inputs and outputs, no
  tensor is produced twice, every ensemble output is written, no tensor is left unused; a
  cycle shows as tensors that never become ready), texts as Triton's
  (docs/model-config.md#ensembles). The result says, per ensemble tensor, which steps consume
  it: the readiness table the scheduler runs on.
- `check_composing(plan, config, lookup)`: at load, against the composing models now loaded:
  each must have a READY version (the one a step pins, or any), every model input is mapped
  once, mapped outputs exist, and a tensor's datatype and shape agree wherever two models (or
  the ensemble's own inputs/outputs) see it.
- `EnsembleModel`: what the repository holds; running requests is
  `tributary.scheduler.ensemble.EnsembleScheduler`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tributary_client._proto import model_config_pb2 as mc

from .config import ENSEMBLE_PLATFORM, ModelSignature
from .errors import ModelLoadError
from .scheduler.ensemble import EnsembleScheduler, Plan, Resolve, Step, dims_match
from .stats import ModelStats
from .tensors import format_shape

log = logging.getLogger("tributary.ensemble")

PLATFORM = ENSEMBLE_PLATFORM
MAX_NESTING = 16
"""Ensembles inside ensembles, at most this deep (the ensemble itself counts as one). Each level
is one more nested submit on the thread that completes a step, so an unbounded chain -- built
by loading ensembles one over the other -- would end in a RecursionError mid-request."""
MAX_STEPS = 256
"""Steps one ensemble may have. Triton sets no limit; a config (a client's override included)
with 10,000 steps would otherwise cost a graph walk and a thread hop per step on every request."""


def is_ensemble(config: mc.ModelConfig) -> bool:
    return bool(config.platform == PLATFORM)


def _bad(message: str) -> ModelLoadError:
    return ModelLoadError(message)


def plan(config: mc.ModelConfig) -> Plan:
    """Triton's structural validation of `ensemble_scheduling` (raises ModelLoadError)."""
    name = config.name
    if config.instance_group:
        raise _bad(f"instance group should not be specified for ensemble '{name}'")
    if config.HasField("optimization"):
        raise _bad(f"optimization should not be specified for ensemble '{name}'")
    if config.model_warmup:
        raise _bad(f"model_warmup can not be specified for ensemble '{name}'")
    raw_steps = config.ensemble_scheduling.step
    if not raw_steps:
        raise _bad(f"must specify 'step' for ensemble '{name}'")
    if len(raw_steps) > MAX_STEPS:
        raise _bad(
            f"ensemble '{name}' has {len(raw_steps)} steps; this server allows at most {MAX_STEPS}"
        )
    produced: set[str] = set()
    # tensor -> tensors it is computed from (Triton's prev_nodes), and the reverse
    prev: dict[str, list[str]] = {}
    nexts: dict[str, list[str]] = {}
    steps: list[Step] = []
    for idx, element in enumerate(raw_steps):
        if not element.model_name:
            raise _bad(f"must specify 'model_name' in step {idx} of ensemble '{name}'")
        if not element.input_map:
            raise _bad(f"must specify 'input_map' in step {idx} of ensemble '{name}'")
        if not element.output_map:
            raise _bad(f"must specify 'output_map' in step {idx} of ensemble '{name}'")
        outs: list[str] = []
        for tensor in element.output_map.values():
            if tensor in produced:
                raise _bad(
                    f"ensemble tensor '{tensor}' can appear in an output map only once for "
                    f"ensemble '{name}' step {idx}"
                )
            produced.add(tensor)
            prev.setdefault(tensor, [])
            nexts.setdefault(tensor, [])
            outs.append(tensor)
        # protobuf maps have unique keys, so Triton's "mapped to multiple ensemble tensors in
        # one step" cannot arise from a parsed config.
        for tensor in element.input_map.values():
            prev.setdefault(tensor, [])
            nexts.setdefault(tensor, [])
            for out in outs:
                prev[out].append(tensor)
                nexts[tensor].append(out)
        version = element.model_version
        steps.append(
            Step(
                index=idx,
                model=element.model_name,
                version=None if version < 0 else int(version),
                inputs=tuple(sorted(element.input_map.items())),
                outputs=tuple(sorted(element.output_map.items())),
            )
        )

    # Data flow: from the ensemble inputs, a tensor is ready once all it depends on is.
    ready: set[str] = set()
    queue: list[str] = []
    for inp in config.input:
        if inp.name not in prev:
            raise _bad(f"ensemble input '{inp.name}' for ensemble {name}' is not used")
        ready.add(inp.name)
        queue.append(inp.name)
    while queue:
        node = queue.pop()
        for nxt in nexts[node]:
            if nxt not in ready and all(p in ready for p in prev[nxt]):
                ready.add(nxt)
                queue.append(nxt)
    outputs: list[str] = []
    for output in config.output:
        if output.name not in prev:
            raise _bad(f"ensemble output '{output.name}' for ensemble {name}' is not used")
        if output.name not in ready:
            raise _bad(_not_written(name, output.name, prev, ready))
        outputs.append(output.name)
    for tensor in sorted(prev):
        if tensor in outputs:
            continue
        if tensor not in ready or not nexts[tensor]:
            raise _bad(f"ensemble tensor '{tensor}' is unused in ensemble '{name}'")

    consumers: dict[str, list[int]] = {}
    needs: list[int] = []
    for s in steps:
        wanted = {t for _, t in s.inputs}
        needs.append(len(wanted))
        for t in wanted:
            consumers.setdefault(t, []).append(s.index)
    return Plan(
        name=name,
        steps=tuple(steps),
        inputs=tuple(i.name for i in config.input),
        outputs=tuple(outputs),
        consumers={t: tuple(v) for t, v in consumers.items()},
        needs=tuple(needs),
    )


def _not_written(name: str, output: str, prev: dict[str, list[str]], ready: set[str]) -> str:
    """Triton's text for an output no step can produce, naming the first not-ready source."""
    message = f"output '{output}' for ensemble '{name}' is not written"
    last, seen = output, {output}
    nodes = prev[output]
    while nodes:
        following: list[str] = []
        for node in nodes:
            if node not in ready and node not in seen:
                seen.add(node)
                last = node
                following = prev[node]
                break
        nodes = following
    if last != output:
        message += f": at least one of its depending tensors, '{last}', is not connected"
    return message


# -- load-time checks against the composing models ---------------------------------------------


class Composing(Protocol):
    """What the load-time check needs of a loaded composing model."""

    name: str
    version: int
    config: mc.ModelConfig


@dataclass
class _Node:
    model: str
    dtype: int
    dims: tuple[int, ...]
    full: tuple[int, ...]


def _node(model: str, batching: bool, dtype: int, dims: tuple[int, ...]) -> _Node:
    return _Node(model, dtype, dims, ((-1,) if batching else ()) + dims)


def _consistent(known: _Node, new: _Node, prefix: str) -> None:
    if known.dtype != new.dtype:
        raise _bad(
            f"{prefix}inconsistent data type: {mc.DataType.Name(known.dtype)} is inferred from "
            f"model {known.model} while {mc.DataType.Name(new.dtype)} is inferred from model "
            f"{new.model}"
        )
    if not dims_match(known.dims, new.dims) and not dims_match(known.full, new.full):
        raise _bad(
            f"{prefix}inconsistent shape: {format_shape(known.full)} is inferred from model "
            f"{known.model} while {format_shape(new.full)} is inferred from model {new.model}"
        )


def check_composing(
    p: Plan, config: mc.ModelConfig, lookup: Callable[[str, int | None], Composing | None]
) -> None:
    """Triton's dependency and tensor-consistency checks. `lookup(model, version)` returns the
    READY composing version (None: not loaded; version None means the latest)."""
    name = config.name
    batching = config.max_batch_size > 0
    tensors: dict[str, _Node] = {}
    for inp in config.input:
        dims = tuple(inp.reshape.shape) if inp.HasField("reshape") else tuple(inp.dims)
        tensors[inp.name] = _node(name, batching, inp.data_type, dims)
    for out in config.output:
        dims = tuple(out.reshape.shape) if out.HasField("reshape") else tuple(out.dims)
        tensors[out.name] = _node(name, batching, out.data_type, dims)
    for step in p.steps:
        model = lookup(step.model, step.version)
        if model is None:
            if step.version is not None and lookup(step.model, None) is not None:
                raise _bad(
                    f"ensemble '{name}' depends on '{step.model}' whose required version "
                    f"{step.version} is not loaded"
                )
            raise _bad(f"ensemble '{name}' depends on '{step.model}' which has no loaded version")
        cfg = model.config
        if cfg.max_batch_size != 0 and cfg.max_batch_size < config.max_batch_size:
            raise _bad(
                f"ensemble {name} allows maximum batch size {config.max_batch_size}, but it "
                f"contains model {step.model} which only allows maximum batch size to be "
                f"{cfg.max_batch_size}"
            )
        step_batching = cfg.max_batch_size > 0
        model_inputs = {i.name: i for i in cfg.input}
        for model_input, tensor in step.inputs:
            if model_input not in model_inputs:
                raise _bad(
                    f"in ensemble {name}, ensemble tensor {tensor} is mapping to non-existing "
                    f"input {model_input} in model {step.model}"
                )
        mapped = {mi for mi, _ in step.inputs}
        for inp in cfg.input:
            if inp.name not in mapped:
                if inp.optional:
                    continue
                raise _bad(
                    f"in ensemble {name}, input {inp.name} in model {step.model} is not mapped "
                    "to any ensemble tensors"
                )
            tensor = dict(step.inputs)[inp.name]
            node = _node(step.model, step_batching, inp.data_type, tuple(inp.dims))
            _meet(tensors, tensor, node, name)
        model_outputs = {o.name: o for o in cfg.output}
        for model_output, tensor in step.outputs:
            found = model_outputs.get(model_output)
            if found is None:
                raise _bad(
                    f"in ensemble {name}, ensemble tensor {tensor} is mapped from non-existing "
                    f"output {model_output} in model {step.model}"
                )
            node = _node(step.model, step_batching, found.data_type, tuple(found.dims))
            _meet(tensors, tensor, node, name)


def _meet(tensors: dict[str, _Node], tensor: str, node: _Node, name: str) -> None:
    """An ensemble tensor seen at one more step: the first sighting defines it, every later
    one must agree with it (datatype, shape, batching)."""
    if tensor in tensors:
        _consistent(tensors[tensor], node, f"in ensemble {name}, ensemble tensor {tensor}: ")
    else:
        tensors[tensor] = node


def check_nesting(name: str, p: Plan, lookup: Lookup) -> None:
    """Triton's circular-dependency check, against the ensembles loaded now, and our depth
    bound. Steps resolve models by name when a request runs, so a composing ensemble that
    (through any chain) names `name` again would run this ensemble inside itself for ever:
    reloading one ensemble of a chain onto another is how such a cycle forms, and the loader's
    own check sees only models not yet loaded."""
    heights: dict[str, int] = {}

    def height(model: Composing, chain: list[str]) -> int:
        """Levels of ensembles from `model` down (1: no composing ensemble)."""
        known = heights.get(model.name)
        if known is not None:
            return known
        tallest = 0
        for step in model.config.ensemble_scheduling.step:
            if step.model_name == name or step.model_name in chain:
                raise _bad(
                    f"circular dependency between ensembles: {step.model_name} -> ... -> "
                    f"{chain[-1]} -> {step.model_name}"
                )
            version = None if step.model_version < 0 else int(step.model_version)
            sub = lookup(step.model_name, version)
            if sub is None or not is_ensemble(sub.config):
                continue
            if len(chain) + 1 > MAX_NESTING:
                raise _bad(
                    f"ensemble '{name}' is part of a circular or too deep ensemble dependency: "
                    + " -> ".join([*chain, step.model_name])
                    + f" (at most {MAX_NESTING} levels)"
                )
            tallest = max(tallest, height(sub, [*chain, step.model_name]))
        heights[model.name] = tallest + 1
        return tallest + 1

    for step in p.steps:
        model = lookup(step.model, step.version)
        if model is not None and is_ensemble(model.config):
            height(model, [name, step.model])


# -- execution ---------------------------------------------------------------------------------


# -- the servable ------------------------------------------------------------------------------


class EnsembleModel:
    """A READY ensemble version: what the repository and the data plane hold. It has no
    instances; its statistics count whole ensemble requests (no compute times, as Triton's),
    while each step is counted by its composing model."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        sig: ModelSignature,
        scheduler: EnsembleScheduler,
        load_seconds: float,
    ) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.signature = sig
        self.scheduler = scheduler
        self.stats = ModelStats(name, version)
        self.load_seconds = load_seconds
        self.instances: list[Any] = []
        self.cache: Any = None  # a tributary.cache.ModelCache when response_cache is on

    @property
    def dependencies(self) -> list[str]:
        return self.scheduler.plan.dependencies()

    def close(self, timeout: float) -> None:
        self.scheduler.close(timeout)
        if self.cache is not None:
            self.cache.close()


Lookup = Callable[[str, int | None], Composing | None]


def build_ensemble(
    name: str,
    version: int,
    config: mc.ModelConfig,
    sig: ModelSignature,
    resolve: Resolve,
    lookup: Lookup,
) -> EnsembleModel:
    """Validate against the composing models loaded now and build the servable."""
    start = time.monotonic()
    p = plan(config)
    check_composing(p, config, lookup)
    check_nesting(name, p, lookup)
    scheduler = EnsembleScheduler(p, resolve, sig)
    log.info(
        "loaded ensemble '%s' version %d: %d step(s) over %s",
        name,
        version,
        len(p.steps),
        ", ".join(p.dependencies()),
        extra={"model": name},
    )
    return EnsembleModel(name, version, config, sig, scheduler, time.monotonic() - start)
