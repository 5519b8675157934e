"""Logging: tritonserver's line format (or ISO 8601, or JSON lines), its level switches, a file.

Every Python logger goes through the one handler set up here: ours (`tributary.*`), grpcio's
(`grpc`, `grpc._server`, ...) and any library's, so a log has one format. gRPC core (C++) is
different: it writes through absl straight to stderr, and grpcio 1.81 has no way to hand its
messages to Python. So `grpc_core_verbosity` only sets GRPC_VERBOSITY, before grpc is first
imported, to keep core quiet unless --log-verbose asks for more; core's lines keep their own
(glog, Triton-like) format and stay on stderr even with --log-file (docs/flags.md).

--log-verbose >= 1 adds one line per request (`RequestLog`); at 0 no `RequestLog` exists and
the request paths run exactly as without it. `LogControl` changes the switches, the verbose
level and the format while the server runs (the LogSettings RPC).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from .constants import SHOWN_NAME_CHARS
from .text import clipped, printable

_LETTER = {
    logging.DEBUG: "I",  # tritonserver prints its verbose lines as info
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "E",
}
MAX_MESSAGE_CHARS = 8192
"""A message longer than this is cut (tracebacks are not): configs and load errors can echo
what a client sent, and one request must not be able to write megabytes into the log."""


def grpc_core_verbosity(verbose: int) -> None:
    """GRPC_VERBOSITY for gRPC core, unless the environment sets it: ERROR up to
    --log-verbose=1 (level 1 is common in production, and core's INFO starts with a warning
    that it is not for production), INFO at 2, DEBUG from 3. gRPC reads it once, when grpc is
    first imported, so this must run before that."""
    level = "ERROR" if verbose <= 1 else "INFO" if verbose == 2 else "DEBUG"
    os.environ.setdefault("GRPC_VERBOSITY", level)


def one_line(text: str) -> str:
    """`text` cut to MAX_MESSAGE_CHARS and escaped to one printable line (`text.printable`):
    a client-sent name can neither start a line that looks like ours nor send escape
    sequences to an operator's terminal."""
    return printable(clipped(text, MAX_MESSAGE_CHARS))


def _message(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    """The message on one line (`one_line`), then any traceback as the logging module writes
    it."""
    text = one_line(record.getMessage())
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        text = f"{text}\n{record.exc_text}"
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}"
    return text


class TritonFormatter(logging.Formatter):
    """tritonserver's line: `I1201 17:05:06.123456 1234 tributary.app:214] message`, that is
    level letter, month and day, UTC time to the microsecond, pid, then where it was logged.
    Triton names its source file there; we name the logger (which says whose line it is:
    tributary.*, grpc.*) and the line number. `iso=True` is --log-format=ISO8601:
    `2024-12-01T17:05:06Z I 1234 tributary.app:214] message`."""

    def __init__(self, iso: bool = False) -> None:
        super().__init__()
        self.iso = iso

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        letter = _LETTER.get(record.levelno, "I")
        where = f"{record.process} {record.name}:{record.lineno}]"
        if self.iso:
            head = (
                f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}Z {letter}"
            )
        else:
            micros = int(record.created * 1_000_000) % 1_000_000
            head = (
                f"{letter}{t.tm_mon:02d}{t.tm_mday:02d} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d}"
            )
        return f"{head} {where} {_message(record, self)}"


