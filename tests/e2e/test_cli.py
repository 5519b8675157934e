"""The installed `tributary` command: help, one-line refusals with exit 2, clean SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import build_models
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
        (["--model-repository", str(MODEL_REPOSITORY), "--allow-grpc-reflection=sure"], "sure"),
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
        "bad-reflection-bool",
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
