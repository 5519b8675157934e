"""Tracing and the settings RPCs end to end: a real server exports spans over OTLP/gRPC to a
real receiver started here (opentelemetry-proto's TraceService stubs); clients are
tritonclient.grpc and raw stubs (docs/protocol.md#tracing, #log-settings)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import build_models
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import triton_error, triton_simple_inputs, wait_for
from otlp_receiver import SERVER_KIND, STATUS_ERROR, OtlpReceiver, Span, tree

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracing")
    build_models.build_simple(out)
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.stop()


def otel_flags(receiver: OtlpReceiver, *more: str) -> list[str]:
    return [
        "--trace-config=mode=opentelemetry",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
        f"--trace-config=opentelemetry,url={receiver.url}",
        "--trace-config=opentelemetry,bsp_schedule_delay=50",
        "--trace-config=opentelemetry,resource=service.name=e2e",
        *more,
    ]


@pytest.fixture(scope="module")
def traced(server_factory, repo, receiver):
    return server_factory(repo, *otel_flags(receiver))


@pytest.fixture
def client(traced) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(traced.url) as c:
        yield c


def inputs(batch: int = 1) -> list[Any]:
    a = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    return triton_simple_inputs(a, a)


def root_of(receiver: OtlpReceiver, request_id: str) -> tuple[Span, dict[str, Span]]:
    def found(spans: list[Span]) -> bool:
        roots = [
            s for s in receiver.roots(spans) if s.attributes.get("triton.request_id") == request_id
        ]
        return bool(roots) and len(tree(spans, roots[0])) >= (
            3 if roots[0].attributes["tributary.status"] == "OK" else 1
        )

    spans = receiver.wait_for(found)
    root = next(
        s for s in receiver.roots(spans) if s.attributes.get("triton.request_id") == request_id
    )
    return root, tree(spans, root)


def check_request_tree(root: Span, spans: dict[str, Span]) -> None:
    queue_span, compute = spans["queue"], spans["compute"]
    assert set(spans) == {"InferRequest", "queue", "compute"}
    assert root.kind == SERVER_KIND
    assert root.attributes["triton.model_name"] == "simple"
    assert root.attributes["triton.model_version"] == "1"
    assert root.attributes["tributary.status"] == "OK"
    assert root.attributes["tributary.rows"] == 1
    assert root.resource["service.name"] == "e2e"
    assert queue_span.parent_id == compute.parent_id == root.span_id
    assert compute.attributes["tributary.batch_rows"] >= 1
    # timing order: the request contains queue, then compute
    assert root.start_ns <= queue_span.start_ns <= queue_span.end_ns == compute.start_ns
    assert compute.start_ns <= compute.events["COMPUTE_INPUT_END"]
    assert compute.events["COMPUTE_INPUT_END"] <= compute.events["COMPUTE_OUTPUT_START"]
    assert compute.events["COMPUTE_OUTPUT_START"] <= compute.end_ns <= root.end_ns
    assert root.end_ns - root.start_ns < 60 * 10**9


def test_unary_request_joins_the_clients_trace(client, receiver) -> None:
    client.infer(
        "simple",
        inputs(),
        request_id="unary-1",
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"},
    )
    root, spans = root_of(receiver, "unary-1")
    assert (root.trace_id, root.parent_id) == (TRACE_ID, PARENT_ID)
    assert root.trace_state == "vendor=opaque"
    assert root.attributes["tributary.rpc"] == "ModelInfer"
    check_request_tree(root, spans)


def _http_simple_inputs() -> list:
    """`simple`'s two [1,16] INT32 inputs for tritonclient.http."""
    import tritonclient.http as httpclient

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = httpclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(a)
        inputs.append(tensor)
    return inputs


def test_http_request_joins_the_clients_trace(traced, receiver) -> None:
    """The HTTP front end hands the data plane the same headers: one tree, the client's parent."""
    import tritonclient.http as httpclient

    http_inputs = _http_simple_inputs()
    client = httpclient.InferenceServerClient(traced.http_url)
    client.infer(
        "simple",
        http_inputs,
        request_id="http-1",
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=http"},
    )
    client.close()
    root, spans = root_of(receiver, "http-1")
    assert (root.trace_id, root.parent_id) == (TRACE_ID, PARENT_ID)
    assert root.trace_state == "vendor=http"
    assert root.attributes["tributary.rpc"] == "HTTP infer"
    check_request_tree(root, spans)


