"""logs.configure: formats, level switches and the file, for our loggers and grpcio's alike.

The server-process side (flags, per-request lines, load errors) is tests/e2e/test_logging.py;
here the handler is set up in this process so that grpcio's Python loggers can be made to
speak on demand.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tributary import logs

TRITON_LINE = re.compile(r"^[IWE]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} \d+ [\w.]+:\d+\] ")
ISO_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z [IWE] \d+ [\w.]+:\d+\] ")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours = logging.getLogger("tributary").level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("tributary").setLevel(ours)
    logging.captureWarnings(False)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_grpc_loggers_and_ours_share_the_triton_format(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(file=out)
    logging.getLogger("grpc._server").error("Exception calling application: %s", "boom")
    logging.getLogger("grpc").warning("a grpc warning")
    logging.getLogger("tributary.app").info("hello")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    got = lines(out)
    assert len(got) == 4, got
    assert all(TRITON_LINE.match(line) for line in got), got
    assert got[0].startswith("E") and " grpc._server:" in got[0] and got[0].endswith("boom")
    assert got[1].startswith("W") and " grpc:" in got[1]
    assert got[2].startswith("I") and " tributary.app:" in got[2]
    assert got[3].startswith("W") and " py.warnings:" in got[3]


def test_iso8601(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(fmt="ISO8601", file=out)
    logging.getLogger("tributary.app").warning("careful")
    [line] = lines(out)
    assert ISO_LINE.match(line), line
    assert line.endswith("] careful")


def test_json_lines_carry_the_fields(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(fmt="json", file=out)
    logging.getLogger("tributary.repository").error(
        "failed to load model '%s'", "m", extra={"model": "m"}
    )
    try:
        raise ValueError("inner")
    except ValueError:
        logging.getLogger("grpc._server").exception("Exception calling application")
    first, second = (json.loads(line) for line in lines(out))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["time"])
    assert first["level"] == "ERROR"
    assert first["logger"] == "tributary.repository"
    assert first["message"] == "failed to load model 'm'"
    assert first["model"] == "m"
    assert second["logger"] == "grpc._server"
    assert "ValueError: inner" in second["exc_info"]


def test_level_switches(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(verbose=1, info=False, error=False, file=out)
    log = logging.getLogger("tributary.x")
    log.debug("verbose line")
    log.info("info line")
    log.warning("warning line")
    log.error("error line")
    log.critical("critical line")
    text = out.read_text()
    assert "verbose line" in text  # verbose lines answer to --log-verbose only
    assert "warning line" in text
    for gone in ("info line", "error line", "critical line"):
        assert gone not in text


def test_verbose_levels(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(verbose=0, file=out)
    logging.getLogger("tributary.requests").debug("ours at 0")
    logs.configure(verbose=1, file=out)
    logging.getLogger("tributary.requests").debug("ours at 1")
    logging.getLogger("grpc").debug("theirs at 1")
    logs.configure(verbose=2, file=out)
    logging.getLogger("grpc").debug("theirs at 2")
    text = out.read_text()
    assert "ours at 0" not in text and "theirs at 1" not in text
    assert "ours at 1" in text and "theirs at 2" in text


def test_a_message_cannot_forge_a_line(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(file=out)
    fake = "x\nE1201 00:00:00.000000 1 tributary.app:1] forged"
    logging.getLogger("tributary.control").error("failed to load model '%s'", fake)
    [line] = lines(out)
    assert line.endswith("model 'x\\nE1201 00:00:00.000000 1 tributary.app:1] forged'")


def test_separators_and_escapes_cannot_forge_a_line_or_reach_a_terminal(
    tmp_path: Path, restore_logging
) -> None:
    """Every character str.splitlines() splits on, and terminal escapes, arrive escaped."""
    out = tmp_path / "log.txt"
    logs.configure(file=out)
    forged = "E1201 00:00:00.000000 1 tributary.app:1] forged"
    for sep in ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x1b[2J"):
        logging.getLogger("tributary.control").error("model '%s'", f"x{sep}{forged}")
    text = out.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 9, text
    assert not any(line.startswith("E1201 00:00:00") for line in text.splitlines())
    assert "\x1b" not in text and "\\x1b[2J" in text and "\\u2028" in text


def test_json_lines_stay_one_line_per_record_for_any_reader(
    tmp_path: Path, restore_logging
) -> None:
    out = tmp_path / "log.txt"
    logs.configure(fmt="json", file=out)
    logging.getLogger("tributary.control").error("model '%s'", "x\u2028y\x85z\nw é")
    raw = out.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 1
    assert json.loads(raw)["message"] == "model 'x\u2028y\x85z\nw é'"


def test_long_messages_are_clipped(tmp_path: Path, restore_logging) -> None:
    """A load error can echo a client's 20 MB config override; the log line stays bounded."""
    out = tmp_path / "log.txt"
    for fmt in ("default", "json"):
        logs.configure(fmt=fmt, file=out)
        logging.getLogger("tributary.control").error("bad override: %s", "Q" * 1_000_000)
    text = out.read_text()
    assert len(text) < 2 * (logs.MAX_MESSAGE_CHARS + 500)
    assert text.count("more characters)") == 2


def test_log_file_keeps_lines_with_undecodable_names(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(file=out)
    name = b"bad\xffname".decode("utf-8", "surrogateescape")  # how Python lists such a dir
    logging.getLogger("tributary.repository").error("failed to load model '%s'", name)
    assert "bad\\udcffname" in out.read_text()


def test_request_log_line(tmp_path: Path, restore_logging) -> None:
    out = tmp_path / "log.txt"
    logs.configure(verbose=1, fmt="json", file=out)
    import time

    logs.RequestLog()("ModelInfer", "simple", "1", "r" * 300, "OK", time.perf_counter_ns())
    [record] = (json.loads(line) for line in lines(out))
    assert record["rpc"] == "ModelInfer" and record["model"] == "simple"
    assert record["status"] == "OK" and record["duration_us"] >= 0
    assert record["request_id"] == "r" * 256 + "...(44 more)"


class _WatchedLock:
    """A lock that says when a second caller is waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.waiting.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_concurrent_log_settings_do_not_undo_each_other(tmp_path: Path, restore_logging) -> None:
    """Two LogSettings calls changing different settings at once (one from an HTTP loop, one
    from a gRPC thread): the second must not re-apply the first one's old values."""
    control = logs.configure(file=tmp_path / "log.txt")
    watched = _WatchedLock()
    control._lock = watched  # type: ignore[assignment]
    first_applying, release_first = threading.Event(), threading.Event()
    apply = control.apply

    def slow_apply(**kwargs: Any) -> None:
        if not first_applying.is_set():
            first_applying.set()
            release_first.wait(30)
        apply(**kwargs)

    control.apply = slow_apply  # type: ignore[method-assign]
    first = threading.Thread(target=control.update, args=({"log_info": False},))
    first.start()
    assert first_applying.wait(30)
    second = threading.Thread(target=control.update, args=({"log_format": "ISO8601"},))
    second.start()
    assert watched.waiting.wait(30)  # the second call waits for the first one's apply
    release_first.set()
    first.join(30)
    second.join(30)
    assert control.values["log_info"] is False and control.values["log_format"] == "ISO8601"
