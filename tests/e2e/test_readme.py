"""Every command in README.md, run as written against a live server started by `make serve`.

The README is the first thing a new user runs, so it is tested like code: its set-up block
must name `make serve` and `make test` (the latter is what `.ci/run` runs, so it is not run
again from inside the suite), `make serve` is started for real on free ports, and every shell
command and Python block after it runs against that server with the README's port swapped for
the real one. A README edit that breaks a command fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_PORT = "localhost:8001"
README_HTTP_PORT = "localhost:8000"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def shell_commands(body: str) -> list[str]:
    """Commands of a shell block, as bash will read them: a command goes on while a quote is
    open or a line ends with a backslash; comment-only lines are dropped. The text is kept
    as written (bash handles the comments and continuations when it runs)."""
    commands: list[str] = []
    current: list[str] = []
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        text = "\n".join(current)
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # a quote is still open
            continue
        if text.rstrip().endswith("\\"):
            continue
        if words:
            commands.append(text)
        current = []
    assert not current, f"unterminated shell command in README: {current}"
    return commands


def test_block_parsing_groups_commands_like_bash() -> None:
    body = (
        "# a comment\nmake serve   # note\n\n.venv/bin/grpcurl -d '{\"a\": [\n  1]}' \\\n  host m\n"
    )
    assert shell_commands(body) == [
        "make serve   # note",
        ".venv/bin/grpcurl -d '{\"a\": [\n  1]}' \\\n  host m",
    ]
    assert [shlex.split(c, comments=True)[0] for c in shell_commands(body)] == [
        "make",
        ".venv/bin/grpcurl",
    ]
    assert blocks("x\n```sh\nls\n```\n```python\nprint(1)\n```\n") == [
        ("sh", "ls\n"),
        ("python", "print(1)\n"),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def readme_blocks() -> list[tuple[str, str]]:
    found = blocks(README.read_text())
    assert found, "README.md has no fenced blocks"
    return found


@pytest.fixture(scope="module")
def served_by_make(readme_blocks):
    """`make serve` exactly as the README's set-up block says, on free ports."""
    setup = [shlex.split(c, comments=True) for c in shell_commands(readme_blocks[0][1])]
    assert setup == [["make", "serve"], ["make", "test"]], setup
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            *setup[0],
            f"GRPC_PORT={grpc_port}",
            f"HTTP_PORT={http_port}",
            f"METRICS_PORT={metrics_port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # make's children go with it at the end
    )
    target = f"localhost:{grpc_port}"
    deadline = time.monotonic() + 120
    ready = False
    with grpc.insecure_channel(target) as channel:
        from tributary_client._proto import grpc_service_pb2 as pb
        from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready
            except grpc.RpcError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
    if not ready:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        pytest.fail(f"`make serve` did not become ready on {target}:\n{out[-4000:]}")
    yield target, f"localhost:{http_port}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _commands_after_setup(readme_blocks) -> list[str]:
    return [
        c
        for lang, body in readme_blocks[1:]
        if lang in ("sh", "bash")
        for c in shell_commands(body)
    ]


def _is_pip_install(command: str) -> bool:
    return shlex.split(command, comments=True)[:2] == ["pip", "install"]


@pytest.fixture(scope="module")
def sdk_venv(readme_blocks, tmp_path_factory) -> Path:
    """The README's `pip install` line run as written in an empty venv: the SDK alone.

    This is the standalone-install promise checked for real (it needs the package index,
    as `make install` does): afterwards the venv must hold no onnxruntime and no server."""
    installs = [c for c in _commands_after_setup(readme_blocks) if _is_pip_install(c)]
    assert installs, "README lost the SDK's install line"
    venv = tmp_path_factory.mktemp("readme-sdk") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = str(venv / "bin" / "pip")
    for command in installs:
        words = shlex.split(command, comments=True)
        proc = subprocess.run(
            [pip, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    listed = subprocess.run(
        [pip, "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.split()}
    assert "tributary-client" in names
    assert not names & {"onnxruntime", "onnxruntime-gpu", "tributary", "prometheus-client"}, names
    return venv


def test_readme_shell_commands(readme_blocks, served_by_make) -> None:
    commands = [c for c in _commands_after_setup(readme_blocks) if not _is_pip_install(c)]
    assert any("ModelInfer" in c for c in commands), "README lost its grpcurl infer example"
    assert any("/infer" in c for c in commands), "README lost its curl infer example"
    grpc_target, http_target = served_by_make
    for command in commands:
        assert README_PORT in command or README_HTTP_PORT in command, (
            f"README command this test does not know how to run (teach it): {command}"
        )
        run = command.replace(README_PORT, grpc_target).replace(README_HTTP_PORT, http_target)
        proc = subprocess.run(
            run, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{command}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        assert proc.stdout.strip(), f"no output from: {command}"
        if command.startswith("curl -s ") and "/v2/" in command:
            assert '"error"' not in proc.stdout, f"{command}: {proc.stdout}"


def test_readme_python_blocks(readme_blocks, served_by_make, sdk_venv) -> None:
    """Every Python block runs in the dev environment; blocks that use only the SDK also run
    in the SDK-only venv the README's install line made."""
    python_blocks = [body for lang, body in readme_blocks if lang == "python"]
    assert len(python_blocks) >= 2, "README lost its Python examples"
    sdk_only = 0
    for body in python_blocks:
        assert README_PORT in body, f"README Python block without the server address:\n{body}"
        interpreters = [sys.executable]
        if "tritonclient" not in body and "sklearn" not in body:
            interpreters.append(str(sdk_venv / "bin" / "python"))
            sdk_only += 1
        for python in interpreters:
            proc = subprocess.run(
                [python, "-c", body.replace(README_PORT, served_by_make[0])],
                # outside the checkout, so nothing can be imported from the source tree
                cwd=ROOT if python == sys.executable else sdk_venv.parent,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, (
                f"README block failed with {python}:\n{body}\nstderr: {proc.stderr}"
            )
    assert sdk_only >= 1, "no README block exercises the SDK on its own"
