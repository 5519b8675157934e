"""Scheduling: one class per mode, chosen per loaded model version by `make_scheduler`.

- `base.py`: the interface and what the modes share (completion, waiting, ordering, close).
- `direct.py`: no batching; a request runs on a free instance, inline where it can.
- `batching.py`: dynamic batching; batches form when an instance becomes free.
- `sequence.py`: sequence batching; sequences pinned to slots, controls and implicit state.
- `batchqueue.py`: the queue's rules, pure and clock-injected; `batchrun.py`: one execution.
- `ensemble.py`: an ensemble's DAG, each step submitted to its composing model's scheduler.
- `cache.py`: the response cache the data plane asks before a scheduler (not a mode: it
  imports nothing of this package; it lives here because it decides whether scheduling
  happens at all). `--cache-config` is parsed in `cli.py`, which must not import grpc.

Modes import `base`, `batchqueue` and `batchrun`, never each other. Nothing in this package
knows protobuf or gRPC. docs/architecture.md has the path of one request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..stats import ModelStats
from .base import Closed, Scheduler
from .batching import BatchingScheduler
from .batchqueue import BatchPolicy, Callback, QueuePolicy, SequenceFlags, WorkItem
from .batchrun import Instance
from .direct import DirectScheduler
from .sequence import SequencePolicy, SequenceScheduler

__all__ = [
    "BatchPolicy",
    "BatchingScheduler",
    "Callback",
    "Closed",
    "DirectScheduler",
    "Instance",
    "QueuePolicy",
    "Scheduler",
    "SequenceFlags",
    "SequencePolicy",
    "SequenceScheduler",
    "WorkItem",
    "make_scheduler",
]


def make_scheduler(
    model_name: str,
    instances: Sequence[Instance],
    policy: BatchPolicy,
    stats: ModelStats,
    *,
    clock: Callable[[], int] = time.monotonic_ns,
) -> Scheduler:
    """The scheduler for a model version's policy: batching when dynamic batching applies."""
    mode = BatchingScheduler if policy.batching else DirectScheduler
    return mode(model_name, instances, policy, stats, clock=clock)
