"""Poll mode: re-scan the model repository and load, reload or unload what changed.

The rules are in docs/model-config.md#model-control. Three parts, each testable alone:

- `fingerprint` reads one model directory into a `ModelFiles`: a digest of the files outside
  version directories (config.pbtxt, configs/, label files) and one digest per version
  directory. Small files are hashed on every scan (an edit that keeps size and mtime is still
  seen); large ones are hashed again only when their size or mtime changes, or while their
  mtime is too recent to trust; above `HASH_LIMIT` a file is known by size and mtime alone.
  The walk is bounded (`MAX_FILES` per model, `MAX_DEPTH`); only regular files are read (a
  FIFO, a device or a link to one is known by its type, so none can stall the poller).
- `plan` compares two scans and says what to do: load a new model, reload a model whose
  shared files changed (every version), load/reload/unload single versions, unload a model
  whose directory went away. Pure, no I/O.
- `RepositoryPoller` runs scan → plan → act on a daemon thread every `--repository-poll-secs`.
  Work happens one model at a time through `ModelRepository.load/unload`, which keeps the old
  version serving until the new one is READY and keeps it when the new one fails. A scan that
  raises is logged and the next one runs as usual; `stop` returns once the current model's
  load (if any) ends.

A scan is taken before acting on it, so an edit made while a model loads is seen next time.
A half-written config fails to load (the old version serves on, the reason is in
RepositoryIndex); the completed file has another digest, so the next scan loads it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .repository import ModelRepository

log = logging.getLogger("tributary.poll")

SMALL_FILE = 256 * 1024  # hashed on every scan
HASH_LIMIT = 64 * 1024 * 1024  # above this, size + mtime stand for the content
RACY_NS = 2_000_000_000  # an mtime this recent may hide a second write: hash again next scan
MAX_FILES = 4096  # entries walked per model directory
MAX_DEPTH = 6


@dataclass(frozen=True)
class ModelFiles:
    """What one scan saw of a model directory."""

    shared: str  # digest of every file outside the version directories
    versions: Mapping[int, str] = field(default_factory=dict)  # version -> digest of its files


@dataclass(frozen=True)
class Plan:
    """What one scan asks for; `reload` maps a model to the versions to rebuild (None: all)."""

    load: tuple[str, ...] = ()
    reload: Mapping[str, frozenset[int] | None] = field(default_factory=dict)
    unload: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.load or self.reload or self.unload)


def plan(before: Mapping[str, ModelFiles], after: Mapping[str, ModelFiles]) -> Plan:
    """The difference between two scans as actions. A model whose shared files changed is
    reloaded whole (its config may change every version); otherwise only versions that
    appeared or whose files changed are rebuilt, and `load` unloads those that went away."""
    load = tuple(sorted(n for n in after if n not in before))
    unload = tuple(sorted(n for n in before if n not in after))
    reload: dict[str, frozenset[int] | None] = {}
    for name in sorted(n for n in after if n in before):
        old, new = before[name], after[name]
        if old.shared != new.shared:
            reload[name] = None
            continue
        changed = {v for v, digest in new.versions.items() if old.versions.get(v) != digest}
        if changed or set(old.versions) != set(new.versions):
            reload[name] = frozenset(changed)
    return Plan(load, reload, unload)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    digest: str
    racy: bool


class Scanner:
    """Reads the repository into {model: ModelFiles}, remembering large files' digests."""

    def __init__(self, list_models: Callable[[], Mapping[str, Path]]) -> None:
        self._list_models = list_models
        self._seen: dict[str, _Seen] = {}
        self._warned: set[str] = set()

    def scan(self) -> dict[str, ModelFiles]:
        now_ns = time.time_ns()
        seen_now: dict[str, _Seen] = {}
        out: dict[str, ModelFiles] = {}
        for name, model_dir in sorted(self._list_models().items()):
            try:
                out[name] = self._model(name, model_dir, now_ns, seen_now)
            except OSError as exc:  # removed mid-scan, permissions: try again next time
                log.warning("poll: cannot read model directory '%s': %s", name, exc)
                out[name] = ModelFiles(shared=f"unreadable:{exc.errno}")
        self._seen = seen_now  # forget files that are gone
        return out

    def _model(
        self, name: str, model_dir: Path, now_ns: int, seen_now: dict[str, _Seen]
    ) -> ModelFiles:
        shared = hashlib.blake2b(digest_size=16)
        versions: dict[int, hashlib.blake2b] = {}
        count = 0
        for rel, st in _walk(model_dir):
            count += 1
            if count > MAX_FILES:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "poll: model '%s' has more than %d files; changes beyond them are not seen",
                        name,
                        MAX_FILES,
                    )
                break
            top = rel.split("/", 1)[0]
            target = shared
            if _is_version(top) and ("/" in rel or stat.S_ISDIR(st.st_mode)):
                target = versions.setdefault(int(top), hashlib.blake2b(digest_size=16))
            digest = self._digest(model_dir / rel, st, now_ns, seen_now)
            target.update(f"{rel}\0{digest}\0".encode("utf-8", "surrogateescape"))
        return ModelFiles(
            shared=shared.hexdigest(), versions={v: h.hexdigest() for v, h in versions.items()}
        )

    def _digest(
        self, path: Path, st: os.stat_result, now_ns: int, seen_now: dict[str, _Seen]
    ) -> str:
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        if not stat.S_ISREG(st.st_mode):  # FIFO, device, socket: never opened (a FIFO blocks
            return _kind(st)  # open, /dev/zero never ends); its type stands for it
        if st.st_size > HASH_LIMIT:
            return f"stat:{st.st_size}:{st.st_mtime_ns}"
        key = str(path)
        old = self._seen.get(key)
        if (
            st.st_size > SMALL_FILE
            and old is not None
            and not old.racy
            and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns)
        ):
            seen_now[key] = old
            return old.digest
        # Non-blocking, and checked again once open: the entry may have been replaced by a
        # FIFO or a link to a device since the walk stat'ed it. At most HASH_LIMIT is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as f:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode):
                return _kind(now)
            h = hashlib.blake2b(digest_size=16)
            left = HASH_LIMIT
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                h.update(chunk)
                left -= len(chunk)
        digest = h.hexdigest()
        seen_now[key] = _Seen(
            st.st_size, st.st_mtime_ns, digest, racy=now_ns - st.st_mtime_ns < RACY_NS
        )
        return digest


