"""Running an ensemble: one request, step by step, through the composing models' schedulers.

The DAG was validated when the ensemble loaded (tributary.ensemble, Triton's checks); this is
what runs it. A step is submitted to its composing model's own scheduler (so that model's
dynamic batching, queue policy and statistics apply) the moment its last input tensor exists;
independent steps therefore run in parallel. No thread waits per step: completions arrive as
scheduler callbacks, which submit whatever became ready (the caller of `infer` waits once for
the whole request). Tensors pass between steps as the numpy arrays the models produced (views,
no copy, no re-encoding); each is checked against the next model's input (datatype, shape,
batch size) as the codec checks a client's.

Errors from a step are the composing model's own (they name it, as Triton's do); a step whose
model is not available names the step and the model. A timeout, priority or sequence (ID,
START, END: a composing model may batch sequences) on the request applies to every step;
cancellation (`is_active`, `cancel`) stops the steps not yet started and withdraws queued ones.
Each step is counted in its composing model's statistics.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import ModelSignature, TensorSpec
from ..errors import Cancelled, InferenceError, Internal, InvalidArgument
from ..stats import ModelStats
from ..tensors import format_shape
from .base import Closed
from .batchqueue import Callback, WorkItem

STEP_REROUTES = 2
"""Times a step whose composing version was retired under it (a reload) is submitted again."""


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


def dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


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
    if (batched and not shape) or not dims_match(spec.dims, body) or -1 in body:
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
        # Every ensemble input counts as present, sent or not: an optional one left out is
        # simply absent from the steps that read it (their model must allow that).
        for t in self.plan.inputs:
            for s in self.plan.consumers.get(t, ()):
                run.missing[s] -= 1
        self._start(run, [s for s, missing in enumerate(run.missing) if missing == 0])

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

    def _start(self, run: _Run, ready: list[int], attempt: int = 0) -> None:
        """Submit steps whose inputs are ready; whatever goes wrong fails the request (never
        strands it). A loop, not recursion: steps answered at once (a composing model's cache)
        make more steps ready, up to MAX_STEPS of them."""
        todo = deque((index, attempt) for index in ready)  # in step order
        while todo:
            index, tries = todo.popleft()
            try:
                todo.extend((s, 0) for s in self._submit_step(run, index, tries))
            except Exception as exc:  # a bug or a composing model changed under us: answer
                self._fail(run, self._unexpected(index, exc), "OTHER")

    def _unexpected(self, index: int, exc: Exception) -> Internal:
        step = self.plan.steps[index]
        return Internal(
            f"in ensemble '{self.model_name}', step {index} (model '{step.model}') failed: "
            f"{type(exc).__name__}: {exc}"
        )

    def _submit_step(self, run: _Run, index: int, attempt: int) -> list[int]:
        """Submit step `index`; returns the steps that became ready if it was answered at
        once (a cache hit), else [] (its completion callback carries on)."""
        step = self.plan.steps[index]
        item = run.item
        if run.failed:
            return []
        if item.is_active is not None and not item.is_active():
            self._fail(run, Cancelled("Request was cancelled"), "CANCELED")
            return []
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
            return []
        sig = model.signature
        try:
            with run.lock:
                inputs = {
                    mi: _step_input(run.tensors[t], spec, sig, t, item.request_id)
                    for mi, t in step.inputs
                    if t in run.tensors and (spec := sig.input(mi)) is not None
                }
        except InferenceError as exc:
            self._fail(run, exc, "OTHER")
            return []
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
            sequence=item.sequence,  # a stateful composing model needs the ID and flags
        )
        start = time.perf_counter_ns()
        # A composing model with the response cache on answers from it, as for a client.
        cache = getattr(model, "cache", None)
        key = b""
        if cache is not None:
            key = cache.key(inputs, [(o, 0) for o in sub.outputs])
            hit = cache.get(key)
            if hit is not None:
                took = time.perf_counter_ns() - start
                model.stats.request_cache_hit(
                    total_ns=took, hit_ns=took, now_ms=time.time_ns() // 1_000_000
                )
                return self._advance(run, index, model, hit)
        lookup_ns = time.perf_counter_ns() - start

        def done(outputs: dict[str, np.ndarray] | None, error: InferenceError | None) -> None:
            try:
                if error is None and cache is not None and outputs is not None:
                    t0 = time.perf_counter_ns()
                    cache.put(key, outputs)
                    model.stats.cache_miss(miss_ns=lookup_ns + time.perf_counter_ns() - t0)
                self._step_done(run, index, attempt, model, sub, start, outputs, error)
            except Exception as exc:  # e.g. a reloaded model without a mapped output
                self._fail(run, self._unexpected(index, exc), "OTHER")

        with run.lock:
            run.inflight[index] = (model, sub)
        model.scheduler.submit(sub, done)
        return []

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
                self._start(run, [index], attempt + 1)  # a reload retired that version
                return
            model.stats.request_failure(total_ns=total, reason=sub.failure_reason or "OTHER")
            self._fail(run, error, sub.failure_reason or "OTHER")
            return
        assert outputs is not None
        sub.count_success(model.stats, total)
        self._start(run, self._advance(run, index, model, outputs))

    def _advance(
        self, run: _Run, index: int, model: Servable, outputs: dict[str, np.ndarray]
    ) -> list[int]:
        """Step `index` produced `outputs`: store its tensors; returns the steps that became
        ready (the caller starts them)."""
        step = self.plan.steps[index]
        sig = model.signature
        batched = sig.max_batch_size > 0
        ready: list[int] = []
        with run.lock:
            if run.failed:
                return []
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
            return []
        return ready

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
