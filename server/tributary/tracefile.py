"""Mode triton: Triton's JSON trace file, written from finished traces on the tracer's thread
(docs/protocol.md#tracing)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tracing import Record

log = logging.getLogger("tributary.tracing")

MAX_BUFFERED_TRACES = 10_000
"""Traces held in memory before they are written to an indexed file anyway."""


class TritonFile:
    """Triton's JSON trace output: a JSON array of objects, per trace one with the model and
    ids, then one per timestamp (`{"id": N, "timestamps": [{"name": ..., "ns": ...}]}`,
    monotonic nanoseconds as Triton's steady clock). With log_frequency N, every N traces go
    to `<file>.<index>`; what is left goes to `<file>` at shutdown. At most
    MAX_BUFFERED_TRACES are held: more are written to an indexed file early."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = []
        self._traces = 0
        self._next_id = 1
        self._index = 0

    def add(self, record: Record) -> None:
        trace, end_ns, version, timings = (
            record.trace,
            record.end_ns,
            record.version,
            record.timings,
        )
        stamps = [("REQUEST_START", trace.start_ns)]
        if timings is not None:
            queued, t, t_input, t_infer, t_output = timings[:5]
            stamps.append(("QUEUE_START", queued))
            if t:
                stamps += [
                    ("COMPUTE_START", t),
                    ("COMPUTE_INPUT_END", t + t_input),
                    ("COMPUTE_OUTPUT_START", t + t_input + t_infer),
                    ("COMPUTE_END", t + t_input + t_infer + t_output),
                ]
        stamps.append(("REQUEST_END", end_ns))
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            head: dict[str, Any] = {"id": tid, "model_name": trace.model}
            head["model_version"] = int(version) if version.isdigit() else -1
            if trace.request_id:
                head["request_id"] = trace.request_id
            self._entries.append(head)
            self._entries += [
                {"id": tid, "timestamps": [{"name": name, "ns": ns}]} for name, ns in stamps
            ]
            self._traces += 1
            frequency = trace.setting.log_frequency
            if (frequency and self._traces >= frequency) or self._traces >= MAX_BUFFERED_TRACES:
                entries, self._entries, self._traces = self._entries, [], 0
                name = self.path.with_name(f"{self.path.name}.{self._index}")
                self._index += 1
            else:
                return
        _write(name, entries)

    def close(self) -> None:
        with self._lock:
            entries, self._entries, self._traces = self._entries, [], 0
        if entries:
            _write(self.path, entries)


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    try:
        path.write_text(json.dumps(entries))
    except OSError as exc:
        log.error("could not write trace file %s: %s", path, exc.strerror or exc)
