"""A request that resolved a version just before a reload retired it is routed again, never
failed (docs/model-config.md#model-control): the window between resolve and submit, made
deterministic by handing the data plane the retired version on its first resolve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tributary.dataplane import REROUTES, DataPlane, ServerState
from tributary.errors import Unavailable
from tributary.model import build_loader
from tributary.repository import ModelRepository
from tributary.scheduler import Closed
from tributary.servicer import InferenceServicer
from tributary.streams import Slot
from tributary.wire import split_request
from tributary_client._proto import grpc_service_pb2 as pb

BATCHING = "dynamic_batching { max_queue_delay_microseconds: 100 }\n"


@pytest.fixture(params=["direct", "batching"])
def repo(request: pytest.FixtureRequest, tmp_path: Path, bm) -> ModelRepository:
    extra = BATCHING if request.param == "batching" else ""
    bm.build_simple(tmp_path, "simple", config=bm.simple_config("simple") + extra)
    repository = ModelRepository([tmp_path], build_loader(0, 1))
    repository.load("simple")
    return repository


A = np.arange(16, dtype=np.int32).reshape(1, 16)


def request_bytes() -> bytes:
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(A.tobytes())
    return request.SerializeToString()


def stale_first(repo: ModelRepository, retired: list[Any]) -> None:
    """The next resolves return these retired servables first, then the live one."""
    real = repo.resolve

    def resolve(name: str, version: str) -> Any:
        return retired.pop(0) if retired else real(name, version)

    repo.resolve = resolve  # type: ignore[method-assign]


def reload(repo: ModelRepository) -> Any:
    old = repo.resolve("simple", "")
    repo.load("simple")  # swap, then close the old scheduler
    assert repo.resolve("simple", "") is not old
    return old


def test_unary_request_on_a_retired_version_is_routed_again(repo: ModelRepository) -> None:
    dp = DataPlane(repo, ServerState())
    stale_first(repo, [reload(repo) for _ in range(REROUTES)])
    request, raws = split_request(request_bytes())
    head, outputs = dp.infer(request, raws)
    assert head.model_version == "1"
    np.testing.assert_array_equal(np.frombuffer(outputs[0], np.int32).reshape(1, 16), A + A)


def test_rerouting_is_bounded_and_off_at_shutdown(repo: ModelRepository) -> None:
    state = ServerState()
    dp = DataPlane(repo, state)
    stale_first(repo, [reload(repo) for _ in range(REROUTES + 1)])
    request, raws = split_request(request_bytes())
    with pytest.raises(Closed):
        dp.infer(request, raws)
    state.exiting = True
    with pytest.raises(Unavailable, match="Server exiting"):
        dp.infer(request, raws)


class ExitsOnSubmit:
    """A retired version's scheduler that flips the server to exiting as the request reaches
    it: `_begin` has passed, so only the reroute sites' own `exiting` check can stop a
    reroute (with it gone, the second `_begin` answers "Server exiting" instead of Closed)."""

    def __init__(self, inner: Any, state: ServerState) -> None:
        self.inner, self.state = inner, state

    def infer(self, item: Any) -> Any:
        self.state.exiting = True
        return self.inner.infer(item)

    def submit(self, item: Any, done: Any) -> None:
        self.state.exiting = True
        self.inner.submit(item, done)


def retired_exiting(
    repo: ModelRepository, state: ServerState, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """One retired version whose scheduler starts shutdown; returns the resolve log."""
    old = reload(repo)
    monkeypatch.setattr(old, "scheduler", ExitsOnSubmit(old.scheduler, state))
    stale_first(repo, [old])
    calls: list[str] = []
    stale = repo.resolve

    def resolve(name: str, version: str) -> Any:
        calls.append(name)
        return stale(name, version)

    repo.resolve = resolve  # type: ignore[method-assign]
    return calls


def test_no_reroute_once_shutdown_began_unary(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ServerState()
    dp = DataPlane(repo, state)
    calls = retired_exiting(repo, state, monkeypatch)
    request, raws = split_request(request_bytes())
    with pytest.raises(Closed):
        dp.infer(request, raws)
    assert calls == ["simple"], "resolved once: no second attempt at shutdown"


def test_no_reroute_once_shutdown_began_streamed(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ServerState()
    dp = DataPlane(repo, state)
    calls = retired_exiting(repo, state, monkeypatch)
    begin = dp._begin

    def counted(*args: Any) -> Any:
        calls.append("begin")  # a reroute's _begin fails before it resolves
        return begin(*args)

    monkeypatch.setattr(dp, "_begin", counted)
    slot = Slot()
    InferenceServicer(dp)._stream_one(request_bytes(), slot, lambda: True)
    reply = pb.ModelStreamInferResponse.FromString(slot.wait(30) or b"")
    assert reply.error_message == "Server exiting"  # the Closed of the retired scheduler
    assert calls == ["begin", "simple"], "one attempt: no reroute at shutdown"


def test_streamed_request_on_a_retired_version_is_routed_again(repo: ModelRepository) -> None:
    dp = DataPlane(repo, ServerState())
    stale_first(repo, [reload(repo)])
    slot = Slot()
    InferenceServicer(dp)._stream_one(request_bytes(), slot, lambda: True)
    reply = pb.ModelStreamInferResponse.FromString(slot.wait(30) or b"")
    assert reply.error_message == ""
    assert reply.infer_response.model_version == "1"
