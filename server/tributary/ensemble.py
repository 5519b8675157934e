"""Ensembles (`platform: "ensemble"`): a DAG of composing models run as one model.

Three parts, kept apart so each is tested on its own:

- `plan(config)`: the structural checks Triton makes on `ensemble_scheduling` before any
  composing model is looked at (every step names a model and maps inputs and outputs, no
  tensor is produced twice, every ensemble output is written, no tensor is left unused; a
  cycle shows as tensors that never become ready). Texts are Triton's
  (docs/model-config.md#ensembles). The result says, per ensemble tensor, which steps consume
  it: the readiness table.
- `check_composing(plan, config, lookup)`: at load, against the composing models now loaded:
  each must have a READY version (the one a step pins, or any), every model input is mapped
  once, mapped outputs exist, and a tensor's datatype and shape agree wherever two models (or
  the ensemble's own inputs/outputs) see it.
- `EnsembleScheduler`: runs one request step by step. A step is submitted to its composing
  model's own scheduler (so that model's dynamic batching, queue policy and statistics apply)
  the moment its last input tensor exists; independent steps therefore run in parallel. No
  thread waits per step: completions arrive as scheduler callbacks, which submit whatever
  became ready. Tensors pass between steps as the numpy arrays the models produced (views,
  no copy, no re-encoding).

Errors from a step are the composing model's own (they name it, as Triton's do); a step whose
model is not available says which step and model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tributary_client._proto import model_config_pb2 as mc

from .config import ENSEMBLE_PLATFORM, ModelSignature, TensorSpec
from .errors import Cancelled, InferenceError, Internal, InvalidArgument, ModelLoadError
from .scheduler import Callback, Closed, WorkItem
from .stats import ModelStats
from .tensors import format_shape

log = logging.getLogger("tributary.ensemble")

PLATFORM = ENSEMBLE_PLATFORM
MAX_STEPS = 256
"""Steps one ensemble may have. Triton sets no limit; a config (a client's override included)
with 10,000 steps would otherwise cost a graph walk and a thread hop per step on every request."""
STEP_REROUTES = 2
"""Times a step whose composing version was retired under it (a reload) is submitted again."""


def is_ensemble(config: mc.ModelConfig) -> bool:
    return bool(config.platform == PLATFORM)


@dataclass(frozen=True)
class Step:
    index: int
    model: str
    version: int | None  # None: the latest READY version (config -1)
    inputs: tuple[tuple[str, str], ...]  # (model input, ensemble tensor)
    outputs: tuple[tuple[str, str], ...]  # (model output, ensemble tensor)

    @property
    def version_text(self) -> str:
        return "" if self.version is None else str(self.version)


@dataclass(frozen=True)
class Plan:
    """The validated DAG. `consumers[t]` lists the steps reading ensemble tensor `t`;
    `needs[i]` is how many distinct tensors step i waits for."""

    name: str
    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    consumers: Mapping[str, tuple[int, ...]]
    needs: tuple[int, ...]

    def dependencies(self) -> list[str]:
        """Composing model names, in step order, each once."""
        return list(dict.fromkeys(s.model for s in self.steps))


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


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _consistent(known: _Node, new: _Node, prefix: str) -> None:
    if known.dtype != new.dtype:
        raise _bad(
            f"{prefix}inconsistent data type: {mc.DataType.Name(known.dtype)} is inferred from "
            f"model {known.model} while {mc.DataType.Name(new.dtype)} is inferred from model "
            f"{new.model}"
        )
    if not _dims_match(known.dims, new.dims) and not _dims_match(known.full, new.full):
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
            if tensor in tensors:
                _consistent(
                    tensors[tensor], node, f"in ensemble {name}, ensemble tensor {tensor}: "
                )
            else:
                tensors[tensor] = node
        model_outputs = {o.name: o for o in cfg.output}
        for model_output, tensor in step.outputs:
            found = model_outputs.get(model_output)
            if found is None:
                raise _bad(
                    f"in ensemble {name}, ensemble tensor {tensor} is mapped from non-existing "
                    f"output {model_output} in model {step.model}"
                )
            node = _node(step.model, step_batching, found.data_type, tuple(found.dims))
            if tensor in tensors:
                _consistent(
                    tensors[tensor], node, f"in ensemble {name}, ensemble tensor {tensor}: "
                )
            else:
                tensors[tensor] = node


# -- execution ---------------------------------------------------------------------------------


class Servable(Protocol):
    """A composing model as a step uses it (tributary.repository.Servable's relevant part)."""

    name: str
    version: int
    signature: ModelSignature
    stats: ModelStats

    @property
    def scheduler(self) -> Any: ...


Resolve = Callable[[str, str], Servable]
"""(model, version text) -> a READY servable; raises the repository's errors."""


def _to_config_shape(arr: np.ndarray, spec: TensorSpec, batched: bool) -> np.ndarray:
    """A model-side output as clients see it (the output's `reshape` undone)."""
    if spec.reshape is None:
        return arr
    lead = (arr.shape[0],) if batched else ()
    return arr.reshape(lead + spec.dims)


def _step_input(
    arr: np.ndarray, spec: TensorSpec, sig: ModelSignature, tensor: str, request_id: str
) -> np.ndarray:
    """Check one tensor against the composing model's input (datatype, shape, batch) and
    give it the model-side shape; the codec's checks, for a tensor no client sent."""
    prefix = f"[request id: {request_id or '<id_unknown>'}] "
    if spec.dtype.name == "BYTES":
        ok = arr.dtype == np.object_ or arr.dtype.kind in ("S", "U")
    else:
        ok = arr.dtype == np.dtype(spec.dtype.numpy)
    if not ok:
        raise InvalidArgument(
            f"{prefix}in ensemble, tensor '{tensor}' of dtype {arr.dtype} does not match input "
            f"'{spec.name}' of model '{sig.name}', which expects '{spec.dtype.name}'"
        )
    batched = sig.max_batch_size > 0
    shape = tuple(arr.shape)
    body = shape[1:] if batched else shape
    if (batched and not shape) or not _dims_match(spec.dims, body) or -1 in body:
        expected = ((-1,) if batched else ()) + spec.dims
        raise InvalidArgument(
            f"{prefix}unexpected shape for input '{spec.name}' for model '{sig.name}'. "
            f"Expected {format_shape(expected)}, got {format_shape(shape)}."
        )
    if batched and not 1 <= shape[0] <= sig.max_batch_size:
        raise InvalidArgument(
            f"{prefix}inference request batch-size must be <= {sig.max_batch_size} for '{sig.name}'"
        )
    if spec.reshape is not None:
        arr = arr.reshape(((shape[0],) if batched else ()) + spec.reshape)
    return arr


class _Run:
    """One ensemble request in flight: its tensors, what each step still waits for, and the
    step requests now inside composing schedulers (for cancel)."""

    __slots__ = (
        "item",
        "callback",
        "tensors",
        "missing",
        "left",
        "lock",
        "failed",
        "inflight",
    )

    def __init__(self, item: WorkItem, callback: Callback, p: Plan) -> None:
        self.item = item
        self.callback = callback
        self.tensors: dict[str, np.ndarray] = dict(item.inputs)
        self.missing = list(p.needs)
        self.left = len(p.steps)
        self.lock = threading.Lock()
        self.failed = False
        self.inflight: dict[int, tuple[Servable, WorkItem]] = {}


class EnsembleScheduler:
    """The ensemble's scheduler: same interface as a model's (`infer`, `submit`, `cancel`,
    `close`), so the data plane treats an ensemble like any model."""

    def __init__(self, p: Plan, resolve: Resolve, signature: ModelSignature) -> None:
        self.plan = p
        self.model_name = p.name
        self._resolve = resolve
        self._sig = signature
        self._lock = threading.Condition()
        self._closing = False
        self._runs: dict[int, _Run] = {}  # id(item) -> run, while in flight

    # -- the scheduler interface ----------------------------------------------------------------

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        """Blocks the caller once for the whole ensemble (steps never hold a thread)."""
        latch = threading.Lock()
        latch.acquire()
        box: list[Any] = [None, None]

        def done(outputs: dict[str, np.ndarray] | None, error: InferenceError | None) -> None:
            box[0], box[1] = outputs, error
            latch.release()

        self.submit(item, done)
        latch.acquire()
        if box[1] is not None:
            raise box[1]
        return box[0]  # type: ignore[no-any-return]

    def submit(self, item: WorkItem, callback: Callback) -> None:
        with self._lock:
            if self._closing:
                refused: InferenceError | None = Closed("Server exiting")
            else:
                refused = None
                run = _Run(item, callback, self.plan)
                self._runs[id(item)] = run
        if refused is not None:
            item.failure_reason = "OTHER"
            callback(None, refused)
            return
        ready = [i for i, n in enumerate(self.plan.needs) if n == 0]
        first = {s for t in item.inputs for s in self.plan.consumers.get(t, ())}
        for t in item.inputs:
            for s in self.plan.consumers.get(t, ()):
                run.missing[s] -= 1
        ready += [s for s in sorted(first) if run.missing[s] == 0]
        for s in ready:
            self._launch(run, s, 0)

    def cancel(self, item: WorkItem) -> bool:
        """Fail the request now; steps still queued in composing schedulers are withdrawn."""
        with self._lock:
            run = self._runs.get(id(item))
        if run is None:
            return False
        with run.lock:
            inflight = list(run.inflight.values())
        self._fail(run, Cancelled("Request was cancelled"), "CANCELED")
        for model, sub in inflight:
            model.scheduler.cancel(sub)
        return True

    def close(self, timeout_s: float) -> None:
        """Refuse new requests and wait (up to `timeout_s`) for those in flight."""
        end = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            self._closing = True
            while self._runs:
                left = end - time.monotonic()
                if left <= 0 or not self._lock.wait(left):
                    break

    # -- one request ---------------------------------------------------------------------------

    def _launch(self, run: _Run, index: int, attempt: int) -> None:
        step = self.plan.steps[index]
        item = run.item
        if run.failed:
            return
        if item.is_active is not None and not item.is_active():
            self._fail(run, Cancelled("Request was cancelled"), "CANCELED")
            return
        try:
            model = self._resolve(step.model, step.version_text)
        except InferenceError as exc:
            self._fail(
                run,
                type(exc)(
                    f"in ensemble '{self.model_name}', step {index}: composing model "
                    f"'{step.model}' is not available: {exc.message}"
                ),
                "OTHER",
            )
            return
        sig = model.signature
        try:
            with run.lock:
                inputs = {
                    mi: _step_input(run.tensors[t], spec, sig, t, item.request_id)
                    for mi, t in step.inputs
                    if (spec := sig.input(mi)) is not None
                }
        except InferenceError as exc:
            self._fail(run, exc, "OTHER")
            return
        batched = sig.max_batch_size > 0
        rows = next(iter(inputs.values())).shape[0] if batched and inputs else 1
        sub = WorkItem(
            inputs=inputs,
            rows=rows,
            outputs=tuple(mo for mo, _ in step.outputs),
            priority=item.priority,
            timeout_us=item.timeout_us,
            is_active=item.is_active,
            request_id=item.request_id,
        )
        start = time.perf_counter_ns()

        def done(outputs: dict[str, np.ndarray] | None, error: InferenceError | None) -> None:
            self._step_done(run, index, attempt, model, sub, start, outputs, error)

        with run.lock:
            run.inflight[index] = (model, sub)
        model.scheduler.submit(sub, done)

    def _step_done(
        self,
        run: _Run,
        index: int,
        attempt: int,
        model: Servable,
        sub: WorkItem,
        start: int,
        outputs: dict[str, np.ndarray] | None,
        error: InferenceError | None,
    ) -> None:
        total = time.perf_counter_ns() - start
        with run.lock:
            run.inflight.pop(index, None)
        if error is not None:
            if isinstance(error, Closed) and attempt < STEP_REROUTES and not self._closing:
                self._launch(run, index, attempt + 1)  # a reload retired that version
                return
            model.stats.request_failure(total_ns=total, reason=sub.failure_reason or "OTHER")
            self._fail(run, error, sub.failure_reason or "OTHER")
            return
        assert outputs is not None
        model.stats.request_success(
            total_ns=total,
            queue_ns=sub.queue_ns,
            compute_input_ns=sub.compute_input_ns,
            compute_infer_ns=sub.compute_infer_ns,
            compute_output_ns=sub.compute_output_ns,
            rows=sub.rows,
            now_ms=time.time_ns() // 1_000_000,
        )
        step = self.plan.steps[index]
        sig = model.signature
        batched = sig.max_batch_size > 0
        ready: list[int] = []
        with run.lock:
            if run.failed:
                return
            for mo, tensor in step.outputs:
                spec = sig.output(mo)
                arr = outputs[mo]
                run.tensors[tensor] = _to_config_shape(arr, spec, batched) if spec else arr
                for s in self.plan.consumers.get(tensor, ()):
                    run.missing[s] -= 1
                    if run.missing[s] == 0:
                        ready.append(s)
            run.left -= 1
            finished = run.left == 0
        if finished:
            self._succeed(run)
            return
        for s in ready:
            self._launch(run, s, 0)

    def _succeed(self, run: _Run) -> None:
        try:
            results = {o: run.tensors[o] for o in run.item.outputs}
        except KeyError as exc:  # plan() guarantees every output is written
            self._fail(run, Internal(f"ensemble '{self.model_name}' lost tensor {exc}"), "OTHER")
            return
        if not self._retire(run):
            return
        run.callback(results, None)

    def _fail(self, run: _Run, error: InferenceError, reason: str) -> None:
        with run.lock:
            if run.failed:
                return
            run.failed = True
        if not self._retire(run):
            return
        run.item.failure_reason = reason
        run.callback(None, error)

    def _retire(self, run: _Run) -> bool:
        """Take the run out of the table; False when someone else already completed it."""
        with self._lock:
            gone = self._runs.pop(id(run.item), None)
            if self._closing:
                self._lock.notify_all()
        return gone is run


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
