"""The model repository: which models exist, which versions are loaded, and in what state.

It decides *what* to load (directories, configs, version policies) and tracks the lifecycle
states clients see in RepositoryIndex; it never runs inference. Building a servable is the
composition root's `loader`, so this module stays testable with a fake one.

Concurrency: one lock guards the tables and is never held while loading or closing (both can
take seconds). A per-model operation lock serialises load/unload of the same model, so a
reload and an unload of one model cannot interleave while different models load in parallel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tributary.backends.graph import read_graph
from tributary.config import (
    ENSEMBLE_PLATFORM,
    GraphReader,
    ModelSignature,
    RefusedConfig,
    check_config_name,
    check_paths,
    load_config,
    model_file,
    normalize,
    parse_version,
    validate,
    versions_of,
)
from tributary.config_check import repository_relative
from tributary.errors import (
    InferenceError,
    Internal,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Unavailable,
)
from tributary.errors import shown as shown_name
from tributary_client._proto import model_config_pb2 as mc

if TYPE_CHECKING:
    from tributary.scheduler import Scheduler
    from tributary.scheduler.ensemble import EnsembleScheduler
    from tributary.stats import ModelStats

log = logging.getLogger(__name__)
_loading = threading.local()  # per loading thread: the ensembles whose composing models it loads

UNLOADED = "unloaded"
"""The reason of a version unloaded on purpose; one unloaded because a model it depends on
went (an ensemble's composing model) starts with it and says why."""
MAX_DEPENDENCY_DEPTH = 16
"""Ensembles nested in ensembles, at most this deep (a cycle of ensembles stops here too)."""
STILL_SERVING = "reload failed, the previous load keeps serving: "
RELOAD_DRAIN_TIMEOUT = 30.0  # seconds a replaced version gets to finish its in-flight work


class ModelState(StrEnum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


class Servable(Protocol):
    """A loaded model version as the rest of the server uses it."""

    name: str
    version: int
    config: mc.ModelConfig
    signature: ModelSignature
    stats: ModelStats

    @property
    def scheduler(self) -> Scheduler | EnsembleScheduler: ...

    def close(self, timeout: float) -> None: ...


Loader = Callable[[str, int, mc.ModelConfig, Path, Path], Servable]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass
class _Version:
    state: ModelState
    reason: str = ""
    servable: Servable | None = None


@dataclass
class _Model:
    """Lifecycle record; kept for failed models too so their reason and config can be shown."""

    model_dir: Path
    config: mc.ModelConfig | None = None
    reason: str = ""  # model-level failure (config, normalisation, no versions)
    versions: dict[int, _Version] = field(default_factory=dict)


class KeyedLocks:
    """One lock per key (a model name), kept in the table only while a caller holds or waits
    for it: keys come from clients, so a table that only grew would grow without bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[threading.Lock, list[int]]] = {}  # key -> (lock, [users])

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._entries.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if users[0] == 0:
                    del self._entries[key]


def _unknown(name: str) -> NotFound:
    return NotFound(f"Request for unknown model: '{shown_name(name)}' is not found")


class ModelRepository:
    def __init__(
        self,
        roots: Sequence[Path],
        loader: Loader,
        *,
        auto_complete: bool = True,
        default_max_batch_size: int = 4,
        gpu_count: int = 0,
        config_name: str | None = None,
        load_threads: int = 4,
        load_retries: int = 0,
        graph_reader: GraphReader = read_graph,
    ) -> None:
        self._roots = [Path(r) for r in roots]
        self._loader = loader
        self._auto_complete = auto_complete
        self._default_max_batch_size = default_max_batch_size
        self._gpu_count = gpu_count
        self._config_name = config_name
        self._load_threads = max(1, load_threads)
        self._load_retries = max(0, load_retries)
        self._graph_reader = graph_reader
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._op_locks = KeyedLocks()
        self._closed = False  # after close(): a load that finishes late closes what it built
        if config_name:
            check_config_name(config_name)  # a start-up error rather than every load failing
        for root in self._roots:
            if not root.is_dir():
                raise Internal(f"failed to stat model repository '{root}': not a directory")
        self._scan()  # duplicate names are a startup error, not a per-request surprise

    # -- scanning -----------------------------------------------------------------------------

    def _scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in self._roots:
            for child in sorted(root.iterdir()):
                if not child.is_dir() or child.name.startswith("."):
                    continue
                if child.name in found:
                    # Clients can reach this (load, index): the paths go to the log only.
                    log.error(
                        "model '%s' appears in multiple model repositories: '%s' and '%s'",
                        child.name,
                        found[child.name].parent,
                        root,
                    )
                    raise Internal(f"model '{child.name}' appears in multiple model repositories")
                found[child.name] = child
        return found

    def model_names(self) -> list[str]:
        return sorted(self._scan())

    def model_dirs(self) -> dict[str, Path]:
        """{model: directory} as the repositories hold them now (poll mode scans these)."""
        return self._scan()

    # -- loading ------------------------------------------------------------------------------

    def load_models(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Load many models in parallel; returns {model: reason} for those that failed."""
        targets = list(names) if names is not None else self.model_names()
        failures: dict[str, str] = {}

        def one(name: str) -> None:
            try:
                self.load(name)
            except Exception as exc:  # one bad model must not stop the others
                failures[name] = self._failure_reason(name) or str(exc)

        with ThreadPoolExecutor(self._load_threads, thread_name_prefix="model-load") as pool:
            for wave in self._load_waves(targets):  # ensembles after what they compose
                list(pool.map(one, wave))
        return dict(sorted(failures.items()))

    def load_order(self, names: Sequence[str]) -> list[str]:
        """`names` with every ensemble after the models it composes (poll mode's new models)."""
        return [n for wave in self._load_waves(list(names)) for n in wave]

    def _load_waves(self, names: list[str]) -> list[list[str]]:
        """`names` in dependency order: plain models first, then ensembles whose composing
        models are all in an earlier wave. A config that cannot be read goes first (its load
        reports why); an ensemble in a cycle goes last (its load fails on the missing model)."""
        dirs = self._scan()
        deps: dict[str, set[str]] = {}
        plain: list[str] = []
        for name in names:
            composing = self._composing_of(dirs.get(name))
            if composing is None:
                plain.append(name)
            else:
                deps[name] = composing
        waves = [plain] if plain else []
        done = set(plain)
        while deps:
            wave = sorted(n for n, d in deps.items() if not (d & deps.keys()) or d <= done)
            if not wave:
                waves.append(sorted(deps))
                break
            waves.append(wave)
            done.update(wave)
            for n in wave:
                del deps[n]
        return waves

    def _composing_of(self, model_dir: Path | None) -> set[str] | None:
        """The models an ensemble's steps name (None: not an ensemble, or unreadable)."""
        if model_dir is None:
            return None
        try:
            raw = load_config(model_dir, config_name=self._config_name)
        except Exception:  # its own load reports the problem
            return None
        if raw.platform != ENSEMBLE_PLATFORM:
            return None
        return {s.model_name for s in raw.ensemble_scheduling.step}

    def load(
        self,
        name: str,
        *,
        override: mc.ModelConfig | None = None,
        model_dir: Path | None = None,
        versions: Collection[int] | None = None,
    ) -> None:
        """Load or reload one model: new versions first, then swap, then close the old ones.

        `versions`: the READY versions to build again (None: all of them, as a load RPC does);
        a READY version not named keeps its instance. Versions the policy no longer selects
        unload once every version to (re)build is READY. `model_dir` replaces the repository's
        directory (a RepositoryModelLoad with `file:` overrides, tributary.control). Raises Triton's
        repository-load errors (docs/protocol.md). If any version fails, the load aborts as
        Triton's does: what it built is closed, every version that served before serves on
        (its previous instance; versions the policy dropped too), and RepositoryIndex shows
        why on the failed versions and, as "reload failed, ...", on those still serving.
        """
        model_dir = model_dir or self._scan().get(name)
        if model_dir is None:
            shown = shown_name(name)  # a client's name, maybe a megabyte: cut for the log
            log.error("failed to load model '%s': no such directory", shown, extra={"model": shown})
            raise Internal(
                f"failed to load '{shown_name(name)}', failed to poll from model repository"
            )
        with self._op_locks.hold(name):
            seen: mc.ModelConfig | None = None  # the most complete config we got, for display
            try:
                seen = load_config(model_dir, config_name=self._config_name, override=override)
                check_paths(seen, model_dir)  # before auto-complete opens the model file
                config = seen = normalize(
                    seen,
                    model_dir,
                    auto_complete=self._auto_complete,
                    default_max_batch_size=self._default_max_batch_size,
                    gpu_count=self._gpu_count,
                    graph_reader=self._graph_reader,
                )
                wanted = versions_of(name, config, model_dir)
                if config.platform == ENSEMBLE_PLATFORM:
                    self._load_composing(name, config)
            except Exception as exc:
                log.error("failed to load model '%s': %s", name, exc, extra={"model": name})
                reason = self._public(exc, model_dir)
                self._record_model_failure(name, model_dir, seen, reason)
                if isinstance(exc, RefusedConfig):
                    raise RefusedConfig(reason) from exc  # the client's to fix: say what
                raise Internal(
                    f"failed to load '{name}', failed to poll from model repository"
                ) from exc
            failed = self._load_versions(name, model_dir, config, wanted, versions)
        errors = [f"version {v} is at UNAVAILABLE state: {r}" for v, r in sorted(failed.items())]
        if errors:
            raise ModelLoadError(f"load failed for model '{name}': " + "; ".join(errors))

    def _load_composing(self, name: str, config: mc.ModelConfig) -> None:
        """Loading an ensemble loads each composing model that has no READY version yet, as
        Triton does (in explicit mode this is how they get loaded at all). Their failures
        are left to the ensemble's own check, which names the model it depends on."""
        stack = _loading.__dict__.setdefault("stack", [])
        if name in stack or len(stack) >= MAX_DEPENDENCY_DEPTH:
            raise ModelLoadError(
                f"ensemble '{name}' is part of a circular or too deep ensemble dependency: "
                + " -> ".join([*stack, name])
            )
        stack.append(name)
        try:
            for dep in dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step):
                if dep == name:
                    raise ModelLoadError(f"ensemble '{name}' cannot be a step of itself")
                if self.ready_versions_or_none(dep):
                    continue
                if dep not in self._scan():
                    continue  # the ensemble's check says it has no loaded version
                try:
                    self.load(dep)
                except ModelLoadError as exc:
                    if "circular or too deep" in exc.message:
                        raise
                    log.error(
                        "ensemble '%s': composing model '%s' failed to load: %s", name, dep, exc
                    )
                except InferenceError as exc:
                    log.error(
                        "ensemble '%s': composing model '%s' failed to load: %s", name, dep, exc
                    )
        finally:
            stack.pop()

    def ready_versions_or_none(self, name: str) -> list[Servable]:
        """READY versions of `name`; empty for a model the repository never loaded."""
        try:
            return self.ready_versions(name)
        except InferenceError:
            return []

    def _public(self, exc: BaseException, model_dir: Path) -> str:
        """A failure's text as clients see it (index reasons, load errors): no server paths."""
        return repository_relative(str(exc) or type(exc).__name__, model_dir, self._roots)

    def _record_model_failure(
        self, name: str, model_dir: Path, config: mc.ModelConfig | None, reason: str
    ) -> None:
        with self._lock:
            record = self._models.setdefault(name, _Model(model_dir))
            serving = [v for v in record.versions.values() if v.state == ModelState.READY]
            if not serving:
                # Nothing keeps serving, so the model as a whole shows the failure.
                record.reason = reason
                if config is not None:
                    record.config = config
            for version in serving:  # still READY (readiness holds), but the index says why
                version.reason = STILL_SERVING + reason

    def _load_versions(
        self,
        name: str,
        model_dir: Path,
        config: mc.ModelConfig,
        wanted: list[int],
        rebuild: Collection[int] | None = None,
    ) -> dict[int, str]:
        """Returns {version: reason} for versions whose (re)load failed."""
        with self._lock:
            record = self._models.setdefault(name, _Model(model_dir))
            record.model_dir, record.reason = model_dir, ""
            todo = []
            for v in wanted:
                current = record.versions.get(v)
                if current is None or current.state != ModelState.READY:
                    record.versions[v] = _Version(ModelState.LOADING)
                    todo.append(v)
                elif rebuild is None or v in rebuild:
                    todo.append(v)  # READY: keeps serving (version "" too) until the swap
        fresh: dict[int, Servable] = {}
        failed: dict[int, str] = {}
        for v in todo:
            for attempt in range(self._load_retries + 1):
                try:
                    if config.platform == ENSEMBLE_PLATFORM:  # no file: its steps are checked
                        path = model_dir / str(v)
                    else:
                        path = model_file(model_dir, v, config)
                        validate(config, self._graph_reader(path), model_dir)
                    fresh[v] = self._loader(name, v, config, path, model_dir)
                    break
                except Exception as exc:  # the loader may raise anything; the reason is its text
                    retrying = attempt < self._load_retries  # --model-load-retry-count
                    then = f" (retry {attempt + 1} of {self._load_retries} follows)"
                    log.log(
                        logging.WARNING if retrying else logging.ERROR,
                        "failed to load model '%s' version %d: %s%s",
                        name,
                        v,
                        exc,
                        then if retrying else "",
                        extra={"model": name},
                    )
                    if not retrying:
                        failed[v] = self._public(exc, model_dir)
        to_close: list[Servable] = []
        aborted = False
        with self._lock:
            if self._closed:  # the server shut down while this load ran: serve nothing new
                to_close, todo, wanted = list(fresh.values()), [], list(record.versions)
            elif failed:
                # Triton aborts a load any version of which failed: what this load built is
                # discarded and the versions that served before serve on, those the policy no
                # longer selects included (else a half-copied new version would take the
                # model down until the copy completes).
                self._abort(record, todo, failed)
                to_close, todo, wanted = list(fresh.values()), [], list(record.versions)
                aborted = True
            for v in todo:  # every one of them built: swap them in
                current = record.versions[v]
                if current.servable is not None:
                    to_close.append(current.servable)
                record.versions[v] = _Version(ModelState.READY, "", fresh[v])
            # One critical section for the whole swap: version "" moves to the newest READY
            # version at once, and a dropped version stops resolving before it is closed.
            dropped = [v for v in record.versions if v not in wanted]
            for v in dropped:
                old = record.versions[v]
                if old.servable is not None:
                    to_close.append(old.servable)
                    old.state, old.servable = ModelState.UNLOADING, None
            if (fresh and not aborted) or record.config is None:
                record.config = config
        self._close_all(to_close, RELOAD_DRAIN_TIMEOUT)
        with self._lock:
            for v in dropped:
                record.versions[v] = _Version(ModelState.UNAVAILABLE, UNLOADED)
        return failed

    @staticmethod
    def _abort(record: _Model, todo: list[int], failed: dict[int, str]) -> None:
        """Table changes of an aborted load (the lock held); the caller closes what it built."""
        summary = "; ".join(
            f"version {v} is at UNAVAILABLE state: {r}" for v, r in sorted(failed.items())
        )
        for v in todo:
            current = record.versions[v]
            if current.state == ModelState.READY:  # served before this load: serves on
                current.reason = STILL_SERVING + failed.get(v, summary)
            elif v in failed:
                record.versions[v] = _Version(ModelState.UNAVAILABLE, failed[v])
            else:  # built, then discarded with the load, as Triton unloads it
                record.versions[v] = _Version(ModelState.UNAVAILABLE, UNLOADED)

    def unload(self, name: str, timeout: float = 30.0, *, dependents: bool = False) -> None:
        """Unload every version; in-flight work is the servable's to finish within `timeout`.

        Ensembles that use the model go with it (UNAVAILABLE, saying which model they miss).
        `dependents` (RepositoryModelUnload's `unload_dependents`): unloading an ensemble also
        unloads its composing models that no other loaded ensemble uses."""
        with self._lock:
            known = name in self._models
        if not known:  # refused before taking a lock, so unknown names leave nothing behind
            if name in self._scan():
                return  # in the repository but never loaded: nothing to do
            raise InvalidArgument(f"failed to unload '{shown_name(name)}', model is not found")
        self._unload(name, timeout, UNLOADED)
        with self._lock:
            config = self._models[name].config
        for ensemble in self._ensembles_using(name):
            reason = (
                f"{UNLOADED}: ensemble '{ensemble}' depends on '{name}' which has no loaded version"
            )
            log.warning("%s", reason, extra={"model": ensemble})
            self._unload(ensemble, timeout, reason)
        if dependents and config is not None and config.platform == ENSEMBLE_PLATFORM:
            for dep in dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step):
                if (
                    dep != name
                    and not self._ensembles_using(dep)
                    and self.ready_versions_or_none(dep)
                ):
                    self.unload(dep, timeout, dependents=True)

    def _unload(self, name: str, timeout: float, reason: str) -> None:
        with self._op_locks.hold(name):
            with self._lock:
                record = self._models[name]
                to_close = self._begin_unload(record)
            self._close_all(to_close, timeout)
            with self._lock:
                self._finish_unload(record, reason)
                record.reason = ""  # unloaded on purpose: no longer a failure

    def _ensembles_using(self, name: str) -> list[str]:
        """Ensembles with a READY version that have a step on `name`."""
        with self._lock:
            return sorted(
                n
                for n, record in self._models.items()
                if record.config is not None
                and record.config.platform == ENSEMBLE_PLATFORM
                and any(s.model_name == name for s in record.config.ensemble_scheduling.step)
                and any(v.state == ModelState.READY for v in record.versions.values())
            )

    def close(self, timeout: float = 30.0) -> None:
        """Unload everything (server shutdown); callers drain traffic first."""
        with self._lock:
            self._closed = True
            records = list(self._models.values())
            to_close = [s for r in records for s in self._begin_unload(r)]
        self._close_all(to_close, timeout)
        with self._lock:
            for r in records:
                self._finish_unload(r)

    @staticmethod
    def _begin_unload(record: _Model) -> list[Servable]:
        out = []
        for version in record.versions.values():
            if version.servable is not None:
                out.append(version.servable)
                version.state = ModelState.UNLOADING
        return out

    @staticmethod
    def _finish_unload(record: _Model, reason: str = UNLOADED) -> None:
        for v in list(record.versions):
            record.versions[v] = _Version(ModelState.UNAVAILABLE, reason)

    def _close_all(self, servables: list[Servable], timeout: float) -> None:
        if not servables:
            return

        def close(s: Servable) -> None:
            try:
                s.close(timeout)
            except Exception:
                log.exception("error closing model '%s' version %d", s.name, s.version)

        with ThreadPoolExecutor(len(servables), thread_name_prefix="model-close") as pool:
            list(pool.map(close, servables))

    # -- queries ------------------------------------------------------------------------------

    def resolve(self, name: str, version: str) -> Servable:
        """The servable for a request's (model, version), with Triton's exact errors."""
        wanted = parse_version(version, name)
        with self._lock:
            record = self._models.get(name)
            if record is None:
                raise _unknown(name)
            if wanted is None:
                ready = [n for n, v in record.versions.items() if v.state == ModelState.READY]
                if not ready:
                    why = next(
                        (
                            v.reason[len(UNLOADED) + 2 :]
                            for v in record.versions.values()
                            if v.reason.startswith(UNLOADED + ": ")
                        ),
                        "",
                    )
                    raise NotFound(
                        f"Request for unknown model: '{name}' has no available versions"
                        + (f" ({why})" if why else "")
                    )
                wanted = max(ready)
            found = record.versions.get(wanted)
            if found is None:
                raise NotFound(f"Request for unknown model: '{name}' version {wanted} is not found")
            if found.state != ModelState.READY or found.servable is None:
                raise Unavailable(
                    f"Request for unknown model: '{name}' version {wanted} is not at ready state"
                )
            return found.servable

    def ready_versions(self, name: str) -> list[Servable]:
        with self._lock:
            record = self._models.get(name)
            if record is None:
                raise _unknown(name)
            return [
                record.versions[v].servable  # type: ignore[misc]
                for v in sorted(record.versions)
                if record.versions[v].state == ModelState.READY
            ]

    def is_model_ready(self, name: str, version: str = "") -> bool:
        """ModelReady answers false rather than failing for unknown models."""
        try:
            self.resolve(name, version)
        except InferenceError:
            return False
        return True

    def is_ready(self) -> bool:
        """Strict readiness: something is loaded and every version the lifecycle knows is READY."""
        with self._lock:
            counted = 0
            for record in self._models.values():
                if record.reason:
                    return False
                for version in record.versions.values():
                    if version.state == ModelState.UNAVAILABLE and version.reason.startswith(
                        UNLOADED
                    ):
                        continue
                    if version.state != ModelState.READY:
                        return False
                    counted += 1
            return counted > 0

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        names = set(self.model_names())
        entries: list[IndexEntry] = []
        with self._lock:
            names.update(self._models)
            for name in sorted(names):
                record = self._models.get(name)
                if record is None:
                    entries.append(IndexEntry(name, "", "", ""))
                    continue
                if record.reason:
                    entries.append(
                        IndexEntry(name, "", ModelState.UNAVAILABLE.value, record.reason)
                    )
                for v in sorted(record.versions):
                    ver = record.versions[v]
                    entries.append(IndexEntry(name, str(v), ver.state.value, ver.reason))
        if ready_only:
            entries = [e for e in entries if e.state == ModelState.READY]
        return entries

    def config(self, name: str) -> mc.ModelConfig | None:
        """The last normalised config of a model (also for failed ones), None if never seen."""
        with self._lock:
            record = self._models.get(name)
            return record.config if record is not None else None

    def servables(self) -> list[Servable]:
        with self._lock:
            return [
                version.servable
                for name in sorted(self._models)
                for _, version in sorted(self._models[name].versions.items())
                if version.state == ModelState.READY and version.servable is not None
            ]

    def failed(self) -> dict[str, str]:
        """{model: reason} for models whose config failed or that have an unavailable version."""
        with self._lock:
            names = sorted(self._models)
        return {n: r for n in names if (r := self._failure_reason(n))}

    def _failure_reason(self, name: str) -> str:
        with self._lock:
            record = self._models.get(name)
            if record is None:
                return ""
            if record.reason:
                return record.reason
            parts = [
                f"version {v} is at UNAVAILABLE state: {ver.reason}"
                for v, ver in sorted(record.versions.items())
                if ver.state == ModelState.UNAVAILABLE and not ver.reason.startswith(UNLOADED)
            ]
            return "; ".join(parts)
