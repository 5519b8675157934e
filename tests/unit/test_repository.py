"""repository.py with a fake loader over tiny real ONNX models built into tmp_path."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format

from tributary.config import ModelSignature, signature
from tributary.errors import Internal, InvalidArgument, ModelLoadError, NotFound, Unavailable
from tributary.repository import IndexEntry, ModelRepository, ModelState
from tributary_client._proto import model_config_pb2 as mc


@dataclass(eq=False)
class FakeServable:
    name: str
    version: int
    config: mc.ModelConfig
    signature: ModelSignature
    events: list[tuple] = field(repr=False)
    closed_with: float | None = None

    def close(self, timeout: float) -> None:
        self.closed_with = timeout
        self.events.append(("close", self.name, self.version, id(self)))


class FakeLoader:
    """Builds FakeServables; `fail` maps (model, version) or model to an exception to raise."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.fail: dict[object, Exception] = {}
        self.calls: list[tuple[str, int, Path, Path]] = []
        self.created: list[FakeServable] = []  # strong refs: ids in `events` stay unique
        self._lock = threading.Lock()

    def __call__(
        self, name: str, version: int, config: mc.ModelConfig, path: Path, model_dir: Path
    ) -> FakeServable:
        with self._lock:
            self.calls.append((name, version, path, model_dir))
        exc = self.fail.get((name, version)) or self.fail.get(name)
        if exc is not None:
            raise exc
        assert path.is_file(), path
        servable = FakeServable(name, version, config, signature(config, model_dir), self.events)
        with self._lock:
            self.created.append(servable)
            self.events.append(("load", name, version, id(servable)))
        return servable


@pytest.fixture
def root(tmp_path: Path, bm) -> Path:
    r = tmp_path / "models"
    bm.build_simple(r, "simple", versions=(1, 2, 3))
    (r / "simple" / "config.pbtxt").write_text(
        bm.simple_config("simple") + "version_policy { all { } }\n"
    )
    bm.build_simple(r, "simple_int8", "INT8")
    bm.build_identity(r, "simple_identity")
    return r


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def repo(root: Path, loader: FakeLoader) -> ModelRepository:
    return ModelRepository([root], loader)


def message(exc_type: type, fn: Callable[[], object]) -> str:
    with pytest.raises(exc_type) as err:
        fn()
    return err.value.message


# -- scanning ------------------------------------------------------------------------------------


def test_model_names_sorted_dirs_only(root: Path, repo: ModelRepository) -> None:
    (root / "README.md").write_text("not a model")
    (root / ".hidden").mkdir()
    (root / "aaa").mkdir()
    assert repo.model_names() == ["aaa", "simple", "simple_identity", "simple_int8"]


def test_duplicate_names_across_roots_fail_at_startup(tmp_path: Path, root: Path, bm) -> None:
    other = tmp_path / "other"
    bm.build_simple(other, "simple_int8", "INT8")
    bm.build_simple(other, "extra")
    with pytest.raises(Internal, match="'simple_int8'"):
        ModelRepository([root, other], FakeLoader())
    (other / "simple_int8").rename(other / "renamed")
    repo = ModelRepository([root, other], FakeLoader())
    assert "renamed" in repo.model_names() and "extra" in repo.model_names()


def test_missing_root_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(Internal):
        ModelRepository([tmp_path / "absent"], FakeLoader())


# -- loading and readiness -----------------------------------------------------------------------


def test_load_all(repo: ModelRepository, loader: FakeLoader, root: Path) -> None:
    assert repo.load_models() == {}
    assert repo.is_ready()
    assert repo.failed() == {}
    assert sorted((c[0], c[1]) for c in loader.calls) == [
        ("simple", 1),
        ("simple", 2),
        ("simple", 3),
        ("simple_identity", 1),
        ("simple_int8", 1),
    ]
    name, version, path, model_dir = next(c for c in loader.calls if c[0] == "simple_int8")
    assert path == root / "simple_int8" / "1" / "model.onnx"
    assert model_dir == root / "simple_int8"
    servable = repo.resolve("simple_int8", "")
    assert servable.config.platform == "onnxruntime_onnx"  # the loader got the normalised config
    assert servable.config.instance_group[0].count == 2
    assert [(s.name, s.version) for s in repo.servables()] == [
        ("simple", 1),
        ("simple", 2),
        ("simple", 3),
        ("simple_identity", 1),
        ("simple_int8", 1),
    ]


