"""Execute one batch: concatenate once, run, check, split into views.

Separate from the scheduler's threads and locks so the one hot-path copy (the concatenation)
and the output checks sit in one small place. "Split, don't copy" (docs/architecture.md): a lone
request's arrays go to the instance as they are; a merged batch is concatenated once per
input; every output's first dimension must equal the batch rows before it is split by row
offsets into views; each request gets only the outputs it asked for (the batch runs their union).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InferenceError, Internal
from ..stats import ModelStats
from .batchqueue import Entry


class Instance(Protocol):
    """One model instance (an ONNX Runtime session). `run` must release the GIL while it
    computes; inputs carry the batch dimension first when max_batch_size > 0."""

    name: str

    def run(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class BatchContext:
    """What every execution of one model version needs besides the batch itself."""

    model_name: str
    check_rows: bool  # the model has a batch dimension (max_batch_size > 0)
    stats: ModelStats
    clock: Callable[[], int]


def run_instance(
    inst: Instance, inputs: dict[str, np.ndarray], names: Sequence[str], model_name: str
) -> dict[str, np.ndarray]:
    """One call into the backend: its InferenceErrors pass through unchanged; anything else
    is a backend bug, answered as Internal naming the model and instance."""
    try:
        return inst.run(inputs, names)
    except InferenceError:
        raise
    except Exception as exc:
        raise Internal(
            f"inference failed for model '{model_name}' on instance "
            f"'{inst.name}': {type(exc).__name__}: {exc}"
        ) from exc


def run_batch(ctx: BatchContext, entries: list[Entry], rows: int, inst: Instance) -> None:
    """Run `entries` as one execution and set `result` or `error` plus timings on each. Never
    raises: whatever goes wrong fails this batch only, and the instance stays usable. Backend
    InferenceErrors pass through unchanged; anything else becomes Internal naming the model.
    Only successful executions are recorded in the stats (`ModelStats.execution`)."""
    clock = ctx.clock
    t0 = clock()
    t1 = t2 = t0
    first = entries[0].item
    try:
        if len(entries) == 1:
            inputs = first.inputs
            names = first.outputs
        else:
            inputs = {n: np.concatenate([e.item.inputs[n] for e in entries]) for n in first.inputs}
            names = tuple(dict.fromkeys(n for e in entries for n in e.item.outputs))
        t1 = clock()
        outputs = run_instance(inst, inputs, names, ctx.model_name)
        t2 = clock()
        _check_outputs(ctx, outputs, names, rows)
        if len(entries) == 1:
            entries[0].result = {n: outputs[n] for n in first.outputs}
        else:
            offset = 0
            for e in entries:
                end = offset + e.item.rows
                e.result = {n: outputs[n][offset:end] for n in e.item.outputs}
                offset = end
    except Exception as exc:
        error = (
            exc
            if isinstance(exc, InferenceError)
            else Internal(f"failed to run a batch of model '{ctx.model_name}': {exc}")
        )
        for e in entries:
            e.fail(error, "BACKEND")
            e.result = None
        stamp(entries, t0, t1, t2, clock(), rows)
        return
    t3 = clock()
    stamp(entries, t0, t1, t2, t3, rows)
    ctx.stats.execution(
        batch_rows=rows,
        compute_input_ns=t1 - t0,
        compute_infer_ns=t2 - t1,
        compute_output_ns=t3 - t2,
    )


def _check_outputs(
    ctx: BatchContext, outputs: dict[str, np.ndarray], names: Sequence[str], rows: int
) -> None:
    for n in names:
        a = outputs.get(n)
        if a is None:
            raise Internal(f"model '{ctx.model_name}' did not produce output '{n}'")
        if ctx.check_rows and (a.ndim == 0 or a.shape[0] != rows):
            got = "a scalar" if a.ndim == 0 else f"first dimension {a.shape[0]}"
            raise Internal(
                f"output '{n}' of model '{ctx.model_name}' has {got}, "
                f"expected the batch size {rows}"
            )


def stamp(entries: list[Entry], t0: int, t1: int, t2: int, t3: int, rows: int) -> None:
    """Per-request timings, Triton-style: every request of a batch is charged the whole
    batch's compute phases; queue time runs from its enqueue to the batch's start."""
    for e in entries:
        item = e.item
        item.queue_start_ns = e.enqueue_ns
        item.compute_start_ns = t0
        item.queue_ns = t0 - e.enqueue_ns
        item.compute_input_ns = t1 - t0
        item.compute_infer_ns = t2 - t1
        item.compute_output_ns = t3 - t2
        item.batch_rows = rows