def test_hostile_trace_headers_write_no_log_lines(traced, client, receiver) -> None:
    """OpenTelemetry's propagator warned once per request about an over-long traceparent or a
    bad tracestate member (what the client sent, in the server log): a client could fill the
    log. Such headers count as absent; the request is traced as its own trace."""
    import tritonclient.http as httpclient

    http_inputs = _http_simple_inputs()
    hostile = [
        {"traceparent": TRACEPARENT + "-" + "x" * 600},  # over OTel's 512, under our 1024
        {"traceparent": "x" * 5000},  # over 1024
        {"traceparent": TRACEPARENT, "tracestate": "a=1,a=2,bad key=v," + "k=v," * 40},
    ]
    http = httpclient.InferenceServerClient(traced.http_url)
    try:
        for i, headers in enumerate(hostile):
            http.infer("simple", http_inputs, request_id=f"hostile-http-{i}", headers=dict(headers))
            client.infer("simple", inputs(), request_id=f"hostile-grpc-{i}", headers=dict(headers))
    finally:
        http.close()
    root, _ = root_of(receiver, "hostile-http-1")
    assert root.trace_id != TRACE_ID  # its own trace
    root, _ = root_of(receiver, "hostile-grpc-0")
    assert root.trace_id != TRACE_ID
    log = traced.log()
    for text in ("exceeded the maximum", "key/value", "Duplicate key", "can't be more"):
        assert text not in log


def test_streamed_requests_join_the_streams_trace(client, receiver) -> None:
    replies: queue.Queue[Any] = queue.Queue()
    client.start_stream(
        lambda result, error: replies.put((result, error)), headers={"traceparent": TRACEPARENT}
    )
    try:
        for i in range(2):
            client.async_stream_infer("simple", inputs(), request_id=f"stream-{i}")
        for _ in range(2):
            result, error = replies.get(timeout=30)
            assert error is None, error
    finally:
        client.stop_stream()
    for i in range(2):
        root, spans = root_of(receiver, f"stream-{i}")
        assert (root.trace_id, root.parent_id) == (TRACE_ID, PARENT_ID)
        assert root.attributes["tributary.rpc"] == "ModelStreamInfer"
        check_request_tree(root, spans)


def test_without_traceparent_a_request_starts_its_own_trace(client, receiver) -> None:
    client.infer("simple", inputs(), request_id="own-1")
    root, spans = root_of(receiver, "own-1")
    assert root.parent_id == "" and root.trace_id != TRACE_ID
    check_request_tree(root, spans)


def test_failed_request_is_traced_with_its_error(client, receiver) -> None:
    bad = grpcclient.InferInput("INPUT0", [1, 3], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.int32))
    triton_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.infer, "simple", [bad], request_id="bad-1"
    )
    root, spans = root_of(receiver, "bad-1")
    assert root.status_code == STATUS_ERROR
    assert root.attributes["tributary.status"] == "INVALID_ARGUMENT"
    assert "INPUT0" in root.status_message
    assert set(spans) == {"InferRequest"}  # it never reached the queue


def test_trace_settings_rpc(client, receiver) -> None:
    got = client.get_trace_settings(as_json=True)["settings"]
    assert got["trace_mode"]["value"] == ["opentelemetry"]
    assert got["trace_level"]["value"] == ["TIMESTAMPS"]
    assert got["trace_rate"]["value"] == ["1"]
    assert got["trace_count"]["value"] == ["-1"]
    assert got["url"]["value"] == [receiver.url]
    assert "trace_file" not in got
    # a model override; the global setting is untouched
    got = client.update_trace_settings(
        model_name="simple",
        settings={"trace_rate": "5", "trace_level": ["TIMESTAMPS", "TENSORS"]},
        as_json=True,
    )["settings"]
    assert got["trace_rate"]["value"] == ["5"]
    assert got["trace_level"]["value"] == ["TIMESTAMPS", "TENSORS"]
    assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1"]
    # a key without value clears the override
    got = client.update_trace_settings(
        model_name="simple", settings={"trace_rate": None, "trace_level": None}, as_json=True
    )["settings"]
    assert got["trace_rate"]["value"] == ["1"]
    assert got["trace_level"]["value"] == ["TIMESTAMPS"]


