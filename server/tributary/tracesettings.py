"""Trace settings, as tritonserver has them: parsed from --trace-config, read and changed at run
time through TraceSetting, and asked once per request whether to trace it.

Settings (docs/protocol.md#tracing): `level` (OFF, or TIMESTAMPS and/or TENSORS), `rate` (trace
one request in N), `count` (traces left to take; -1 unlimited), `log_frequency` and `file`
(the JSON trace file of mode `triton`), and `mode` (triton or opentelemetry, fixed at
start-up). There is one global setting and, per model, an optional override of some fields;
a model's fields that are not overridden follow the global ones, and a TraceSetting that
names a field without a value clears that override (for the global setting: back to the
command line's value). A changed setting starts counting afresh: its `count` is the number of
traces still to take, and the RPC reports what is left.

Sampling (`Setting.sample`), Triton's rule: every request of a model is counted, the
rate-th, 2*rate-th, ... are traced while `count` is not used up. In mode opentelemetry a
request whose client sent a valid W3C `traceparent` is always traced (rate and count do not
apply, and it does not use up the count), so that a caller's trace is never cut in two;
`rate=0` then traces only such requests.

The command line is parsed by `tributary.traceconfig`; `tributary.tracing` builds on this.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .constants import INT32_MAX
from .errors import InvalidArgument, Unimplemented
from .traceconfig import (
    LEVELS,
    MIN_COUNT,
    OPENTELEMETRY,
    TRITON,
    UINT32_MAX,
    TraceConfig,
)

FIELDS = ("level", "rate", "count", "log_frequency")
"""The fields TraceSetting can override per model (`file` and `mode` are start-up only)."""


# -- run-time settings ------------------------------------------------------------------------


@dataclass
class Setting:
    """One effective setting (global, or a model's) and its sampling counters. Replaced, never
    edited, when TraceSetting changes it; `overridden` names a model's own fields."""

    level: frozenset[str]
    rate: int
    count: int
    log_frequency: int
    file: str
    mode: str
    overridden: frozenset[str] = frozenset()
    seen: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def reason(self) -> str:
        """Why this setting traces nothing by rate (Triton's texts), or ""."""
        if not self.level:
            return "tracing is disabled"
        if self.rate == 0:
            return "sample rate must be non-zero"
        if self.mode == TRITON and not self.file:
            return "trace file name is not given"
        return ""

    def sample(self, propagated: bool) -> bool:
        """Whether to trace this request (Triton's rule, see the module docstring)."""
        hit = False
        if self.rate:
            with self._lock:
                if (self.count == 0 or self.reason) and not propagated:
                    return False
                self.seen += 1
                hit = self.seen % self.rate == 0 and self.count != 0
                if hit and self.count > 0:
                    self.count -= 1
        return hit or (propagated and self.mode == OPENTELEMETRY)

    def value(self, name: str) -> object:
        return getattr(self, name)


def level_words(level: frozenset[str]) -> list[str]:
    return [lv for lv in LEVELS if lv in level] or ["OFF"]


class TraceSettings:
    """The global setting and the models' overrides. Reads (per request) are lock-free: the
    dict is replaced, never changed in place, under `_write`."""

    def __init__(self, config: TraceConfig) -> None:
        self.config = config
        self._default = self._make({})
        self.current = self._make({})
        self.models: dict[str, Setting] = {}
        self._write = threading.Lock()

    def _make(self, values: Mapping[str, object]) -> Setting:
        """A setting with `values` over the command line's."""
        cfg = self.config
        fields: dict[str, object] = {
            "level": cfg.level,
            "rate": cfg.rate,
            "count": cfg.count,
            "log_frequency": cfg.log_frequency,
        }
        fields.update(values)
        return Setting(file=cfg.file, mode=cfg.mode, **fields)  # type: ignore[arg-type]

    def get(self, model: str) -> Setting:
        return self.models.get(model) or self.current

    @property
    def active(self) -> bool:
        """Whether any request can be traced at all (the one check on the untraced path)."""
        return bool(self.current.level) or any(s.level for s in self.models.values())

    def update(self, model: str, update: Mapping[str, Sequence[str] | None]) -> None:
        """Apply a TraceSetting update (values already parsed by `parse_update`)."""
        changes, cleared = parse_update(update)
        with self._write:
            if not model:
                own = {f: self.current.value(f) for f in self.current.overridden}
                own.update(changes)
                for name in cleared:
                    own.pop(name, None)
                new = self._make(own)
                new.overridden = frozenset(own)
                _check(new)
                models: dict[str, Setting] = {}
                for name, old in self.models.items():
                    made = self._model(new, old, {}, set())
                    if made is not None:
                        models[name] = made
                self.current = new
                self.models = models
                return
            made = self._model(self.current, self.models.get(model), changes, cleared)
            models = dict(self.models)
            if made is None:
                models.pop(model, None)
            else:
                models[model] = made
            self.models = models

    def _model(
        self,
        base: Setting,
        old: Setting | None,
        changes: Mapping[str, object],
        cleared: set[str],
    ) -> Setting | None:
        """A model's setting after an update: its own fields over the global ones; None when
        it has none of its own left. Unchanged settings keep their counters."""
        own = {f: old.value(f) for f in old.overridden} if old is not None else {}
        own.update(changes)
        for name in cleared:
            own.pop(name, None)
        if not own:
            return None
        values = {f: base.value(f) for f in FIELDS}
        values.update(own)
        if old is not None and not changes and not cleared:
            if all(old.value(f) == v for f, v in values.items() if f not in own):
                return old
        new = self._make(values)
        new.overridden = frozenset(own)
        _check(new)
        return new

    def response(self, model: str) -> dict[str, list[str]]:
        """The settings as TraceSetting answers them (strings, Triton's keys)."""
        s = self.get(model)
        out: dict[str, list[str]] = {
            "trace_level": level_words(s.level),
            "trace_rate": [str(s.rate)],
            "trace_count": [str(s.count)],
        }
        if s.mode == TRITON:
            out["log_frequency"] = [str(s.log_frequency)]
            out["trace_file"] = [s.file]
        out["trace_mode"] = [s.mode]
        for key, value in self.config.mode_settings:
            out.setdefault(key, []).append(value)
        return out


def _check(setting: Setting) -> None:
    """Triton refuses a setting that would trace yet cannot (the one invalid setting allowed
    is one that disables tracing)."""
    reason = setting.reason
    if setting.level and reason:
        raise InvalidArgument(f"Attempting to set invalid trace setting :{reason}")


def _one(key: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise InvalidArgument(f"expect only 1 value for '{key}'")
    return values[0]


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _number(key: str, text: str, low: int, high: int) -> int:
    # ASCII digits only: int() alone also takes "1_000" and other scripts' digits ("٣")
    stripped = text.strip()
    value = int(stripped) if len(text) <= 32 and _INTEGER.fullmatch(stripped) else None
    if value is None:
        raise InvalidArgument(f"Unable to parse '{key}', got: {text[:64]}")
    if key == "trace_count" and value < low:
        raise InvalidArgument(f"Unable to parse '{key}'. Expecting value >= {low}, got: {text}")
    if not low <= value <= high:
        raise InvalidArgument(
            f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {text}"
        )
    return value


def parse_update(
    update: Mapping[str, Sequence[str] | None],
) -> tuple[dict[str, object], set[str]]:
    """A TraceSetting request's settings into (new values, cleared fields), with Triton's
    checks and texts. A key with no values (or None) clears it; keys Triton does not take at
    run time are refused (files) or, like Triton, ignored (trace_mode, unknown keys)."""
    changes: dict[str, object] = {}
    cleared: set[str] = set()
    if "trace_file" in update:
        raise Unimplemented("trace file location can not be updated through network protocol")
    for key, name in (
        ("trace_level", "level"),
        ("trace_rate", "rate"),
        ("trace_count", "count"),
        ("log_frequency", "log_frequency"),
    ):
        if key not in update:
            continue
        values = list(update[key] or ())
        if not values:
            cleared.add(name)
            continue
        if key == "trace_level":
            changes[name] = _level_update(values)
        elif key == "trace_count":
            changes[name] = _number(key, _one(key, values), MIN_COUNT, INT32_MAX)
        else:
            changes[name] = _number(key, _one(key, values), 0, UINT32_MAX)
    return changes, cleared


def _level_update(values: list[str]) -> frozenset[str]:
    if len(values) > len(LEVELS) + 1:
        raise InvalidArgument("expect at most 2 values for 'trace_level'")
    words = [v.strip().upper() for v in values]
    if "OFF" in words:
        if len(words) != 1:
            raise InvalidArgument("Expect only one trace level 'OFF' is specified")
        return frozenset()
    for word in words:
        if word not in LEVELS:
            raise InvalidArgument(
                f"unknown trace level '{word[:64]}': expected OFF, TIMESTAMPS or TENSORS"
            )
    return frozenset(words)
