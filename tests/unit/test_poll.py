"""poll.py: the scan diff (pure), the scanner over real directories, and the poller driving a
ModelRepository with the fake loader of test_repository (docs/model-config.md#model-control)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_repository import FakeLoader

from tributary import poll
from tributary.poll import ModelFiles, Plan, RepositoryPoller, Scanner, plan
from tributary.repository import STILL_SERVING, IndexEntry, ModelRepository

# -- plan: pure ----------------------------------------------------------------------------------


def files(shared: str = "s", **versions: str) -> ModelFiles:
    return ModelFiles(shared, {int(k[1:]): d for k, d in versions.items()})


def test_no_change_is_an_empty_plan() -> None:
    scan = {"a": files(v1="x"), "b": files(v1="y", v2="z")}
    assert not plan(scan, dict(scan))
    assert plan(scan, dict(scan)) == Plan()


def test_new_and_removed_models() -> None:
    before = {"a": files(v1="x"), "gone": files(v1="y")}
    after = {"a": files(v1="x"), "new": files(v1="y")}
    assert plan(before, after) == Plan(load=("new",), unload=("gone",))


def test_shared_file_change_reloads_every_version() -> None:
    before = {"a": files("cfg1", v1="x", v2="y")}
    after = {"a": files("cfg2", v1="x", v2="y", v3="z")}
    assert plan(before, after) == Plan(reload={"a": None})


def test_version_changes_rebuild_only_those_versions() -> None:
    before = {"a": files(v1="x", v2="y")}
    assert plan(before, {"a": files(v1="x", v2="y", v3="z")}).reload == {"a": frozenset({3})}
    assert plan(before, {"a": files(v1="x", v2="changed")}).reload == {"a": frozenset({2})}
    # a removed version: nothing to build, but the load drops it
    assert plan(before, {"a": files(v2="y")}).reload == {"a": frozenset()}


# -- scanner -------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path, bm) -> Path:
    r = tmp_path / "models"
    bm.build_simple(r, "simple", versions=(1, 2))
    return r


def scanner(root: Path) -> Scanner:
    return Scanner(lambda: {p.name: p for p in root.iterdir() if p.is_dir()})


def test_scan_sees_versions_and_content(root: Path) -> None:
    s = scanner(root)
    first = s.scan()
    assert set(first) == {"simple"} and set(first["simple"].versions) == {1, 2}
    assert s.scan() == first  # nothing changed, nothing differs
    config = root / "simple" / "config.pbtxt"
    st = config.stat()
    text = config.read_text()
    # Same size and mtime, other content: small files are hashed every time.
    config.write_text(text.replace("INPUT0", "INPUTX"))
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = s.scan()
    assert second["simple"].shared != first["simple"].shared
    assert second["simple"].versions == first["simple"].versions
    # touching without a change is no change
    os.utime(config)
    assert s.scan() == second


def test_scan_separates_versions_and_skips_hidden_files(root: Path) -> None:
    s = scanner(root)
    first = s.scan()["simple"]
    (root / "simple" / ".config.pbtxt.swp").write_text("editor noise")
    (root / "simple" / "2" / ".partial").write_text("x")
    assert s.scan()["simple"] == first
    (root / "simple" / "2" / "model.onnx").write_bytes(b"not a model")
    after = s.scan()["simple"]
    assert after.shared == first.shared and after.versions[1] == first.versions[1]
    assert after.versions[2] != first.versions[2]
    shutil.copytree(root / "simple" / "1", root / "simple" / "3")
    (root / "simple" / "03").mkdir()  # not a version: leading zero (shared file set changes)
    later = s.scan()["simple"]
    assert set(later.versions) == {1, 2, 3}


def test_large_files_are_rehashed_only_when_their_stat_changes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poll, "SMALL_FILE", 10)
    monkeypatch.setattr(poll, "RACY_NS", 0)  # trust every mtime in this test
    s = scanner(root)
    model = root / "simple" / "1" / "model.onnx"
    first = s.scan()["simple"].versions[1]
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert s.scan()["simple"].versions[1] == first  # same stat: the cached digest stands
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert s.scan()["simple"].versions[1] != first


def test_walk_is_bounded(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(poll, "MAX_FILES", 3)
    for i in range(10):
        (root / "simple" / f"extra{i}.txt").write_text(str(i))
    s = scanner(root)
    s.scan()  # no error, a warning once
    (root / "simple" / "extra9.txt").write_text("changed beyond the bound")
    assert s.scan() == s.scan()


# -- the poller over a repository with the fake loader ---------------------------------------


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def repo(root: Path, loader: FakeLoader) -> ModelRepository:
    return ModelRepository([root], loader)


def started(repo: ModelRepository) -> RepositoryPoller:
    poller = RepositoryPoller(repo, 3600)
    poller.baseline()
    assert repo.load_models() == {}
    return poller


def loads(loader: FakeLoader) -> list[tuple[str, int]]:
    return [(e[1], e[2]) for e in loader.events if e[0] == "load"]


def test_poller_loads_new_versions_and_models_and_unloads_removed(
    root: Path, repo: ModelRepository, loader: FakeLoader, bm
) -> None:
    poller = started(repo)
    assert repo.resolve("simple", "").version == 2
    assert not poller.poll_once()
    shutil.copytree(root / "simple" / "2", root / "simple" / "3")
    bm.build_identity(root, "simple_identity")
    loader.events.clear()
    done = poller.poll_once()
    assert done.load == ("simple_identity",) and done.reload == {"simple": frozenset({3})}
    # latest-1 policy: 3 is built, 2 is dropped; nothing else is rebuilt
    assert sorted(loads(loader)) == [("simple", 3), ("simple_identity", 1)]
    assert repo.resolve("simple", "").version == 3
    assert ("simple", "2", "UNAVAILABLE", "unloaded") in [
        tuple(vars(e).values()) for e in repo.index()
    ]
    shutil.rmtree(root / "simple_identity")
    assert poller.poll_once().unload == ("simple_identity",)
    assert not repo.is_model_ready("simple_identity")


def test_poller_reloads_on_config_change_and_keeps_serving_a_broken_one(
    root: Path, repo: ModelRepository, loader: FakeLoader
) -> None:
    poller = started(repo)
    old = repo.resolve("simple", "")
    config = root / "simple" / "config.pbtxt"
    good = config.read_text()
    config.write_text(good + "dynamic_batching { max_queue_delay_microseconds: 100 }\n")
    assert poller.poll_once().reload == {"simple": None}
    new = repo.resolve("simple", "")
    assert new is not old and old.closed_with is not None
    assert new.config.dynamic_batching.max_queue_delay_microseconds == 100
    # half-written: the old version keeps serving, the index says why, readiness holds
    config.write_text(good[: len(good) // 2])
    poller.poll_once()
    assert repo.resolve("simple", "") is new and new.closed_with is None
    (entry,) = [e for e in repo.index() if e.name == "simple" and e.state == "READY"]
    assert entry.reason.startswith(STILL_SERVING), entry
    assert repo.is_ready()
    # completed: loads, and the reason is gone
    config.write_text(good)
    poller.poll_once()
    assert repo.resolve("simple", "") is not new
    assert [e for e in repo.index() if e.name == "simple"][-1] == IndexEntry(
        "simple", "2", "READY", ""
    )


def test_a_scan_error_does_not_stop_the_poller(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    poller = RepositoryPoller(repo, 0.01)
    calls: list[int] = []

    def broken() -> dict[str, ModelFiles]:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("disk went away")
        return {}

    monkeypatch.setattr(poller._scanner, "scan", broken)
    poller.start()
    try:
        deadline = time.monotonic() + 10
        while poller.scans < 1:
            assert time.monotonic() < deadline, "poller died"
            time.sleep(0.01)
    finally:
        poller.stop()
    assert len(calls) >= 3


def test_stop_is_prompt(repo: ModelRepository) -> None:
    poller = RepositoryPoller(repo, 3600)
    poller.start()
    start = time.monotonic()
    poller.stop()
    assert time.monotonic() - start < 1.0


def test_a_load_that_ends_after_close_serves_nothing(
    root: Path, repo: ModelRepository, loader: FakeLoader
) -> None:
    poller = started(repo)
    shutil.copytree(root / "simple" / "2", root / "simple" / "3")

    def close_first(*args: object) -> object:
        repo.close(0)  # shutdown overtakes the poll's load
        return loader(*args)  # type: ignore[arg-type]

    repo._loader = close_first  # type: ignore[assignment]
    poller.poll_once()
    assert repo.servables() == []
    assert all(s.closed_with is not None for s in loader.created)


def test_fifo_and_device_link_do_not_stall_the_poller(
    root: Path, repo: ModelRepository, loader: FakeLoader, bm
) -> None:
    """A FIFO used to block open() and a link to /dev/zero to hash forever: the scan must end
    promptly, a new model must still load, and stop must stay prompt."""
    os.mkfifo(root / "simple" / "pipe")
    (root / "simple" / "zeros").symlink_to("/dev/zero")
    (root / "simple" / "2" / "zeros").symlink_to("/dev/zero")
    poller = RepositoryPoller(repo, 0.05)
    poller.baseline()  # a scan: must return at all
    assert repo.load_models() == {}
    poller.start()
    try:
        bm.build_identity(root, "simple_identity")
        deadline = time.monotonic() + 10
        while not repo.is_model_ready("simple_identity"):
            assert time.monotonic() < deadline, "the poller stalled"
            time.sleep(0.02)
        assert repo.resolve("simple", "").version == 2
    finally:
        start = time.monotonic()
        poller.stop()
        assert time.monotonic() - start < 2.0


def test_non_regular_entries_digest_by_type(root: Path) -> None:
    s = scanner(root)
    os.mkfifo(root / "simple" / "pipe")
    before = s.scan()
    (root / "simple" / "pipe").unlink()
    (root / "simple" / "pipe").symlink_to("/dev/zero")
    assert s.scan() != before, "a FIFO replaced by a device is a change"
    assert s.scan() == s.scan()