def test_zero_models_is_not_ready(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    repo = ModelRepository([tmp_path / "empty"], FakeLoader())
    assert repo.load_models() == {}
    assert not repo.is_ready()
    assert repo.index() == []


def test_failing_model_beside_healthy_ones(repo: ModelRepository, loader: FakeLoader) -> None:
    loader.fail["simple_int8"] = RuntimeError("boom")
    failures = repo.load_models()
    assert failures == {"simple_int8": "version 1 is at UNAVAILABLE state: boom"}
    assert repo.failed() == failures
    assert not repo.is_ready()
    assert repo.is_model_ready("simple", "")
    assert repo.is_model_ready("simple_identity", "1")
    assert not repo.is_model_ready("simple_int8", "")
    assert not repo.is_model_ready("simple_int8", "1")
    assert IndexEntry("simple_int8", "1", "UNAVAILABLE", "boom") in repo.index()
    assert message(Unavailable, lambda: repo.resolve("simple_int8", "1")) == (
        "Request for unknown model: 'simple_int8' version 1 is not at ready state"
    )


class FlakyLoader(FakeLoader):
    """Fails each (model, version) its first `failures` times, then loads it."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.tries: dict[tuple[str, int], int] = {}

    def __call__(self, name, version, config, path, model_dir):  # type: ignore[no-untyped-def]
        key = (name, version)
        self.tries[key] = self.tries.get(key, 0) + 1
        if self.tries[key] <= self.failures:
            raise RuntimeError(f"flaky try {self.tries[key]}")
        return super().__call__(name, version, config, path, model_dir)


@pytest.mark.parametrize(("retries", "ready"), [(0, False), (1, False), (2, True), (5, True)])
def test_load_retries(root: Path, retries: int, ready: bool) -> None:
    """--model-load-retry-count: a version that fails is tried again, up to that many times."""
    loader = FlakyLoader(failures=2)
    repo = ModelRepository([root], loader, load_retries=retries)
    failures = repo.load_models(["simple_int8"])
    assert repo.is_model_ready("simple_int8", "1") is ready
    assert loader.tries[("simple_int8", 1)] == min(retries, 2) + 1
    if not ready:
        last = min(retries, 2) + 1
        assert failures == {"simple_int8": f"version 1 is at UNAVAILABLE state: flaky try {last}"}


def test_config_failure_is_recorded(root: Path, repo: ModelRepository) -> None:
    (root / "simple_identity" / "config.pbtxt").write_text('backend: "python"\n')
    failures = repo.load_models()
    assert list(failures) == ["simple_identity"]
    assert "'python'" in failures["simple_identity"]
    [entry] = [e for e in repo.index() if e.name == "simple_identity"]
    assert (entry.version, entry.state) == ("", "UNAVAILABLE")
    assert "'python'" in entry.reason
    assert repo.config("simple_identity").backend == "python"  # kept so it can be shown
    assert not repo.is_ready()
    assert message(NotFound, lambda: repo.resolve("simple_identity", "")) == (
        "Request for unknown model: 'simple_identity' has no available versions"
    )


def test_validation_runs_before_loader(root: Path, repo: ModelRepository, loader) -> None:
    text = (root / "simple_int8" / "config.pbtxt").read_text().replace("TYPE_INT8", "TYPE_FP32")
    (root / "simple_int8" / "config.pbtxt").write_text(text)
    failures = repo.load_models(["simple_int8"])
    assert "unexpected datatype TYPE_FP32 for input 'INPUT0'" in failures["simple_int8"]
    assert not any(c[0] == "simple_int8" for c in loader.calls)


def test_load_models_subset_and_index(repo: ModelRepository) -> None:
    repo.load_models(["simple_identity"])
    assert repo.index() == [
        IndexEntry("simple", "", "", ""),
        IndexEntry("simple_identity", "1", "READY", ""),
        IndexEntry("simple_int8", "", "", ""),
    ]
    assert repo.index(ready_only=True) == [IndexEntry("simple_identity", "1", "READY", "")]
    assert repo.is_ready(), "models never loaded don't count"


# -- resolution ----------------------------------------------------------------------------------


def test_resolve_picks_highest_ready(root: Path, repo: ModelRepository, loader: FakeLoader) -> None:
    repo.load_models(["simple"])
    shutil.copytree(root / "simple" / "3", root / "simple" / "4")
    loader.fail[("simple", 4)] = ValueError("bad v4")
    repo.load_models(["simple"])  # aborted: 1..3 serve on, 4 is UNAVAILABLE
    assert repo.resolve("simple", "").version == 3
    assert repo.resolve("simple", "1").version == 1
    assert [s.version for s in repo.ready_versions("simple")] == [1, 2, 3]


def test_a_failing_version_fails_the_first_load_whole(
    repo: ModelRepository, loader: FakeLoader
) -> None:
    """As Triton: the versions that did load are unloaded again (nothing served before)."""
    loader.fail[("simple", 3)] = ValueError("bad v3")
    assert repo.load_models(["simple"]) == {"simple": "version 3 is at UNAVAILABLE state: bad v3"}
    assert repo.ready_versions("simple") == []
    assert all(s.closed_with is not None for s in loader.created)
    assert [(e.version, e.state, e.reason) for e in repo.index() if e.name == "simple"] == [
        ("1", "UNAVAILABLE", "unloaded"),
        ("2", "UNAVAILABLE", "unloaded"),
        ("3", "UNAVAILABLE", "bad v3"),
    ]


@pytest.mark.parametrize(
    ("name", "version", "exc", "text"),
    [
        ("nope", "", NotFound, "Request for unknown model: 'nope' is not found"),
        ("nope", "1", NotFound, "Request for unknown model: 'nope' is not found"),
        ("simple", "7", NotFound, "Request for unknown model: 'simple' version 7 is not found"),
        (
            "simple",
            "3",
            Unavailable,
            "Request for unknown model: 'simple' version 3 is not at ready state",
        ),
        (
            "simple",
            "abc",
            InvalidArgument,
            "failed to get model version from specified version string 'abc' (details: stol), "
            "version should be an integral value > 0",
        ),
        (
            "simple",
            "-2",
            InvalidArgument,
            "invalid model version specified '-2' , version should be an integral value > 0",
        ),
        (
            "simple_int8",
            "",
            NotFound,
            "Request for unknown model: 'simple_int8' is not found",  # in repo, never loaded
        ),
    ],
)
def test_resolve_errors(
    repo: ModelRepository, loader: FakeLoader, name: str, version: str, exc: type, text: str
) -> None:
    loader.fail[("simple", 3)] = ValueError("bad v3")
    repo.load_models(["simple"])
    with pytest.raises(exc) as err:
        repo.resolve(name, version)
    assert err.value.message == text
    assert err.value.code == exc.code
    assert not repo.is_model_ready(name, version)


def test_ready_versions_unknown_model(repo: ModelRepository) -> None:
    assert message(NotFound, lambda: repo.ready_versions("nope")) == (
        "Request for unknown model: 'nope' is not found"
    )


# -- reload, unload, close -----------------------------------------------------------------------


def test_reload_loads_new_before_closing_old(repo: ModelRepository, loader: FakeLoader) -> None:
    repo.load_models(["simple_int8"])
    old = repo.resolve("simple_int8", "1")
    loader.events.clear()
    repo.load("simple_int8")
    new = repo.resolve("simple_int8", "1")
    assert new is not old
    assert loader.events == [
        ("load", "simple_int8", 1, id(new)),
        ("close", "simple_int8", 1, id(old)),
    ]
    assert new.closed_with is None and old.closed_with is not None
    assert repo.is_ready()


def test_failed_reload_keeps_old_version_serving(repo: ModelRepository, loader) -> None:
    repo.load_models(["simple_int8"])
    old = repo.resolve("simple_int8", "")
    loader.fail["simple_int8"] = RuntimeError("disk on fire")
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple_int8")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == (
        "load failed for model 'simple_int8': version 1 is at UNAVAILABLE state: disk on fire"
    )
    assert repo.resolve("simple_int8", "") is old and old.closed_with is None


def test_failed_new_version_keeps_the_old_one_serving(
    root: Path, repo: ModelRepository, loader: FakeLoader
) -> None:
    """latest 1: a broken version 2 must not unload version 1 (Triton aborts the load)."""
    repo.load_models(["simple_int8"])
    v1 = repo.resolve("simple_int8", "")
    (root / "simple_int8" / "2").mkdir()
    (root / "simple_int8" / "2" / "model.onnx").write_bytes(b"half a model")
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple_int8")
    assert "version 2 is at UNAVAILABLE state" in err.value.message
    assert repo.resolve("simple_int8", "") is v1 and v1.closed_with is None
    index = {e.version: e for e in repo.index() if e.name == "simple_int8"}
    assert (index["1"].state, index["1"].reason) == ("READY", "")
    assert index["2"].state == "UNAVAILABLE" and index["2"].reason
    assert repo.is_model_ready("simple_int8", "")
    shutil.copy(root / "simple_int8" / "1" / "model.onnx", root / "simple_int8" / "2")
    repo.load("simple_int8")  # the copy completed: now version 2 replaces version 1
    assert repo.resolve("simple_int8", "").version == 2
    assert v1.closed_with is not None


def test_partial_failure_aborts_the_whole_load(
    root: Path, repo: ModelRepository, loader: FakeLoader, bm
) -> None:
    """latest 2 over 1..2, then a version 3 that fails: versions built by the load are closed,
    the instances that served before serve on (version 1 too, which latest 2 drops)."""
    (root / "simple" / "config.pbtxt").write_text(
        bm.simple_config("simple") + "version_policy { latest { num_versions: 2 } }\n"
    )
    shutil.rmtree(root / "simple" / "3")
    repo.load_models(["simple"])
    before = repo.ready_versions("simple")
    assert [s.version for s in before] == [1, 2]
    shutil.copytree(root / "simple" / "2", root / "simple" / "3")
    loader.fail[("simple", 3)] = RuntimeError("out of memory")
    loader.events.clear()
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple")
    assert err.value.message == (
        "load failed for model 'simple': version 3 is at UNAVAILABLE state: out of memory"
    )
    assert repo.ready_versions("simple") == before
    assert all(s.closed_with is None for s in before)
    rebuilt = [s for s in loader.created if s not in before]
    assert [s.version for s in rebuilt] == [2] and rebuilt[0].closed_with is not None
    index = {e.version: e for e in repo.index() if e.name == "simple"}
    assert (index["1"].state, index["1"].reason) == ("READY", "")
    assert index["2"].state == "READY"
    assert index["2"].reason == (
        "reload failed, the previous load keeps serving: "
        "version 3 is at UNAVAILABLE state: out of memory"
    )
    assert (index["3"].state, index["3"].reason) == ("UNAVAILABLE", "out of memory")
    assert repo.resolve("simple", "").version == 2
    del loader.fail[("simple", 3)]
    repo.load("simple")
    assert [s.version for s in repo.ready_versions("simple")] == [2, 3]
    assert all(s.closed_with is not None for s in before)


def test_first_load_failure_error(repo: ModelRepository, loader: FakeLoader) -> None:
    loader.fail["simple"] = RuntimeError("nope")
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple")
    assert err.value.message == (
        "load failed for model 'simple': version 1 is at UNAVAILABLE state: nope; "
        "version 2 is at UNAVAILABLE state: nope; version 3 is at UNAVAILABLE state: nope"
    )


def test_load_unknown_or_bad_config_is_poll_failure(root: Path, repo: ModelRepository) -> None:
    assert message(Internal, lambda: repo.load("nope")) == (
        "failed to load 'nope', failed to poll from model repository"
    )
    (root / "simple" / "config.pbtxt").write_text("max_batch_size: [")
    with pytest.raises(Internal) as err:
        repo.load("simple")
    assert err.value.message == "failed to load 'simple', failed to poll from model repository"
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert "simple" in repo.failed()


def test_override_changes_versions(repo: ModelRepository, loader: FakeLoader) -> None:
    repo.load_models(["simple"])
    v2 = repo.resolve("simple", "2")
    override = text_format.Parse(
        'platform: "onnxruntime_onnx" max_batch_size: 4 '
        "version_policy { specific { versions: [1] } }",
        mc.ModelConfig(),
    )
    repo.load("simple", override=override)
    assert [s.version for s in repo.ready_versions("simple")] == [1]
    assert repo.resolve("simple", "1").config.max_batch_size == 4
    assert v2.closed_with is not None
    index = {e.version: e for e in repo.index() if e.name == "simple"}
    assert (index["2"].state, index["2"].reason) == ("UNAVAILABLE", "unloaded")
    assert (index["3"].state, index["3"].reason) == ("UNAVAILABLE", "unloaded")
    assert repo.is_ready(), "unloaded versions don't count against readiness"
    assert message(Unavailable, lambda: repo.resolve("simple", "2")).endswith(
        "version 2 is not at ready state"
    )


def test_unload(repo: ModelRepository) -> None:
    repo.load_models(["simple", "simple_int8"])
    old = repo.ready_versions("simple")
    repo.unload("simple", timeout=5.0)
    assert all(s.closed_with == 5.0 for s in old)
    assert repo.ready_versions("simple") == []
    assert not repo.is_model_ready("simple", "")
    assert not repo.is_model_ready("simple", "1")
    assert message(NotFound, lambda: repo.resolve("simple", "")) == (
        "Request for unknown model: 'simple' has no available versions"
    )
    assert [e for e in repo.index() if e.name == "simple"] == [
        IndexEntry("simple", str(v), "UNAVAILABLE", "unloaded") for v in (1, 2, 3)
    ]
    assert repo.is_ready(), "simple_int8 is still READY and simple was unloaded on purpose"
    repo.unload("simple_int8")
    assert not repo.is_ready(), "nothing loaded is never vacuously ready"
    repo.unload("simple_identity")  # in the repository, never loaded: no-op
    with pytest.raises(InvalidArgument):
        repo.unload("nope")
    repo.load("simple")
    assert [s.version for s in repo.ready_versions("simple")] == [1, 2, 3]


def test_unload_clears_failure_for_readiness(repo: ModelRepository, loader) -> None:
    loader.fail["simple_int8"] = RuntimeError("boom")
    repo.load_models()
    assert not repo.is_ready()
    repo.unload("simple_int8")
    assert repo.is_ready()
    assert repo.failed() == {}


def test_close_unloads_everything(repo: ModelRepository) -> None:
    repo.load_models()
    servables = repo.servables()
    repo.close(timeout=2.0)
    assert all(s.closed_with == 2.0 for s in servables)
    assert repo.servables() == []
    assert {e.state for e in repo.index()} == {ModelState.UNAVAILABLE.value}
    assert not repo.is_ready()


def test_concurrent_loads_of_one_model(repo: ModelRepository, loader: FakeLoader) -> None:
    repo.load_models(["simple_identity"])
    threads = [threading.Thread(target=repo.load, args=("simple_identity",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loader.created) == 9
    live = repo.resolve("simple_identity", "1")
    assert [s for s in loader.created if s.closed_with is None] == [live]


# -- paths a config names, and what clients see of server paths ----------------------------------


def simple_override(bm, **fields: str) -> mc.ModelConfig:
    config = text_format.Parse(bm.simple_config("simple"), mc.ModelConfig())
    for key, value in fields.items():
        if key == "label_filename":
            config.output[0].label_filename = value
        else:
            setattr(config, key, value)
    return config


def inside_message(field: str, value: str) -> str:
    return (
        f"unable to load model 'simple', {field} '{value}' must name a file inside the model "
        "directory"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("label_filename", "../../../../etc/passwd"),
        ("label_filename", "/proc/self/environ"),
        ("default_model_filename", "/etc/passwd"),
        ("default_model_filename", "../../simple_int8/1/model.onnx"),
    ],
)
def test_override_naming_a_file_outside_is_refused(
    repo: ModelRepository, loader: FakeLoader, bm, field: str, value: str
) -> None:
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple", override=simple_override(bm, **{field: value}))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == inside_message(field, value)
    assert loader.calls == []
    assert not repo.is_model_ready("simple")
    [entry] = [e for e in repo.index() if e.name == "simple"]
    assert (entry.state, entry.reason) == ("UNAVAILABLE", inside_message(field, value))


def test_refused_reload_keeps_the_old_labels(root: Path, repo: ModelRepository, bm) -> None:
    (root / "simple" / "labels.txt").write_text("a\nb\n")
    repo.load("simple", override=simple_override(bm, label_filename="labels.txt"))
    before = repo.resolve("simple", "")
    assert before.signature.output("OUTPUT0").labels == ("a", "b")
    secret = root.parent / "secret.txt"
    secret.write_text("root:x:0:0\n")
    (root / "simple" / "escape.txt").symlink_to(secret)
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple", override=simple_override(bm, label_filename="escape.txt"))
    assert err.value.message == inside_message("label_filename", "escape.txt")
    assert repo.resolve("simple", "") is before
    assert repo.is_ready()  # the failed reload is not shown as a failure of a serving model


def test_reasons_and_errors_name_no_server_path(
    tmp_path: Path, root: Path, repo: ModelRepository, loader: FakeLoader
) -> None:
    (root / "simple_int8" / "1" / "model.onnx").write_bytes(b"not an ONNX protobuf")
    loader.fail["simple_identity"] = RuntimeError(
        f"Load model from {root / 'simple_identity' / '1' / 'model.onnx'} failed"
    )
    (root / "simple" / "config.pbtxt").write_text("max_batch_size: [")
    failures = repo.load_models()
    assert set(failures) == {"simple", "simple_identity", "simple_int8"}
    reasons = [e.reason for e in repo.index()] + list(failures.values())
    assert all(str(tmp_path) not in r for r in reasons), reasons
    assert failures["simple_identity"] == (
        "version 1 is at UNAVAILABLE state: Load model from simple_identity/1/model.onnx failed"
    )
    assert failures["simple_int8"].startswith(
        "version 1 is at UNAVAILABLE state: failed to read ONNX model 'simple_int8/1/model.onnx': "
    )
    assert failures["simple"].startswith("failed to read text proto from simple/config.pbtxt: ")
    with pytest.raises(ModelLoadError) as err:
        repo.load("simple_int8")
    assert str(tmp_path) not in err.value.message
    assert "'simple_int8/1/model.onnx'" in err.value.message


def test_model_dir_linked_from_outside_the_root(tmp_path: Path, root: Path, bm) -> None:
    elsewhere = tmp_path / "elsewhere"
    bm.build_simple(elsewhere, "linked")
    (elsewhere / "linked" / "1" / "model.onnx").write_bytes(b"garbage")
    (root / "linked").symlink_to(elsewhere / "linked", target_is_directory=True)
    loader = FakeLoader()
    repo = ModelRepository([root], loader)
    failures = repo.load_models(["linked"])
    assert str(tmp_path) not in failures["linked"]
    assert "'linked/1/model.onnx'" in failures["linked"]


def test_duplicate_model_error_names_no_path(tmp_path: Path, root: Path, bm) -> None:
    other = tmp_path / "other"
    bm.build_simple(other, "extra")
    repo = ModelRepository([root, other], FakeLoader())
    bm.build_simple(other, "simple_int8", "INT8")  # appears after start-up
    err = message(Internal, lambda: repo.load("simple_int8"))
    assert err == "model 'simple_int8' appears in multiple model repositories"


def test_bad_model_config_name_fails_at_startup(root: Path) -> None:
    with pytest.raises(ModelLoadError, match="model config name '../x' must be a plain file name"):
        ModelRepository([root], FakeLoader(), config_name="../x")


def test_unknown_names_leave_no_lock_behind(repo: ModelRepository) -> None:
    """RepositoryModelUnload of distinct made-up names grew the lock table without bound."""
    for i in range(50):
        with pytest.raises(InvalidArgument):
            repo.unload(f"{i:04d}" + "x" * 100)
        with pytest.raises(Internal):
            repo.load(f"{i:04d}" + "y" * 100)
    repo.load("simple_int8")
    repo.unload("simple_int8")
    repo.unload("simple_identity")  # in the repository, never loaded
    assert len(repo._op_locks) == 0


def test_keyed_locks_serialise_one_key_and_forget_it() -> None:
    from tributary.repository import KeyedLocks

    locks = KeyedLocks()
    inside: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.hold("a"):
            entered.set()
            release.wait(5)
            inside.append("first")

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(5)
    with locks.hold("b"):
        assert len(locks) == 2
    assert len(locks) == 1
    release.set()
    t.join(5)
    with locks.hold("a"):
        inside.append("second")
    assert inside == ["first", "second"] and len(locks) == 0


def test_model_control_unload_of_unknown_names_leaves_no_lock(repo: ModelRepository) -> None:
    from tributary.control import ModelControl
    from tributary_client._proto import grpc_service_pb2 as pb

    control = ModelControl(repo, explicit=True, on_change=lambda: None)
    try:
        for i in range(20):
            request = pb.RepositoryModelUnloadRequest(model_name=f"{i:04d}" + "x" * 100)
            with pytest.raises(InvalidArgument):
                control.unload(request)
        assert len(control._name_locks) == 0 and len(repo._op_locks) == 0
    finally:
        control.close()
