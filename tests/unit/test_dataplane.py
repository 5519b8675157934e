"""The data plane in-process, without sockets: the lifecycle every front end shares
(resolve, validate, schedule, encode, statistics, request log) behaves the same for the
blocking `infer` and the callback `submit`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from tributary.dataplane import DataPlane, InferResult, ServerState
from tributary.errors import InferenceError, InvalidArgument, NotFound, Unavailable
from tributary.logs import RequestLog
from tributary.model import build_loader
from tributary.repository import ModelRepository
from tributary_client._proto import grpc_service_pb2 as pb

A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


@pytest.fixture(params=["direct", "batching"])
def dp(request: pytest.FixtureRequest, tmp_path: Path, bm) -> DataPlane:
    extra = "dynamic_batching { }\n" if request.param == "batching" else ""
    bm.build_simple(tmp_path, "simple", config=bm.simple_config("simple") + extra)
    repository = ModelRepository([tmp_path], build_loader(0, 1))
    repository.load("simple")
    plane = DataPlane(repository, ServerState(server_id="triton"), RequestLog())
    yield plane
    repository.close(5)


def infer_request(datatype: str = "INT32", request_id: str = "r1") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="simple", id=request_id)
    for name, value in (("INPUT0", A), ("INPUT1", B)):
        request.inputs.add(name=name, datatype=datatype, shape=[1, 16])
        request.raw_input_contents.append(value.tobytes())
    return request


def outputs(result: InferResult) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, np.int32).reshape(tuple(out.shape))
        for out, raw in zip(result.response.outputs, result.raws, strict=True)
    }


def counts(dp: DataPlane) -> tuple[int, int]:
    stats = dp.model_statistics("simple", "").model_stats[0].inference_stats
    return stats.success.count, stats.fail.count


def test_infer_resolves_validates_runs_and_counts(dp: DataPlane) -> None:
    result = dp.infer(infer_request(), None)
    assert (result.response.model_name, result.response.model_version) == ("simple", "1")
    assert result.response.id == "r1"
    got = outputs(result)
    np.testing.assert_array_equal(got["OUTPUT0"], A + B)
    np.testing.assert_array_equal(got["OUTPUT1"], A - B)
    assert counts(dp) == (1, 0)


def test_submit_completes_once_with_the_same_result(dp: DataPlane) -> None:
    finished = threading.Event()
    calls: list[tuple[InferResult | None, InferenceError | None]] = []

    def done(result: InferResult | None, error: InferenceError | None) -> None:
        calls.append((result, error))
        finished.set()

    dp.submit(infer_request(), None, done)
    assert finished.wait(30)
    assert len(calls) == 1 and calls[0][1] is None and calls[0][0] is not None
    np.testing.assert_array_equal(outputs(calls[0][0])["OUTPUT0"], A + B)
    assert counts(dp) == (1, 0)


def test_submit_calls_a_failing_done_only_once(
    dp: DataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A completion that raises (the HTTP front end's loop closed under it) must not be
    called a second time with an internal error about itself."""
    calls: list[InferenceError | None] = []

    def done(result: InferResult | None, error: InferenceError | None) -> None:
        calls.append(error)
        raise RuntimeError("Event loop is closed")

    # the scheduler refuses the request through its callback (a full queue, say)
    scheduler = dp.repo.resolve("simple", "").scheduler
    monkeypatch.setattr(scheduler, "submit", lambda item, cb: cb(None, Unavailable("full")))
    with pytest.raises(RuntimeError):
        dp.submit(infer_request(), None, done)
    assert len(calls) == 1 and calls[0] is not None
    assert calls[0].message == "full"


def test_a_bad_request_is_an_error_value_and_a_counted_failure(dp: DataPlane) -> None:
    with pytest.raises(InvalidArgument, match="INPUT0"):
        dp.infer(infer_request(datatype="FP32"), None)
    errors: list[InferenceError | None] = []
    dp.submit(infer_request(datatype="FP32"), None, lambda r, e: errors.append(e))
    assert len(errors) == 1 and isinstance(errors[0], InvalidArgument)
    assert counts(dp) == (0, 2)


def test_unknown_model_is_not_found_for_both_paths(dp: DataPlane) -> None:
    request = infer_request()
    request.model_name = "nope"
    with pytest.raises(NotFound):
        dp.infer(request, None)
    errors: list[InferenceError | None] = []
    dp.submit(request, None, lambda r, e: errors.append(e))
    assert isinstance(errors[0], NotFound)


def test_metadata_health_and_the_request_log(
    dp: DataPlane, caplog: pytest.LogCaptureFixture
) -> None:
    assert dp.server_live() and dp.server_ready() and dp.model_ready("simple", "")
    assert dp.server_metadata().name == "triton"
    meta = dp.model_metadata("simple", "")
    assert [t.name for t in meta.inputs] == ["INPUT0", "INPUT1"] and meta.versions == ["1"]
    assert dp.model_config("simple", "1").config.name == "simple"
    with caplog.at_level(logging.DEBUG, logger="tributary.requests"):
        dp.infer(infer_request(request_id="logged"), None, rpc="HTTP infer")
        with pytest.raises(InvalidArgument):
            dp.infer(infer_request(datatype="FP32", request_id="bad"), None)
    lines = [r.getMessage() for r in caplog.records if r.name == "tributary.requests"]
    assert lines[0].startswith("HTTP infer model='simple' version='1' id='logged' status=OK ")
    assert "id='bad' status=INVALID_ARGUMENT" in lines[1]
    dp.state.exiting = True
    assert not dp.server_live() and not dp.server_ready() and not dp.model_ready("simple", "")


def test_traced_infer_and_submit_in_both_modes(dp: DataPlane) -> None:
    """With a tracer, both calls are traced with queue and compute spans (direct and batching
    scheduler alike), the blocking one under the caller's traceparent."""
    from otlp_receiver import OtlpReceiver, tree

    from tributary.traceconfig import parse_config
    from tributary.tracing import Tracer

    receiver = OtlpReceiver()
    try:
        dp.tracer = Tracer(
            parse_config(
                [
                    "mode=opentelemetry",
                    "level=TIMESTAMPS",
                    "rate=1",
                    f"opentelemetry,url={receiver.url}",
                    "opentelemetry,bsp_schedule_delay=50",
                ]
            )
        )
        assert not dp.tracing
        dp.trace_settings("", None)  # the data plane takes up its tracer's state
        assert dp.tracing
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        dp.infer(infer_request(request_id="blocking"), None, carrier={"traceparent": parent})
        answered = threading.Event()
        dp.submit(infer_request(request_id="callback"), None, lambda r, e: answered.set())
        assert answered.wait(30)
        spans = receiver.wait_for(lambda s: len(s) >= 6)
        for request_id, rpc in (("blocking", "ModelInfer"), ("callback", "ModelStreamInfer")):
            root = next(
                r
                for r in receiver.roots(spans)
                if r.attributes.get("triton.request_id") == request_id
            )
            assert root.attributes["tributary.rpc"] == rpc
            assert set(tree(spans, root)) == {"InferRequest", "queue", "compute"}
        blocking = next(r for r in receiver.roots(spans) if r.parent_id)
        assert blocking.attributes["triton.request_id"] == "blocking"
        dp.trace_settings("", {"trace_level": ["OFF"]})
        assert not dp.tracing
        dp.tracer.shutdown()
    finally:
        receiver.stop()
