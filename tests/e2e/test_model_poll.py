"""Poll mode and zero-downtime reloads against a real server (docs/model-config.md#model-control).

Each test gets its own repository (built, never the committed one) and its own server. Nothing
sleeps to wait: every change is awaited by polling the index or readiness with a deadline.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import build_models as bm
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import triton_error, triton_simple_inputs, wait_for
from test_model_control import POLLING

POLL = ("--model-control-mode=poll", "--repository-poll-secs=1")
BATCHING = "dynamic_batching { max_queue_delay_microseconds: %d }\n"


def simple_config(extra: str = "") -> str:
    return bm.simple_config("simple") + "version_policy { latest { num_versions: 1 } }\n" + extra


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    bm.build_simple(root, "simple", config=simple_config(BATCHING % 100), versions=(1,))
    return root


def index(client: grpcclient.InferenceServerClient) -> set[tuple[str, str, str, str]]:
    return {
        (m.name, m.version, m.state, m.reason) for m in client.get_model_repository_index().models
    }


def states(client: grpcclient.InferenceServerClient, name: str) -> dict[str, str]:
    return {v: s for n, v, s, _ in index(client) if n == name and v}


def infer(client: grpcclient.InferenceServerClient, version: str = "") -> str:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = triton_simple_inputs(a)
    result = client.infer("simple", inputs, model_version=version)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    return str(result.get_response().model_version)


def batching_delay(client: grpcclient.InferenceServerClient) -> int:
    config = client.get_model_config("simple").config
    return int(config.dynamic_batching.max_queue_delay_microseconds)


@pytest.fixture
def poll_server(server_factory, repo) -> Iterator[tuple[object, grpcclient.InferenceServerClient]]:
    server = server_factory(repo, *POLL)
    with grpcclient.InferenceServerClient(server.url) as client:
        yield server, client
    assert server.terminate() == 0


class Traffic:
    """`threads` clients inferring version "" (unary and, for one, streaming) until stopped."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.ok = 0
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._unary) for _ in range(threads - 1)]
        self._threads.append(threading.Thread(target=self._stream))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        wait_for(lambda: self.ok > 20, what="traffic to flow")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _count(self, version: str | None, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.ok += 1
                self.versions.add(version or "")
            else:
                self.errors.append(error)

    def _unary(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                try:
                    self._count(infer(client), None)
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    self._count(None, str(exc))

    def _stream(self) -> None:
        results: list[tuple[object, object]] = []
        done = threading.Condition()

        def callback(result: object, error: object) -> None:
            with done:
                results.append((result, error))
                done.notify()

        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = triton_simple_inputs(a)
        with grpcclient.InferenceServerClient(self.url) as client:
            client.start_stream(callback)
            try:
                while not self._stop.is_set():
                    client.async_stream_infer("simple", inputs)
                    with done:
                        done.wait_for(lambda: results, timeout=30)
                        result, error = results.pop() if results else (None, "no reply")
                    if error is not None:
                        self._count(None, f"stream: {error}")
                    else:
                        self._count(result.get_response().model_version, None)  # type: ignore[attr-defined]
            finally:
                client.stop_stream()


def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    wait_for(predicate, timeout=timeout, what=what)


# -- poll mode ---------------------------------------------------------------------------------


def test_poll_follows_the_repository(poll_server, repo: Path) -> None:
    server, client = poll_server
    assert infer(client) == "1"
    # a new version: loads, then version "" routes to it; latest-1 drops version 1
    shutil.copytree(repo / "simple" / "1", repo / "simple" / "2")
    until(lambda: states(client, "simple") == {"1": "UNAVAILABLE", "2": "READY"}, "version 2")
    assert infer(client) == "2"
    # a config change reloads (the version stays 2, the new setting shows)
    config = repo / "simple" / "config.pbtxt"
    config.write_text(simple_config(BATCHING % 777))
    until(lambda: batching_delay(client) == 777, "the config change")
    # a broken config: the old one keeps serving, the index says why, readiness holds
    config.write_text(simple_config(BATCHING % 777)[:40])
    until(
        lambda: any(n == "simple" and "reload failed" in r for n, _, _, r in index(client)),
        "the failure in the index",
    )
    assert infer(client) == "2" and client.is_server_ready() and batching_delay(client) == 777
    assert "failed to load model 'simple'" in server.log()
    # fixed again: loads, the reason goes
    config.write_text(simple_config(BATCHING % 555))
    until(lambda: batching_delay(client) == 555, "the fixed config")
    assert ("simple", "2", "READY", "") in index(client)
    # a removed version: latest-1 goes back to version 1
    shutil.rmtree(repo / "simple" / "2")
    until(lambda: states(client, "simple").get("1") == "READY", "version 1 again")
    assert infer(client) == "1"
    # a new model, then removed
    bm.build_simple(repo, "other")
    until(lambda: client.is_model_ready("other"), "the new model")
    shutil.rmtree(repo / "other")
    until(lambda: not client.is_model_ready("other"), "the removed model")
    # not ready while UNLOADING already: poll until the unload has finished
    until(lambda: ("other", "1", "UNAVAILABLE", "unloaded") in index(client), "the unload")


def test_poll_mode_refuses_load_and_unload(poll_server) -> None:
    _, client = poll_server
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.load_model, "simple") == POLLING
    assert triton_error(grpc.StatusCode.UNAVAILABLE, client.unload_model, "simple") == POLLING


def test_poll_reload_under_traffic_loses_nothing(poll_server, repo: Path) -> None:
    server, client = poll_server
    with Traffic(server.url) as traffic:
        for version in (2, 3):
            shutil.copytree(repo / "simple" / "1", repo / "simple" / str(version))
            until(lambda v=version: states(client, "simple").get(str(v)) == "READY", "version")
        config = repo / "simple" / "config.pbtxt"
        config.write_text(simple_config(BATCHING % 2000))
        until(lambda: batching_delay(client) == 2000, "the config change")
        seen = traffic.ok
        until(lambda: traffic.ok > seen + 20, "traffic after the last swap")
    assert traffic.errors == [], traffic.errors[:5]
    assert {"1", "3"} <= traffic.versions


def test_explicit_reload_under_traffic_loses_nothing(server_factory, repo: Path) -> None:
    server = server_factory(repo, "--model-control-mode=explicit", "--load-model=simple")
    with grpcclient.InferenceServerClient(server.url) as client, Traffic(server.url) as traffic:
        for delay in (5000, 20000, 100):  # requests wait in each old queue when it retires
            client.load_model("simple", config=_json_config(delay))
        shutil.copytree(repo / "simple" / "1", repo / "simple" / "2")
        client.load_model("simple")
        assert states(client, "simple") == {"1": "UNAVAILABLE", "2": "READY"}
        seen = traffic.ok
        until(lambda: traffic.ok > seen + 20, "traffic after the last swap")
    assert traffic.errors == [], traffic.errors[:5]
    assert traffic.versions == {"1", "2"}
    assert server.terminate() == 0


def _json_config(delay_us: int) -> str:
    from google.protobuf import json_format, text_format

    from tributary_client._proto import model_config_pb2 as mc

    config = text_format.Parse(simple_config(BATCHING % delay_us), mc.ModelConfig())
    return json_format.MessageToJson(config)


def test_shutdown_with_the_poller_running_is_prompt(server_factory, repo: Path) -> None:
    server = server_factory(repo, "--model-control-mode=poll")  # default: scans every 15 s
    with grpcclient.InferenceServerClient(server.url) as client:
        assert infer(client) == "1"
    start = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - start < 5.0


def test_poll_secs_zero_never_scans(server_factory, repo: Path) -> None:
    server = server_factory(repo, "--model-control-mode=poll", "--repository-poll-secs=0")
    with grpcclient.InferenceServerClient(server.url) as client:
        assert infer(client) == "1"
        assert triton_error(grpc.StatusCode.UNAVAILABLE, client.load_model, "simple") == POLLING
    assert "never re-scanned" in server.log()
    assert server.terminate() == 0


# -- a version that fails to load: the load aborts, what served before serves on ---------------


def test_explicit_broken_new_version_keeps_the_old_one(server_factory, repo: Path) -> None:
    """latest 1 and a truncated version 2: version 1 serves on (it used to be unloaded)."""
    server = server_factory(repo, "--model-control-mode=explicit", "--load-model=simple")
    with grpcclient.InferenceServerClient(server.url) as client, Traffic(server.url) as traffic:
        (repo / "simple" / "2").mkdir()
        (repo / "simple" / "2" / "model.onnx").write_bytes(b"truncated")
        with pytest.raises(Exception, match="version 2 is at UNAVAILABLE state"):
            client.load_model("simple")
        assert client.is_model_ready("simple")
        assert states(client, "simple") == {"1": "READY", "2": "UNAVAILABLE"}
        reason = {v: r for n, v, _, r in index(client) if n == "simple"}["2"]
        assert "model.onnx" in reason
        seen = traffic.ok
        until(lambda: traffic.ok > seen + 20, "traffic after the failed load")
    assert traffic.errors == [], traffic.errors[:5]
    assert traffic.versions == {"1"}
    assert server.terminate() == 0


def test_poll_half_written_version_loses_nothing(poll_server, repo: Path) -> None:
    """A version directory whose model.onnx is caught half-copied fails to load; version 1
    serves on, and the completed file loads on a later scan."""
    server, client = poll_server
    data = (repo / "simple" / "1" / "model.onnx").read_bytes()
    with Traffic(server.url) as traffic:
        (repo / "simple" / "2").mkdir()
        with open(repo / "simple" / "2" / "model.onnx", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            until(lambda: states(client, "simple").get("2") == "UNAVAILABLE", "the failed load")
            assert states(client, "simple")["1"] == "READY"
            f.write(data[len(data) // 2 :])
        until(lambda: states(client, "simple") == {"1": "UNAVAILABLE", "2": "READY"}, "v2")
        seen = traffic.ok
        until(lambda: traffic.ok > seen + 20, "traffic after the swap")
    assert traffic.errors == [], traffic.errors[:5]
    assert traffic.versions == {"1", "2"}