class JsonLinesFormatter(JsonFormatter):
    """--log-format=json: one object per line, `time` (ISO 8601, UTC, microseconds), `level`,
    `logger`, `message`, then what the call passed in `extra` (`model`, `request_id`, ...)
    and `exc_info` for a traceback."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            # ASCII only: JSON itself escapes control characters, and this escapes the line
            # separators (U+2028, U+0085) that some log readers split on.
            json_ensure_ascii=True,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = (
            datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="microseconds")[:-6]
            + "Z"
        )
        super().add_fields(log_data, record, message_dict)
        message = log_data.get("message")
        if isinstance(message, str) and len(message) > MAX_MESSAGE_CHARS:
            log_data["message"] = clipped(message, MAX_MESSAGE_CHARS)  # JSON does the escaping


class LevelSwitch(logging.Filter):
    """--log-info/--log-warning/--log-error=false drop that level; verbose lines (DEBUG) answer
    to --log-verbose only, as in tritonserver."""

    def __init__(self, off: set[int]) -> None:
        super().__init__()
        self.off = off

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno not in self.off


def configure(
    *,
    verbose: int = 0,
    info: bool = True,
    warning: bool = True,
    error: bool = True,
    fmt: str = "default",
    file: Path | None = None,
) -> LogControl:
    """Route every Python logger through one handler: stderr, or `file` (appended). The
    returned `LogControl` changes the switches, level and format at run time."""
    handler: logging.Handler
    if file is not None:
        # backslashreplace: a name that is not valid UTF-8 (a directory named with a stray
        # byte) is written escaped, rather than the line being lost to an encoding error.
        handler = logging.FileHandler(file, mode="a", encoding="utf-8", errors="backslashreplace")
    else:
        handler = logging.StreamHandler(sys.stderr)
    switch = LevelSwitch(set())
    handler.addFilter(switch)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    logging.captureWarnings(True)  # warnings.warn(...) from libraries: same handler, same format
    control = LogControl(handler, switch, file)
    control.apply(verbose=verbose, info=info, warning=warning, error=error, fmt=fmt)
    return control


FORMATS = ("default", "ISO8601", "json")
UINT32_MAX = 2**32 - 1


class LogControl:
    """The log settings in force, as the LogSettings RPC reads and changes them at run time
    (docs/protocol.md#log-settings). `listeners` hear the verbose level after each change: the
    data plane creates or drops its `RequestLog` there, so a server at level 0 pays nothing
    per request. gRPC core's verbosity is fixed at start-up (GRPC_VERBOSITY) and does not
    follow."""

    def __init__(self, handler: logging.Handler, switch: LevelSwitch, file: Path | None) -> None:
        self._handler = handler
        self._switch = switch
        self._file = file
        self._lock = threading.Lock()
        self.values: dict[str, bool | int | str] = {}
        self.listeners: list[Callable[[int], None]] = []

    def apply(self, *, verbose: int, info: bool, warning: bool, error: bool, fmt: str) -> None:
        off = set()
        if not info:
            off.add(logging.INFO)
        if not warning:
            off.add(logging.WARNING)
        if not error:
            off |= {logging.ERROR, logging.CRITICAL}
        self._switch.off = off
        if fmt == "json":
            self._handler.setFormatter(JsonLinesFormatter())
        else:
            self._handler.setFormatter(TritonFormatter(iso=fmt == "ISO8601"))
        # Our verbose lines from 1, everyone else's debug lines from 2.
        logging.getLogger().setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
        logging.getLogger("tributary").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
        self.values = {
            "log_file": str(self._file) if self._file is not None else "",
            "log_info": info,
            "log_warning": warning,
            "log_error": error,
            "log_verbose_level": verbose,
            "log_format": fmt,
        }
        for listener in self.listeners:
            listener(verbose)

    @property
    def verbose(self) -> int:
        return int(self.values["log_verbose_level"])

    def update(
        self, update: Mapping[str, bool | int | str | None] | None
    ) -> dict[str, bool | int | str]:
        """LogSettings: check every value (Triton's texts), then apply them all at once, and
        answer the settings in force. A new log_file is refused as tritonserver refuses it: a
        client must not choose which file the server appends to."""
        if not update:
            return dict(self.values)
        from .errors import InvalidArgument, Unimplemented  # grpc: not before start-up

        if "log_file" in update:
            raise Unimplemented("log file location can not be updated through network protocol")
        new: dict[str, bool | int | str] = {}  # checked here, applied under the lock
        for key in ("log_info", "log_warning", "log_error"):
            if key in update:
                value = update[key]
                if not isinstance(value, bool):
                    raise InvalidArgument(f"expect boolean for '{key}'")
                new[key] = value
        if "log_verbose_level" in update:
            level = update["log_verbose_level"]
            if isinstance(level, bool) or not isinstance(level, int):
                raise InvalidArgument("expect int32 for 'log_verbose_level'")
            if not 0 <= level <= UINT32_MAX:
                raise InvalidArgument(
                    f"log_verbose_level out of range [0, {UINT32_MAX}], got: {level}"
                )
            new["log_verbose_level"] = level
        if "log_format" in update:
            fmt = update["log_format"]
            if not isinstance(fmt, str):
                raise InvalidArgument("expect string for 'log_format'")
            if fmt not in FORMATS:
                raise InvalidArgument(
                    f"invalid argument for log_format, got: {one_line(fmt[:256])}"
                )
            new["log_format"] = fmt
        with self._lock:
            # merged with the values in force only now: two clients changing different
            # settings at once must not undo each other's change with a stale copy
            new = {**self.values, **new}
            self.apply(
                verbose=int(new["log_verbose_level"]),
                info=bool(new["log_info"]),
                warning=bool(new["log_warning"]),
                error=bool(new["log_error"]),
                fmt=str(new["log_format"]),
            )
            return dict(self.values)


def _clip(text: str, limit: int = SHOWN_NAME_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text) - limit} more)"


class RequestLog:
    """--log-verbose >= 1: one line per request, after it is answered:
    `ModelInfer model='simple' version='1' id='42' status=OK 183us`
    (JSON: the same as fields `rpc`, `model`, `version`, `request_id`, `status`,
    `duration_us`). Client-sent names are quoted with repr and clipped to 256 characters."""

    def __init__(self) -> None:
        self._log = logging.getLogger("tributary.requests")

    def __call__(
        self, rpc: str, model: str, version: str, request_id: str, status: str, start_ns: int
    ) -> None:
        micros = (time.perf_counter_ns() - start_ns) // 1000
        model, version, request_id = _clip(model), _clip(version), _clip(request_id)
        self._log.debug(
            "%s model=%r version=%r id=%r status=%s %dus",
            rpc,
            model,
            version,
            request_id,
            status,
            micros,
            extra={
                "rpc": rpc,
                "model": model,
                "version": version,
                "request_id": request_id,
                "status": status,
                "duration_us": micros,
            },
        )

    def message(self, rpc: str, request: Any, status: str, start_ns: int) -> None:
        """For a parsed request of any RPC (or None when it did not parse)."""
        model = getattr(request, "model_name", None) or getattr(request, "name", "") or ""
        version = getattr(request, "model_version", None) or getattr(request, "version", "") or ""
        self(rpc, model, version, getattr(request, "id", "") or "", status, start_ns)
