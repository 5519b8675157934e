"""File-override directories: the live-bytes bound and what a failed load leaves behind
(server/tributary/overrides.py, control.py; docs/limits.md#model-file-overrides)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tributary import overrides as O
from tributary.config_check import RefusedConfig
from tributary.control import ModelControl
from tributary.errors import ModelLoadError, NotFound, ResourceExhausted
from tributary_client._proto import grpc_service_pb2 as pb

CONFIG = json.dumps({"max_batch_size": 8})


class FakeRepository:
    """Loads succeed, or fail the way `fail` says; `ready` holds the serving instances."""

    def __init__(self) -> None:
        self.ready: dict[str, list[object]] = {}
        self.fail: type[Exception] | None = None
        self.partial = False  # a failing load still makes one new version READY

    def model_names(self) -> list[str]:
        return []

    def load(self, name: str, *, override: Any = None, model_dir: Path | None = None) -> None:
        if self.fail is None or self.partial:
            self.ready[name] = [object()]
        if self.fail is not None:
            raise self.fail(f"load failed for model '{name}'")

    def unload(self, name: str, dependents: bool = False) -> None:
        self.ready.pop(name, None)

    def ready_versions(self, name: str) -> list[object]:
        if name not in self.ready:
            raise NotFound(name)
        return self.ready[name]


def request(name: str, files: dict[str, bytes]) -> pb.RepositoryModelLoadRequest:
    param = pb.ModelRepositoryParameter
    parameters = {k: param(bytes_param=v) for k, v in files.items()}
    parameters["config"] = param(string_param=CONFIG)
    return pb.RepositoryModelLoadRequest(model_name=name, parameters=parameters)


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    repo = FakeRepository()
    ctl = ModelControl(repo, explicit=True, on_change=lambda: None)  # type: ignore[arg-type]
    yield ctl, repo, tmp_path
    ctl.close()


def dirs(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.glob("tributary-overrides-*/*/*") if p.is_dir())


@pytest.mark.parametrize("error", [ModelLoadError, RefusedConfig, RuntimeError])
def test_a_failed_first_load_leaves_no_directory(control, error) -> None:
    ctl, repo, tmp = control
    repo.fail = error
    for _ in range(3):
        with pytest.raises(error):
            ctl.load(request("bad", {"file:1/model.onnx": b"not onnx" * 100}))
        assert dirs(tmp) == [] and ctl.overrides.live_bytes() == 0


def test_a_failed_reload_leaves_only_the_serving_directory(control) -> None:
    ctl, repo, tmp = control
    ctl.load(request("good", {"file:1/model.onnx": b"x" * 10}))
    [serving] = dirs(tmp)
    repo.fail = ModelLoadError  # every version fails: the old instance serves on
    for _ in range(3):
        with pytest.raises(ModelLoadError):
            ctl.load(request("good", {"file:1/model.onnx": b"garbage" * 100}))
        assert dirs(tmp) == [serving] and ctl.overrides.live_bytes() == 10
    repo.partial = True  # a version now serves from the new directory: both stay
    with pytest.raises(ModelLoadError):
        ctl.load(request("good", {"file:2/model.onnx": b"y" * 5}))
    assert len(dirs(tmp)) == 2 and ctl.overrides.live_bytes() == 15
    ctl.unload(pb.RepositoryModelUnloadRequest(model_name="good"))
    assert dirs(tmp) == [] and ctl.overrides.live_bytes() == 0


def test_failed_loads_do_not_exhaust_the_live_bound(control, monkeypatch) -> None:
    ctl, repo, tmp = control
    monkeypatch.setattr(O, "MAX_LIVE_BYTES", 100)
    repo.fail = ModelLoadError
    for _ in range(5):  # 60 bytes each: the second would be refused if the first stayed
        with pytest.raises(ModelLoadError):
            ctl.load(request("junk", {"file:1/model.onnx": b"j" * 60}))
    repo.fail = None
    ctl.load(request("legit", {"file:1/model.onnx": b"l" * 60}))
    assert ctl.overrides.live_bytes() == 60


def test_the_live_bound_is_reserved_when_checked(tmp_path, monkeypatch) -> None:
    """Two loads both checked before either wrote: the second must not pass the bound."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(O, "MAX_LIVE_BYTES", 100)
    dirs_ = O.OverrideDirs()
    files = {"file:1/model.onnx": b"a" * 60}
    first = dirs_.check("a", files)
    with pytest.raises(ResourceExhausted):
        dirs_.check("b", files)  # a's bytes are not on disk yet, but are reserved
    assert dirs_.live_bytes() == 60
    dirs_.write("a", files, first)
    assert dirs_.live_bytes() == 60
    with pytest.raises(ResourceExhausted):
        dirs_.check("b", files)
    dirs_.unloaded("a")
    assert dirs_.live_bytes() == 0
    second = dirs_.check("b", files)
    dirs_.release(second)  # no write followed (e.g. the config did not parse)
    assert dirs_.live_bytes() == 0
    # a write that fails gives its reservation back too
    bad = {"file:1/a": b"x" * 10, "file:1/a/b": b"y"}
    reserved = dirs_.check("c", bad)
    with pytest.raises(Exception, match="directory has been created as a file"):
        dirs_.write("c", bad, reserved)
    assert dirs_.live_bytes() == 0
    dirs_.close()


def test_a_bad_config_releases_the_reservation(control) -> None:
    ctl, repo, tmp = control
    param = pb.ModelRepositoryParameter
    req = pb.RepositoryModelLoadRequest(
        model_name="m",
        parameters={
            "config": param(string_param="{not json"),
            "file:1/model.onnx": param(bytes_param=b"z" * 10),
        },
    )
    with pytest.raises(Exception, match="failed to poll"):
        ctl.load(req)
    assert ctl.overrides.live_bytes() == 0 and dirs(tmp) == []


@pytest.mark.parametrize(
    "path", ["labels.txt", "warmup/in.bin", "1/model.onnx", "model.onnx", "a/b/c", "x1/y"]
)
def test_paths_inside_the_model_directory_pass(path) -> None:
    assert O.check_path("file:" + path) == ""


@pytest.mark.parametrize(
    "path",
    [
        "",
        "A" * 256,
        "1/../../../evil",
        "../labels.txt",
        "a/..",
        "/etc/evil",
        "1//model.onnx",
        "./labels.txt",
        "1\\..\\evil",
        "a\x00b",
        "a\nb",
        "a/" * 600 + "b",
    ],
)
def test_escaping_paths_are_refused(path) -> None:
    assert O.check_path("file:" + path) != ""
