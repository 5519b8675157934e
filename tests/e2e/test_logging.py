"""What a server process writes to its log: tritonserver's line format, ISO 8601, JSON lines,
--log-file, the level switches, the per-request verbose line, one line per load error, and
gRPC core kept quiet (docs/flags.md, "Logging")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import build_models
import grpc
import pytest
from e2e_support import simple_request, wait_for

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

TRITON_LINE = re.compile(r"^([IWE])\d{4} \d{2}:\d{2}:\d{2}\.\d{6} (\d+) ([\w.]+):\d+\] (.*)$")
ISO_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z ([IWE]) (\d+) ([\w.]+):\d+\] (.*)$")
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logging")
    build_models.build_simple(out)
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logging-broken")
    build_models.build_simple(out, "good")
    corrupt = build_models.build_simple(out, "corrupt")
    (corrupt / "1" / "model.onnx").write_bytes(b"this is not an ONNX protobuf")
    return out


def traffic(server, *, ids: tuple[str, ...] = ("a-1", "a-2")) -> None:
    """ModelInfer per id, one for an unknown model, and a stream of two requests."""
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request_id in ids:
            stub.ModelInfer(simple_request(request_id=request_id)[0], timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="no_such_model", id="b-1"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        requests = [simple_request(request_id=f"s-{i}")[0] for i in range(2)]
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
        assert [r.infer_response.id for r in replies] == ["s-0", "s-1"]


def json_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- formats ----------------------------------------------------------------------------------


def test_default_format_is_tritons_line(server_factory, repo) -> None:
    server = server_factory(repo, "--http-header-forward-pattern=x-.*")  # one warning line too
    traffic(server)
    assert server.terminate() == 0
    lines = server.log().splitlines()
    assert len(lines) >= 4, lines
    for line in lines:
        match = TRITON_LINE.match(line)
        assert match, f"not tritonserver's shape: {line!r}"
        assert int(match[2]) == server.proc.pid
    levels = {TRITON_LINE.match(line)[1] for line in lines}
    assert levels == {"I", "W"}
    assert any("Started GRPCInferenceService at 127.0.0.1:" in line for line in lines)
    # --log-verbose=0: no request lines at all
    assert not any("tributary.requests" in line for line in lines)


def test_iso8601_to_a_log_file_with_info_off(server_factory, repo, tmp_path) -> None:
    log_file = tmp_path / "tributary.log"
    log_file.write_text("kept\n")  # appended to, as tritonserver does
    server = server_factory(
        repo,
        "--log-format=ISO8601",
        f"--log-file={log_file}",
        "--log-info=false",
        "--grpc-infer-thread-count=4",
    )
    traffic(server)
    assert server.terminate() == 0
    assert server.log() == ""  # nothing on stdout/stderr: it all went to the file
    lines = log_file.read_text().splitlines()
    assert lines[0] == "kept"
    assert len(lines) == 2, lines  # --log-info=false leaves the one warning
    match = ISO_LINE.match(lines[1])
    assert match, lines[1]
    assert match[1] == "W" and match[3] == "tributary.flags"
    assert "--grpc-infer-thread-count=4" in match[4]


def test_json_lines_and_one_line_per_request(server_factory, repo) -> None:
    """KServe passes --log-verbose=true; with it every request gets its line."""
    server = server_factory(
        repo,
        "--log-verbose=true",
        "--log-format=json",
        "--log-warning=false",
        "--http-header-forward-pattern=x-.*",
    )
    traffic(server, ids=("a-1", "a-2", "a-3"))

    def requests() -> list[dict]:
        return [r for r in json_records(server.log()) if r["logger"] == "tributary.requests"]

    wait_for(lambda: len([r for r in requests() if r["rpc"] == "ModelStreamInfer"]) == 2)
    assert server.terminate() == 0
    records = json_records(server.log())
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["time"])
    assert "WARNING" not in {r["level"] for r in records}  # --log-warning=false
    loaded = [r for r in records if r["message"].startswith("loaded model")]
    assert [r["model"] for r in loaded] == ["simple"]

    infer = [r for r in requests() if r["rpc"] == "ModelInfer"]
    assert [(r["model"], r["request_id"], r["status"]) for r in infer] == [
        ("simple", "a-1", "OK"),
        ("simple", "a-2", "OK"),
        ("simple", "a-3", "OK"),
        ("no_such_model", "b-1", "NOT_FOUND"),
    ]
    assert all(r["version"] == "1" for r in infer[:3])
    assert all(isinstance(r["duration_us"], int) and r["duration_us"] > 0 for r in infer)
    assert all(r["level"] == "DEBUG" for r in infer)
    streamed = sorted(
        (r["request_id"], r["status"]) for r in requests() if r["rpc"] == "ModelStreamInfer"
    )
    assert streamed == [("s-0", "OK"), ("s-1", "OK")]
    first = infer[0]["message"]
    assert first.startswith("ModelInfer model='simple' version='1' id='a-1' status=OK ")


def test_verbose_line_in_the_default_format(server_factory, repo) -> None:
    server = server_factory(repo, "--log-verbose=1")
    traffic(server, ids=("x-1",))
    wait_for(lambda: server.log().count("ModelStreamInfer model=") == 2)
    assert server.terminate() == 0
    [line] = [x for x in server.log().splitlines() if "id='x-1'" in x]
    match = TRITON_LINE.match(line)
    assert match and match[1] == "I" and match[3] == "tributary.requests"
    assert re.fullmatch(r"ModelInfer model='simple' version='1' id='x-1' status=OK \d+us", match[4])


# -- load errors ------------------------------------------------------------------------------


def error_lines(text: str, model: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("E") and f"'{model}'" in line]


def test_a_load_error_is_logged_once(server_factory, broken) -> None:
    server = server_factory(broken, "--exit-on-error=false")
    assert server.terminate() == 0
    lines = error_lines(server.log(), "corrupt")
    assert len(lines) == 1, server.log()
    assert "failed to load model 'corrupt' version 1:" in lines[0]
    assert error_lines(server.log(), "good") == []


def test_retries_then_one_error_and_one_per_load_request(server_factory, broken) -> None:
    server = server_factory(
        broken,
        "--model-control-mode=explicit",
        "--load-model=corrupt",
        "--exit-on-error=false",
        "--model-load-retry-count=2",
    )
    log = server.log()
    retries = [x for x in log.splitlines() if x.startswith("W") and "'corrupt'" in x]
    assert [("retry 1 of 2" in x, "retry 2 of 2" in x) for x in retries] == [
        (True, False),
        (False, True),
    ]
    assert len(error_lines(log, "corrupt")) == 1
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            request = pb.RepositoryModelLoadRequest(model_name="corrupt")
            stub.RepositoryModelLoad(request, timeout=60)
    assert len(error_lines(server.log(), "corrupt")) == 2  # one more, for the one more load
    assert server.terminate() == 0


def test_log_error_false_drops_errors_only(server_factory, broken) -> None:
    server = server_factory(broken, "--exit-on-error=false", "--log-error=false")
    assert server.terminate() == 0
    lines = server.log().splitlines()
    assert lines and not [x for x in lines if x.startswith("E")]
    assert any("loaded model 'good'" in x for x in lines)


# -- gRPC core --------------------------------------------------------------------------------


def test_grpc_core_stays_quiet_unless_the_environment_asks(
    server_factory, repo, monkeypatch
) -> None:
    """GRPC_VERBOSITY is set before grpc is imported, as a default: GRPC_TRACE alone prints
    nothing at --log-verbose=0, while a GRPC_VERBOSITY the user set still wins."""
    monkeypatch.setenv("GRPC_TRACE", "http")
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    quiet = server_factory(repo)
    traffic(quiet)
    assert quiet.terminate() == 0
    assert "chttp2" not in quiet.log()
    monkeypatch.setenv("GRPC_VERBOSITY", "DEBUG")
    loud = server_factory(repo)
    traffic(loud)
    assert loud.terminate() == 0
    assert "chttp2" in loud.log()