def _kind(st: os.stat_result) -> str:
    """The digest of an entry that is not a directory or a regular file: its type alone."""
    return f"type:{stat.S_IFMT(st.st_mode):o}"


def _is_version(name: str) -> bool:
    # The rule of config.list_versions: decimal, ASCII, no leading zero.
    return name.isascii() and name.isdigit() and not name.startswith("0")


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative path, stat) of every entry under `root`, sorted, hidden names skipped (editor
    swap files), symlinks followed as loading does, bounded by MAX_FILES and MAX_DEPTH."""
    out: list[tuple[str, os.stat_result]] = []

    def visit(folder: Path, prefix: str, depth: int) -> None:
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return
        for entry in names:
            if entry.startswith(".") or len(out) > MAX_FILES:
                continue
            path = folder / entry
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed between listdir and stat (or a dangling link)
            rel = f"{prefix}{entry}"
            out.append((rel, st))
            if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                visit(path, rel + "/", depth + 1)

    visit(root, "", 0)
    return out


class RepositoryPoller:
    """Poll mode's background thread (docs/model-config.md#model-control)."""

    def __init__(
        self,
        repository: ModelRepository,
        interval_s: float,
        *,
        on_change: Callable[[], None] = lambda: None,
        scanner: Scanner | None = None,
    ) -> None:
        self._repo = repository
        self._interval = interval_s
        self._on_change = on_change
        self._scanner = scanner or Scanner(repository.model_dirs)
        self._last: dict[str, ModelFiles] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scans = 0  # completed scans, for tests and logs

    def baseline(self) -> None:
        """Scan once before the start-up load, so edits made while models load are seen."""
        self._last = self._scanner.scan()

    def start(self) -> None:
        if self._interval <= 0:
            log.info("poll mode with --repository-poll-secs=0: the repository is never re-scanned")
            return
        self._thread = threading.Thread(target=self._run, name="repository-poll", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end; waits at most `timeout` for a load in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll_once()
            except Exception:  # a scan error never ends polling
                log.exception("poll: scanning the model repository failed; trying again later")

    def poll_once(self) -> Plan:
        """One scan and the actions it asks for; returns the plan (for tests)."""
        current = self._scanner.scan()
        todo = plan(self._last, current)
        self._last = current
        self.scans += 1
        if not todo:
            return todo
        for name in todo.unload:
            if self._stop.is_set():
                break
            self._act(name, "unload", lambda n: self._repo.unload(n))
        for name in self._repo.load_order(todo.load):  # ensembles after their steps
            if self._stop.is_set():
                break
            self._act(name, "load", lambda n: self._repo.load(n))
        for name, versions in todo.reload.items():
            if self._stop.is_set():
                break
            what = "reload" if versions is None else f"reload versions {sorted(versions)} of"
            self._act(name, what, self._reload(versions))
        self._on_change()
        return todo

    def _reload(self, versions: frozenset[int] | None) -> Callable[[str], None]:
        return lambda name: self._repo.load(name, versions=versions)

    def _act(self, name: str, what: str, action: Callable[[str], None]) -> None:
        log.info("poll: %s model '%s'", what, name, extra={"model": name})
        try:
            action(name)
        except Exception as exc:  # logged with its reason by the repository; the rest go on
            log.warning("poll: %s model '%s' failed: %s", what, name, exc, extra={"model": name})
