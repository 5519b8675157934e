"""The installed `tributary` command: help, one-line refusals with exit 2, clean SIGTERM, and
tritonserver's command lines (KServe's, refused and ignored flags; docs/flags.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import build_models
import grpc
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY
from tritonclient.utils import InferenceServerException

TRIBUTARY = Path(sys.executable).parent / "tributary"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    assert TRIBUTARY.exists(), f"console script missing: {TRIBUTARY}"
    return subprocess.run([str(TRIBUTARY), *args], capture_output=True, text=True, timeout=60)


def test_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model-repository", "--grpc-port", "--exit-on-error", "--strict-readiness"):
        assert flag in proc.stdout
    assert proc.stderr == ""
    text = " ".join(proc.stdout.split())
    assert "--grpc-restricted-protocol CATEGORIES:KEY=VALUE RPC categories" in text
    assert "--http-restricted-api CATEGORIES:KEY=VALUE API categories" in text


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("tributary ")


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--model-repository", str(MODEL_REPOSITORY), "--no-such-flag"], "--no-such-flag"),
        (["--model-repository", str(MODEL_REPOSITORY), "--grpc-port=abc"], "abc"),
        (["--model-repository", str(MODEL_REPOSITORY), "--grpc-port=70000"], "65535"),
        (["--model-repository", str(MODEL_REPOSITORY), "--exit-on-error=maybe"], "maybe"),
        (["--model-repository", "/nonexistent/models"], "/nonexistent/models"),
        (["--grpc-port", "0"], "--model-repository"),
        (["--model-repository", str(MODEL_REPOSITORY), "--grpc-max-streams=0"], "0"),
        (["--model-repository", str(MODEL_REPOSITORY), "--grpc-max-streams=1e99"], "1e99"),
        (["--model-repository", str(MODEL_REPOSITORY), "--grpc-stream-max-pending=-1"], "-1"),
        (["--model-repository", str(MODEL_REPOSITORY), "--client-shm-max-bytes=0"], "0"),
        (["--model-repository", str(MODEL_REPOSITORY), "--client-shm-key-prefix=a/b"], "a/b"),
        (["--model-repository", str(MODEL_REPOSITORY), "--client-shm-key-prefix=/"], "'/'"),
        (["--model-repository", str(MODEL_REPOSITORY), "--allow-grpc-reflection=sure"], "sure"),
        (["--model-repository", str(MODEL_REPOSITORY), "--log-verbose=loud"], "loud"),
        (["--model-repository", str(MODEL_REPOSITORY), "--log-format=xml"], "xml"),
        (["--model-repository", str(MODEL_REPOSITORY), "--log-file=/no/such/dir/x.log"], "/no/"),
        (["--model-repository", str(MODEL_REPOSITORY), "--http-port=abc"], "abc"),
        (["--model-repository", str(MODEL_REPOSITORY), "--trace-level=LOUD"], "LOUD"),
        (["--model-repository", str(MODEL_REPOSITORY), "--metrics-config=nonsense"], "nonsense"),
        (["--model-repository", str(MODEL_REPOSITORY), "--backend-config=onnxruntime,x=1"], "x"),
    ],
    ids=[
        "unknown-flag",
        "bad-port",
        "port-range",
        "bad-bool",
        "missing-repo",
        "no-repo",
        "zero-streams",
        "huge-streams",
        "negative-pending",
        "zero-shm-bytes",
        "shm-prefix-path",
        "shm-prefix-empty",
        "bad-reflection-bool",
        "bad-verbose",
        "bad-log-format",
        "log-file-dir",
        "ignored-flag-bad-int",
        "ignored-flag-bad-choice",
        "ignored-flag-bad-setting",
        "unknown-onnxruntime-setting",
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(args: list[str], mentions: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tributary: error: ")
    assert mentions in lines[0]
    assert proc.stdout == ""


def test_sigterm_exits_zero(server_factory, tmp_path) -> None:
    build_models.build_simple(tmp_path)
    server = server_factory(tmp_path)
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_server_ready()
    assert server.terminate(timeout=60) == 0
    assert "stopped" in server.log()
    # the port is closed: a call fails at once (connection refused), it does not hang
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.is_server_live(client_timeout=30)
    assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_a_taken_port_fails_in_one_line_before_loading_models(server) -> None:
    """grpcio raises (it does not return 0) for a port in use: that used to come after every
    model had loaded, as a 26-line traceback."""
    proc = run_cli(
        "--model-repository",
        str(MODEL_REPOSITORY),
        "--grpc-address",
        "127.0.0.1",
        "--grpc-port",
        str(server.grpc_port),
        "--metrics-port",
        "0",
    )
    assert proc.returncode == 1
    assert f"could not bind gRPC port 127.0.0.1:{server.grpc_port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "loaded" not in proc.stderr  # no model was loaded first


@pytest.mark.parametrize(
    ("flag", "why"),
    [
        ("--allow-grpc=false", "the gRPC port also carries the health probes"),
        ("--model-namespacing=true", "distinct names"),
        ("--allow-sagemaker=true", "gRPC endpoint"),
        ("--allow-vertex-ai=true", "gRPC endpoint"),
        ("--rate-limit=execution_count", "instance_group counts"),
    ],
)
def test_refused_flags_say_why_in_one_line(flag: str, why: str) -> None:
    proc = run_cli("--model-repository", str(MODEL_REPOSITORY), flag)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    name = flag.split("=")[0]
    assert line.startswith(f"tributary: error: {name}=")
    assert "is not supported: " in line and why in line
    assert proc.stdout == ""


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its socket inodes found in /proc/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_kserve_command_line_serves_grpc_and_http(server_factory, tmp_path) -> None:
    """KServe's Triton runtime passes `--model-store=/mnt/models --grpc-port=9000
    --http-port=8080 --allow-grpc=true --allow-http=true`; the ports here are 0 so that
    the test cannot collide with anything else on the machine. Both front ends serve, and
    nothing is warned about."""
    import tritonclient.http as httpclient

    build_models.build_simple(tmp_path)
    server = server_factory(
        [],
        f"--model-store={tmp_path}",
        "--grpc-port=0",
        "--http-port=0",
        "--allow-grpc=true",
        "--allow-http=true",
    )
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_server_ready()
    http = httpclient.InferenceServerClient(server.http_url)
    assert http.is_server_ready()
    http.close()
    assert listening_ports(server.proc.pid) == {
        server.grpc_port,
        server.http_port,
        server.metrics_port,
    }
    warnings = [line for line in server.log().splitlines() if line.startswith("W")]
    assert warnings == [], server.log()
    assert server.terminate() == 0


def test_allow_http_false_opens_no_http_port(server_factory, tmp_path) -> None:
    build_models.build_simple(tmp_path)
    server = server_factory(tmp_path, "--allow-http=false")
    assert server.http_port is None
    assert listening_ports(server.proc.pid) == {server.grpc_port, server.metrics_port}
    assert server.terminate() == 0


def test_a_taken_http_port_fails_in_one_line_before_loading(server_factory, tmp_path) -> None:
    import socket

    build_models.build_simple(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = server_factory(tmp_path, f"--http-port={port}", start=False)
        server.launch()
        assert server.wait_exit() == 1
    log = server.log()
    assert f"could not bind HTTP port 127.0.0.1:{port}: Address already in use" in log
    assert "loaded model" not in log


def test_ignored_flags_warn_once_per_reason(server_factory, tmp_path) -> None:
    build_models.build_simple(tmp_path)
    server = server_factory(
        tmp_path,
        "--cache-directory=/opt/tritonserver/caches",
        "--pinned-memory-pool-byte-size=0",
        "--backend-directory=/opt/tritonserver/backends",
        "--backend-config=tensorflow,version=2",
        "--allow-client-shm=true",
        "--allow-http=false",
        "--model-control-mode=EXPLICIT",  # tritonserver's choices are case-insensitive
        "--load-model=simple",
    )
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready("simple")
    warnings = [line for line in server.log().splitlines() if line.startswith("W")]
    assert server.terminate() == 0
    expected = [
        "--cache-directory=/opt/tritonserver/caches: the one cache (local) is built in",
        "--pinned-memory-pool-byte-size=0: ONNX Runtime allocates",
        "--backend-directory=/opt/tritonserver/backends: ONNX Runtime is built in",
        "--backend-config=tensorflow,version=2 (backend 'tensorflow' is not available)",
    ]
    assert len(warnings) == len(expected), "\n".join(warnings)
    for text in expected:
        assert sum(text in line for line in warnings) == 1, (text, warnings)
    assert "allow-http" not in server.log()


def test_max_connection_age_closes_connections(server_factory, tmp_path) -> None:
    """--grpc-max-connection-age: the server sends GOAWAY, the channel goes IDLE and the next
    call reconnects."""
    build_models.build_simple(tmp_path)
    server = server_factory(
        tmp_path, "--grpc-max-connection-age=300", "--grpc-max-connection-age-grace=100"
    )
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.url) as channel:
        channel.subscribe(states.append, try_to_connect=False)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        live(b"", timeout=30)
        ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
        deadline = time.monotonic() + 10
        while not (ready in states and idle in states[states.index(ready) :]):
            assert time.monotonic() < deadline, states  # without the flag: READY for good
            time.sleep(0.05)
        live(b"", timeout=30)
    assert server.terminate() == 0


def test_tls_files_and_port_file_are_checked_before_anything_loads(tmp_path: Path) -> None:
    """A missing, unreadable or non-PEM TLS file used to surface as a traceback (missing) or
    as 'could not bind gRPC port' (garbage); an unwritable --port-file as a traceback after
    serving had started. Each is now one line naming the flag, exit 2."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    pem = tmp_path / "fake.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    repo = ["--model-repository", str(MODEL_REPOSITORY)]
    ssl = ["--grpc-use-ssl=true"]
    cases = [
        (
            [*ssl, f"--grpc-server-cert={tmp_path}/missing.pem", f"--grpc-server-key={pem}"],
            "--grpc-server-cert",
            "not a readable file",
        ),
        (
            [*ssl, f"--grpc-server-cert={pem}", f"--grpc-server-key={garbage}"],
            "--grpc-server-key",
            "not PEM",
        ),
        (
            [*ssl, f"--grpc-server-cert={pem}", f"--grpc-server-key={tmp_path}"],
            "--grpc-server-key",
            "not a readable file",
        ),
        (
            [
                "--grpc-use-ssl-mutual=true",
                f"--grpc-server-cert={pem}",
                f"--grpc-server-key={pem}",
                f"--grpc-root-cert={garbage}",
            ],
            "--grpc-root-cert",
            "not PEM",
        ),
        (["--port-file=/no/such/dir/ports.json"], "--port-file", "writable directory"),
        ([f"--port-file={tmp_path}"], "--port-file", "writable directory"),
    ]
    for args, flag, why in cases:
        proc = run_cli(*repo, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and why in lines[0], (args, proc.stderr)


@pytest.mark.parametrize(
    "flag",
    [
        "--repository-poll-secs=99999999999999",
        "--exit-timeout-secs=99999999999999",
        "--metrics-interval-ms=99999999999999",
        "--grpc-keepalive-time=2147483648",
        "--grpc-max-connection-age=99999999999999",
        "--grpc-http2-max-ping-strikes=2147483648",
        "--grpc-max-message-size=2147483648",
        "--max-tensor-bytes=9223372036854775808",
        "--client-shm-max-bytes=9223372036854775808",
    ],
)
def test_numbers_past_their_range_are_refused_in_one_line(flag: str) -> None:
    """Counts and times past int32 (sizes past int64) used to be accepted, then overflowed
    gRPC's C int options at start-up or a timed wait later: a traceback, sometimes after
    serving had begun. They are refused with the flags."""
    proc = run_cli("--model-repository", str(MODEL_REPOSITORY), flag)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "expected a value <=" in lines[0], proc.stderr


def test_sizes_may_pass_int32() -> None:
    """Shared memory is not bound by gRPC's message limit, so byte sizes take int64."""
    from tributary.cli import parse_args

    options = parse_args(
        ["--model-repository", str(MODEL_REPOSITORY), "--max-tensor-bytes=4294967296"]
    )
    assert options.max_tensor_bytes == 4294967296
