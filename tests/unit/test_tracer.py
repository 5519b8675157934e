"""Tracing in-process: --trace-config parsing, TraceSetting's semantics (Triton's), sampling,
and the Tracer's spans as a real OTLP/gRPC receiver gets them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from otlp_receiver import SERVER_KIND, STATUS_ERROR, OtlpReceiver, tree

from tributary.errors import InvalidArgument, Unavailable, Unimplemented
from tributary.scheduler.batchqueue import WorkItem
from tributary.traceconfig import TraceConfig, parse_config
from tributary.tracesettings import TraceSettings
from tributary.tracing import Trace, Tracer
from tributary_client._proto import grpc_service_pb2 as pb

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

# -- command line ---------------------------------------------------------------------------


def test_trace_config_spellings() -> None:
    cfg = parse_config(
        [
            "mode=opentelemetry",
            "rate=1",
            "level=TIMESTAMPS",
            "level=TENSORS",
            "count=5",
            "opentelemetry,url=collector:4317",
            "opentelemetry,resource=service.name=svc",
            "opentelemetry,resource=deployment=blue",
            "opentelemetry,bsp_schedule_delay=100",
        ]
    )
    assert cfg.mode == "opentelemetry"
    assert cfg.level == {"TIMESTAMPS", "TENSORS"}
    assert (cfg.rate, cfg.count, cfg.url) == (1, 5, "collector:4317")
    assert cfg.resource == (("service.name", "svc"), ("deployment", "blue"))
    assert cfg.bsp_schedule_delay == 100
    assert not cfg.warnings


def test_trace_config_defaults_are_tritons() -> None:
    cfg = parse_config([])
    assert (cfg.mode, cfg.level, cfg.rate, cfg.count, cfg.log_frequency) == (
        "triton",
        frozenset(),
        1000,
        -1,
        0,
    )


def test_level_off_wins_and_deprecated_flags_are_overridden() -> None:
    cfg = parse_config(["level=TIMESTAMPS", "level=OFF"])
    assert cfg.level == frozenset()
    cfg = parse_config(["rate=7"], rate=3, levels=["TIMESTAMPS"], count=2)
    assert (cfg.rate, cfg.count, cfg.level) == (7, 2, {"TIMESTAMPS"})
    assert any("'--trace-rate' is deprecated" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    "entries, text",
    [
        (["rate"], "--trace-config option format is"),
        ([",rate=1"], "No trace mode specified"),
        (["mode=zipkin"], "invalid value for trace mode option: zipkin"),
        (["level=loud"], "invalid value for trace level option: loud"),
        (["rate=-1"], 'Bad option: "--trace-config rate"'),
        (["count=-2"], 'Bad option: "--trace-config count"'),
        (["opentelemetry,colour=red", "mode=opentelemetry"], "opentelemetry,colour"),
        (["mode=opentelemetry", "opentelemetry,resource=novalue"], "resource=<key>=<value>"),
        (
            [
                "mode=opentelemetry",
                "opentelemetry,bsp_max_queue_size=4",
                "opentelemetry,bsp_max_export_batch_size=8",
            ],
            "bsp_max_export_batch_size must be <=",
        ),
    ],
)
def test_trace_config_errors(entries: list[str], text: str) -> None:
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        parse_config(entries)


# -- TraceSetting semantics -------------------------------------------------------------------


def otel(**kw: object) -> TraceConfig:
    """A config as the command line makes it, tracing TIMESTAMPS in mode opentelemetry."""
    return parse_config(
        ["mode=opentelemetry", "level=TIMESTAMPS", *(f"{k}={v}" for k, v in kw.items())]
    )


def test_model_override_and_clear() -> None:
    s = TraceSettings(otel(rate=10))
    s.update("m", {"trace_rate": ["2"], "trace_count": ["3"]})
    assert s.response("m")["trace_rate"] == ["2"]
    assert s.response("m")["trace_count"] == ["3"]
    assert s.response("")["trace_rate"] == ["10"]
    # the global changes: the model's own rate stays, its other fields follow
    s.update("", {"trace_level": ["TIMESTAMPS", "TENSORS"]})
    assert s.response("m")["trace_level"] == ["TIMESTAMPS", "TENSORS"]
    assert s.response("m")["trace_rate"] == ["2"]
    # a key with no value clears the model's override: back to the global
    s.update("m", {"trace_rate": None})
    assert s.response("m")["trace_rate"] == ["10"]
    s.update("m", {"trace_count": []})
    assert "m" not in s.models
    # clearing a global field goes back to the command line's value
    s.update("", {"trace_rate": ["4"]})
    s.update("", {"trace_rate": []})
    assert s.response("")["trace_rate"] == ["10"]


def test_response_keys_per_mode() -> None:
    r = TraceSettings(otel()).response("")
    assert r["trace_mode"] == ["opentelemetry"]
    assert r["url"] == ["localhost:4317"]
    assert "trace_file" not in r and "log_frequency" not in r
    r = TraceSettings(TraceConfig(file="/tmp/t.json")).response("")
    assert r["trace_mode"] == ["triton"] and r["trace_file"] == ["/tmp/t.json"]
    assert r["trace_level"] == ["OFF"] and r["log_frequency"] == ["0"]


@pytest.mark.parametrize(
    "update, error, text",
    [
        ({"trace_file": ["/x"]}, Unimplemented, "trace file location can not be updated"),
        ({"trace_rate": ["1", "2"]}, InvalidArgument, "expect only 1 value for 'trace_rate'"),
        ({"trace_rate": ["fast"]}, InvalidArgument, "Unable to parse 'trace_rate', got: fast"),
        (
            {"trace_rate": ["4294967296"]},
            InvalidArgument,
            "Unable to parse 'trace_rate', value is out of range [ 0, 4294967295 ]",
        ),
        (
            {"trace_count": ["-2"]},
            InvalidArgument,
            "Unable to parse 'trace_count'. Expecting value >= -1, got: -2",
        ),
        (
            {"trace_level": ["OFF", "TIMESTAMPS"]},
            InvalidArgument,
            "Expect only one trace level 'OFF' is specified",
        ),
        ({"trace_level": ["LOUD"]}, InvalidArgument, "unknown trace level 'LOUD'"),
        (
            {"trace_rate": ["0"]},
            InvalidArgument,
            "Attempting to set invalid trace setting :sample rate must be non-zero",
        ),
    ],
)
def test_update_errors(update: dict, error: type, text: str) -> None:
    s = TraceSettings(otel())
    with pytest.raises(error) as info:
        s.update("", update)
    assert text in str(info.value)
    assert s.response("")["trace_rate"] == ["1000"]  # nothing applied


def test_triton_mode_without_file_cannot_trace() -> None:
    s = TraceSettings(TraceConfig())
    with pytest.raises(InvalidArgument, match="trace file name is not given"):
        s.update("", {"trace_level": ["TIMESTAMPS"]})


def test_sampling_rate_and_count() -> None:
    s = TraceSettings(otel(rate=3, count=2))
    setting = s.get("m")
    hits = [setting.sample(False) for _ in range(12)]
    assert hits == [False, False, True, False, False, True] + [False] * 6
    assert s.response("")["trace_count"] == ["0"]
    # a propagated context is traced whatever the rate and count, and uses up nothing
    assert setting.sample(True)
    s.update("", {"trace_count": ["-1"], "trace_rate": ["1"]})
    assert all(s.get("m").sample(False) for _ in range(5))


# -- spans through a real receiver ------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.stop()


def traced_item(rows: int = 2) -> WorkItem:
    """A WorkItem as the scheduler leaves it after a run (monotonic clock)."""
    item = WorkItem(inputs={"x": np.zeros((rows, 4))}, rows=rows, outputs=("y",))
    now = time.monotonic_ns()
    item.queue_start_ns = now - 900_000
    item.compute_start_ns = now - 600_000
    item.queue_ns = 300_000
    item.compute_input_ns, item.compute_infer_ns, item.compute_output_ns = 10_000, 400_000, 20_000
    item.batch_rows = rows * 2
    return item


def finish(
    tracer: Tracer, trace: Trace, version: str = "1", item: WorkItem | None = None, **kw: Any
) -> None:
    """What the data plane does: note the version and work item, then finish."""
    trace.version, trace.item = version, item
    tracer.finish(trace, **kw)


def make_tracer(receiver: OtlpReceiver, *entries: str) -> Tracer:
    config = parse_config(
        [
            "mode=opentelemetry",
            "rate=1",
            "level=TIMESTAMPS",
            f"opentelemetry,url={receiver.url}",
            "opentelemetry,bsp_schedule_delay=50",
            "opentelemetry,resource=service.name=unit",
            *entries,
        ]
    )
    return Tracer(config)


def test_spans_parentage_timing_and_attributes(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver)
    assert tracer.enabled
    trace = tracer.start("simple", "req-7", {"traceparent": TRACEPARENT}, "ModelInfer")
    assert trace is not None
    trace.start_ns -= 1_000_000  # as if it had started before the item's queue start
    finish(tracer, trace, item=traced_item())
    spans = receiver.wait_for(lambda s: len(s) >= 3)
    root = receiver.roots(spans)[0]
    assert (root.trace_id, root.parent_id, root.kind) == (TRACE_ID, PARENT_ID, SERVER_KIND)
    assert root.attributes["triton.model_name"] == "simple"
    assert root.attributes["triton.model_version"] == "1"
    assert root.attributes["triton.request_id"] == "req-7"
    assert root.attributes["tributary.status"] == "OK"
    assert root.resource["service.name"] == "unit"
    t = tree(spans, root)
    assert set(t) == {"InferRequest", "queue", "compute"}
    queue, compute = t["queue"], t["compute"]
    assert queue.parent_id == compute.parent_id == root.span_id
    assert root.attributes["tributary.rows"] == 2
    assert compute.attributes["tributary.batch_rows"] == 4
    assert root.start_ns <= queue.start_ns < queue.end_ns == compute.start_ns
    assert compute.end_ns - compute.start_ns == 430_000
    assert queue.end_ns - queue.start_ns == 300_000
    assert compute.start_ns < compute.events["COMPUTE_INPUT_END"]
    assert compute.events["COMPUTE_INPUT_END"] < compute.events["COMPUTE_OUTPUT_START"]
    assert compute.end_ns <= root.end_ns
    tracer.shutdown()


def test_failure_before_scheduling_and_tensors_level(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver, "level=TENSORS")
    request = pb.ModelInferRequest(model_name="simple")
    request.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    trace = tracer.start("simple", "", None, "ModelStreamInfer", request)
    assert trace is not None
    finish(tracer, trace, "", error=Unavailable("Exceeds maximum queue size"))
    trace = tracer.start("simple", "t", None, "ModelInfer", request)
    assert trace is not None
    response = pb.ModelInferResponse()
    response.outputs.add(name="OUTPUT0", datatype="INT32", shape=[1, 16])
    finish(tracer, trace, item=traced_item(1), response=response)
    spans = receiver.wait_for(lambda s: len(s) >= 4)
    failed = [
        r for r in receiver.roots(spans) if r.attributes["tributary.rpc"] == "ModelStreamInfer"
    ]
    assert failed[0].status_code == STATUS_ERROR
    assert "Exceeds maximum queue size" in failed[0].status_message
    assert failed[0].attributes["tributary.status"] == "UNAVAILABLE"
    assert failed[0].parent_id == ""  # no traceparent: a new trace
    assert len(tree(spans, failed[0])) == 1
    ok = next(r for r in receiver.roots(spans) if r.attributes.get("triton.request_id") == "t")
    assert ok.attributes["tributary.inputs"] == ["INPUT0 INT32 [1,16]"]
    assert ok.attributes["tributary.outputs"] == ["OUTPUT0 INT32 [1,16]"]
    tracer.shutdown()


def test_off_by_default_and_invalid_traceparent_starts_a_new_trace(
    receiver: OtlpReceiver,
) -> None:
    assert not Tracer(parse_config([])).enabled
    tracer = make_tracer(receiver)
    trace = tracer.start("simple", "", {"traceparent": "00-zz-bad-01"}, "ModelInfer")
    assert trace is not None and trace.parent is None
    tracer.settings("", {"trace_level": ["OFF"]})
    assert not tracer.enabled
    assert tracer.start("simple", "", {"traceparent": TRACEPARENT}, "ModelInfer") is None
    tracer.shutdown()


def test_shutdown_flushes_and_is_bounded_without_receiver(receiver: OtlpReceiver) -> None:
    config = parse_config(
        [
            "mode=opentelemetry",
            "rate=1",
            "level=TIMESTAMPS",
            f"opentelemetry,url={receiver.url}",
            "opentelemetry,bsp_schedule_delay=600000",  # nothing is sent before shutdown
        ]
    )
    tracer = Tracer(config)
    trace = tracer.start("simple", "flush-me", None, "ModelInfer")
    assert trace is not None
    finish(tracer, trace)
    tracer.shutdown(timeout_s=10)
    assert receiver.roots()[0].attributes["triton.request_id"] == "flush-me"

    port = receiver.port
    receiver.stop()
    gone = Tracer(replace(config, url=f"127.0.0.1:{port}"))
    trace = gone.start("simple", "lost", None, "ModelInfer")
    assert trace is not None
    finish(gone, trace)
    started = time.monotonic()
    gone.shutdown(timeout_s=2)
    assert time.monotonic() - started < 6  # the SDK alone would wait 30 s


def test_triton_mode_writes_tritons_json_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    config = parse_config(
        ["rate=1", "level=TIMESTAMPS", f"triton,file={path}", "triton,log-frequency=2"]
    )
    tracer = Tracer(config)
    for i in range(3):
        trace = tracer.start("simple", f"r{i}", {"traceparent": TRACEPARENT}, "ModelInfer")
        assert trace is not None
        finish(tracer, trace, item=traced_item())
    first = tmp_path / "trace.json.0"
    deadline = time.monotonic() + 30
    while not first.exists():  # written by the span thread once two traces are in
        assert time.monotonic() < deadline, "no indexed trace file"
        time.sleep(0.01)
    indexed = json.loads(first.read_text())
    assert indexed[0] == {"id": 1, "model_name": "simple", "model_version": 1, "request_id": "r0"}
    names = [e["timestamps"][0]["name"] for e in indexed if e["id"] == 1 and "timestamps" in e]
    assert names == [
        "REQUEST_START",
        "QUEUE_START",
        "COMPUTE_START",
        "COMPUTE_INPUT_END",
        "COMPUTE_OUTPUT_START",
        "COMPUTE_END",
        "REQUEST_END",
    ]
    assert not path.exists()
    tracer.shutdown()
    rest = json.loads(path.read_text())
    assert rest[0]["request_id"] == "r2"


def test_settings_from_the_rpc_reach_sampling(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver, "count=1")
    assert tracer.start("simple", "", None, "ModelInfer") is not None
    assert tracer.start("simple", "", None, "ModelInfer") is None  # count used up
    assert tracer.settings("", None)["trace_count"] == ["0"]
    assert tracer.settings("simple", {"trace_count": ["2"]})["trace_count"] == ["2"]
    assert tracer.start("simple", "", None, "ModelInfer") is not None
    assert tracer.start("other", "", None, "ModelInfer") is None
    tracer.shutdown(timeout_s=5)


def test_receiver_is_real_grpc(receiver: OtlpReceiver) -> None:
    """The harness answers OTLP on the wire, as a collector does."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    with grpc.insecure_channel(receiver.url) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        stub.Export(trace_service_pb2.ExportTraceServiceRequest(), timeout=10)
    assert receiver.exports == 1
