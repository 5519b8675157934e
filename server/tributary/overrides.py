"""RepositoryModelLoad `file:<path>` overrides: a private model directory per load.

As in Triton, a load with `file:` parameters does not read the repository at all: the model
is made of the override files alone (plus the `config` parameter, which is required), written
into a fresh directory under a server-owned temporary folder (mode 0700), never into the
repository. The directory lives as long as versions loaded from it may serve; it is removed
when the model is unloaded, when a later load of the same name replaces it, and at shutdown.

Everything a client sends is checked before a byte is written
(docs/limits.md#model-file-overrides): the number of files, their total size, the bytes all
live override directories hold together, and each path: any relative path inside the model
directory, as in Triton (`1/model.onnx`, `labels.txt`, `warmup/in0`), `/`-separated, no
empty, `.` or `..` component, no NUL, backslash or control character, components at most
255 bytes. Files are created with O_EXCL | O_NOFOLLOW inside a
directory nothing else writes to, and `config_check.inside_model_dir` confirms each target.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .config_check import inside_model_dir
from .errors import InferenceError, Internal, InvalidArgument, ResourceExhausted, shown

log = logging.getLogger("tributary.control")

FILE_PREFIX = "file:"
MAX_FILES = 64  # override files in one load
MAX_FILE_BYTES = 1024 * 1024 * 1024  # all override files of one load together (1 GiB)
MAX_LIVE_BYTES = 4 * MAX_FILE_BYTES  # every live override directory together (4 GiB)
MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255  # NAME_MAX


def poll_failed(name: str, reason: str = "") -> Internal:
    """Triton's answer when a load fails before versions are tried; clients look for this
    text as a substring, so a reason may follow it."""
    text = f"failed to load '{shown(name)}', failed to poll from model repository"
    return Internal(f"{text}: {reason}" if reason else text)


def check_model_name(name: str) -> None:
    """A model loaded from overrides gets a directory of its name: a plain name only."""
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgument(
            f"invalid model name '{shown(name)}', model name must not contain path traversal "
            "characters"
        )
    if (
        not name
        or name.startswith(".")
        or len(name.encode()) > MAX_COMPONENT_BYTES
        or not name.isprintable()
    ):
        raise InvalidArgument(
            f"invalid model name '{shown(name)}', a model loaded from file overrides needs a "
            f"plain directory name (1-{MAX_COMPONENT_BYTES} bytes, printable, not starting "
            "with '.')"
        )


def check_path(key: str) -> str:
    """The relative path of a `file:` key, or a reason it is refused."""
    rel = key[len(FILE_PREFIX) :]
    if len(rel) > MAX_PATH_CHARS:
        return f"file override path is longer than {MAX_PATH_CHARS} characters"
    if "\\" in rel or not rel.isprintable():
        return f"file override '{shown(key)}' contains a backslash or a control character"
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return (
            f"file override '{shown(key)}' must be a relative path without empty, '.' or '..' "
            "components"
        )
    if any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        return f"file override '{shown(key)}' has a path component longer than 255 bytes"
    return ""


@dataclass
class _Dir:
    path: Path  # <root>/<random>/<model>: the model directory
    size: int


class OverrideDirs:
    """The temporary model directories of file-override loads, per model name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._dirs: dict[str, list[_Dir]] = {}
        self._reserved = 0  # bytes of loads between check() and write()

    def _live_bytes(self) -> int:
        return self._reserved + sum(d.size for dirs in self._dirs.values() for d in dirs)

    def live_bytes(self) -> int:
        """What the live-bytes bound counts: live directories plus reservations."""
        with self._lock:
            return self._live_bytes()

    def check(self, name: str, files: dict[str, bytes]) -> int:
        """Every limit and path rule, before anything is written.

        Returns the bytes it reserved against the live-bytes bound, in the same critical
        section as the check, so concurrent loads cannot all pass it and then overshoot it
        together. `write` takes the reservation over; if no `write` follows, `release` it."""
        if len(files) > MAX_FILES:
            raise InvalidArgument(
                f"load of model '{shown(name)}' has {len(files)} file overrides; at most "
                f"{MAX_FILES} are allowed"
            )
        total = sum(len(data) for data in files.values())
        if total > MAX_FILE_BYTES:
            raise InvalidArgument(
                f"file overrides for model '{shown(name)}' hold {total} bytes; at most "
                f"{MAX_FILE_BYTES} are allowed"
            )
        for key in files:
            reason = check_path(key)
            if reason:
                log.error("failed to load model %r: %s", shown(name), reason, extra={"model": name})
                raise poll_failed(name, reason)
        with self._lock:
            live = self._live_bytes()
            if live + total <= MAX_LIVE_BYTES:
                self._reserved += total
                return total
        raise ResourceExhausted(
            f"file overrides for model '{shown(name)}' ({total} bytes) would take the "
            f"server's override directories past {MAX_LIVE_BYTES} bytes ({live} in use); "
            "unload models loaded from overrides first"
        )

    def release(self, reserved: int) -> None:
        """Give back a reservation of `check` that no `write` took over."""
        with self._lock:
            self._reserved -= reserved

    def write(self, name: str, files: dict[str, bytes], reserved: int) -> Path:
        """A new private model directory holding `files`; removed again if writing fails.

        `reserved`, what `check` returned, becomes the directory's size in the accounting, or
        is released when writing fails."""
        try:
            return self._write(name, files, reserved)
        except BaseException:
            self.release(reserved)
            raise

    def _write(self, name: str, files: dict[str, bytes], reserved: int) -> Path:
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="tributary-overrides-"))
            root = self._root
        model_dir = Path(tempfile.mkdtemp(dir=root)) / name
        try:
            model_dir.mkdir(mode=0o700)
            for key, data in sorted(files.items()):
                rel = key[len(FILE_PREFIX) :]
                parent = model_dir.joinpath(*rel.split("/")[:-1])
                if parent.exists() and not parent.is_dir():
                    raise poll_failed(
                        name,
                        f"Invalid file parameter '{shown(key)}', directory has been "
                        "created as a file",
                    )
                parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                target = inside_model_dir(name, "file override", rel, model_dir)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(target, flags, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
        except InferenceError:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(model_dir.parent, ignore_errors=True)
            log.error("failed to load model %r: writing file overrides: %s", name, exc)
            raise poll_failed(name, "could not write the file overrides") from exc
        with self._lock:
            self._reserved -= reserved
            self._dirs.setdefault(name, []).append(_Dir(model_dir, reserved))
        return model_dir

    def loaded(self, name: str, model_dir: Path | None, *, in_use: bool) -> None:
        """After a load of `name` from `model_dir` (None: from the repository).

        `in_use`: whether versions from older directories may still serve (a load that
        failed for some version keeps that version's previous instance). Otherwise every
        older directory goes; a new directory that ended up unused goes too."""
        with self._lock:
            dirs = self._dirs.get(name, [])
            keep = [d for d in dirs if in_use or d.path == model_dir]
            gone = [d for d in dirs if d not in keep]
            if keep:
                self._dirs[name] = keep
            else:
                self._dirs.pop(name, None)
        for d in gone:
            shutil.rmtree(d.path.parent, ignore_errors=True)

    def discard(self, name: str, model_dir: Path) -> None:
        """A directory no version was loaded from (the load failed before any version)."""
        with self._lock:
            dirs = self._dirs.get(name, [])
            self._dirs[name] = [d for d in dirs if d.path != model_dir]
            if not self._dirs[name]:
                del self._dirs[name]
        shutil.rmtree(model_dir.parent, ignore_errors=True)

    def unloaded(self, name: str) -> None:
        self.loaded(name, None, in_use=False)

    def close(self) -> None:
        """Shutdown: every override directory goes."""
        with self._lock:
            root, self._root = self._root, None
            self._dirs.clear()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def live(self, name: str) -> list[Path]:
        with self._lock:
            return [d.path for d in self._dirs.get(name, [])]