@pytest.mark.parametrize(
    "model, settings, code, text",
    [
        ("nope", {}, grpc.StatusCode.INVALID_ARGUMENT, "Request for unknown model : nope"),
        (
            "",
            {"trace_file": "/tmp/x.json"},
            grpc.StatusCode.UNIMPLEMENTED,
            "trace file location can not be updated through network protocol",
        ),
        (
            "",
            {"trace_rate": "often"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unable to parse 'trace_rate', got: often",
        ),
        (
            "simple",
            {"trace_count": "-5"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expecting value >= -1",
        ),
        (
            "",
            {"trace_level": ["OFF", "TENSORS"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expect only one trace level 'OFF' is specified",
        ),
        (
            "",
            {"trace_rate": "0"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Attempting to set invalid trace setting :sample rate must be non-zero",
        ),
    ],
)
def test_trace_settings_errors(client, model, settings, code, text) -> None:
    message = triton_error(code, client.update_trace_settings, model_name=model, settings=settings)
    assert text in message
    assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1"]


def test_rate_and_count_sample_requests(client, receiver) -> None:
    """rate=3, count=2 for `simple`: of nine requests the 3rd and 6th are traced, then none;
    a request that brings its own traceparent is traced anyway."""
    client.update_trace_settings(
        model_name="simple", settings={"trace_rate": "3", "trace_count": "2"}
    )
    try:
        for i in range(9):
            client.infer("simple", inputs(), request_id=f"rate-{i}")
        client.infer(
            "simple", inputs(), request_id="rate-forced", headers={"traceparent": TRACEPARENT}
        )
        root_of(receiver, "rate-forced")  # spans arrive in order of finishing: the others are in
        traced = sorted(
            s.attributes["triton.request_id"]
            for s in receiver.roots()
            if s.attributes.get("triton.request_id", "").startswith("rate-")
        )
        assert traced == ["rate-2", "rate-5", "rate-forced"]
        left = client.get_trace_settings(model_name="simple", as_json=True)["settings"]
        assert left["trace_count"]["value"] == ["0"]
    finally:
        client.update_trace_settings(
            model_name="simple", settings={"trace_rate": None, "trace_count": None}
        )


def test_level_off_stops_tracing_at_once(client, receiver) -> None:
    client.update_trace_settings(settings={"trace_level": "OFF"})
    try:
        client.infer("simple", inputs(), request_id="off-1", headers={"traceparent": TRACEPARENT})
    finally:
        client.update_trace_settings(settings={"trace_level": None})  # back to the command line
    client.infer("simple", inputs(), request_id="on-again")
    root_of(receiver, "on-again")
    assert not [r for r in receiver.roots() if r.attributes.get("triton.request_id") == "off-1"]


def test_log_settings_rpc_switches_the_request_log_live(client, traced) -> None:
    got = client.get_log_settings(as_json=True)["settings"]
    assert got["log_verbose_level"]["uint32_param"] == 0
    assert got["log_info"]["bool_param"] is True
    assert got["log_format"]["string_param"] == "default"
    assert got["log_file"]["string_param"] == ""
    client.infer("simple", inputs(), request_id="quiet-1")
    got = client.update_log_settings({"log_verbose_level": 1}, as_json=True)["settings"]
    assert got["log_verbose_level"]["uint32_param"] == 1
    client.infer("simple", inputs(), request_id="loud-1")
    client.get_model_metadata("simple")
    wait_for(lambda: "id='loud-1' status=OK" in traced.log(), what="the request line")
    assert "ModelMetadata model='simple'" in traced.log()  # other RPCs' lines follow too
    client.update_log_settings({"log_verbose_level": 0})
    client.infer("simple", inputs(), request_id="quiet-2")
    client.get_model_config("simple")
    client.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"})
    client.infer("simple", inputs(), request_id="loud-2")
    wait_for(lambda: "id='loud-2' status=OK" in traced.log(), what="the second request line")
    client.update_log_settings({"log_verbose_level": 0, "log_format": "default", "log_info": False})
    log = traced.log()
    assert "quiet-1" not in log and "quiet-2" not in log and "ModelConfig" not in log
    line = next(line for line in log.splitlines() if "id='loud-2'" in line)
    assert line[:4].isdigit() and line[10] == "T"  # ISO 8601
    got = client.update_log_settings({"log_info": True}, as_json=True)["settings"]
    assert got["log_info"]["bool_param"] is True


@pytest.mark.parametrize(
    "settings, code, text",
    [
        (
            {"log_file": "/tmp/elsewhere.log"},
            grpc.StatusCode.UNIMPLEMENTED,
            "log file location can not be updated through network protocol",
        ),
        (
            {"log_format": "xml"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid argument for log_format, got: xml",
        ),
    ],
)
def test_log_settings_errors(client, settings, code, text) -> None:
    assert text in triton_error(code, client.update_log_settings, settings)
    got = client.get_log_settings(as_json=True)["settings"]
    assert got["log_format"]["string_param"] == "default"


def test_log_settings_type_errors(traced) -> None:
    """Raw requests with the wrong kind of value (tritonclient always sends the right one)."""
    from tributary_client._proto import grpc_service_pb2 as pb
    from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(traced.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for key, field, value, text in [
            ("log_info", "string_param", "yes", "expect boolean for 'log_info'"),
            ("log_verbose_level", "bool_param", True, "expect int32 for 'log_verbose_level'"),
            ("log_format", "uint32_param", 1, "expect string for 'log_format'"),
        ]:
            request = pb.LogSettingsRequest()
            setattr(request.settings[key], field, value)
            with pytest.raises(grpc.RpcError) as info:
                stub.LogSettings(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in info.value.details()


def test_default_server_traces_nothing_and_says_so(client_default) -> None:
    got = client_default.get_trace_settings(as_json=True)["settings"]
    assert got["trace_level"]["value"] == ["OFF"]
    assert got["trace_mode"]["value"] == ["triton"]
    assert got["trace_rate"]["value"] == ["1000"]
    assert got["trace_file"]["value"] == [""]
    text = triton_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        client_default.update_trace_settings,
        settings={"trace_level": "TIMESTAMPS"},
    )
    assert "Attempting to set invalid trace setting :trace file name is not given" in text


@pytest.fixture
def client_default(server) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


# -- shutdown ---------------------------------------------------------------------------------


def test_shutdown_flushes_spans(server_factory, repo, receiver) -> None:
    server = server_factory(
        repo, *otel_flags(receiver, "--trace-config=opentelemetry,bsp_schedule_delay=600000")
    )
    with grpcclient.InferenceServerClient(server.url) as c:
        c.infer("simple", inputs(), request_id="at-exit")
    assert not [r for r in receiver.roots() if r.attributes.get("triton.request_id") == "at-exit"]
    assert server.terminate() == 0
    root_of(receiver, "at-exit")


def test_shutdown_is_bounded_when_the_receiver_is_gone(server_factory, repo) -> None:
    gone = OtlpReceiver()
    server = server_factory(repo, *otel_flags(gone, "--exit-timeout-secs=1"))
    gone.stop()
    with grpcclient.InferenceServerClient(server.url) as c:
        c.infer("simple", inputs(), request_id="lost")
    started = time.monotonic()
    assert server.terminate(timeout=30) == 0
    assert time.monotonic() - started < 15


def test_triton_mode_writes_the_trace_file(server_factory, repo, tmp_path) -> None:
    path = tmp_path / "trace.json"
    server = server_factory(
        repo,
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
        f"--trace-config=triton,file={path}",
    )
    with grpcclient.InferenceServerClient(server.url) as c:
        c.infer("simple", inputs(), request_id="file-1")
        got = c.get_trace_settings(as_json=True)["settings"]
        assert got["trace_file"]["value"] == [str(path)]
    assert server.terminate() == 0
    entries = json.loads(path.read_text())
    assert entries[0] == {
        "id": 1,
        "model_name": "simple",
        "model_version": 1,
        "request_id": "file-1",
    }
    stamps = [e["timestamps"][0] for e in entries[1:]]
    assert [s["name"] for s in stamps][0] == "REQUEST_START"
    assert [s["name"] for s in stamps][-1] == "REQUEST_END"
    assert [s["ns"] for s in stamps] == sorted(s["ns"] for s in stamps)
