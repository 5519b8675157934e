"""The Dockerfile and .dockerignore, checked without a Docker daemon.

What `docker build` would trip over (a uid 1000 collision on Ubuntu 24.04, a COPY source
missing from the context) and what a deployment relies on (a pinned base, a numeric non-root
user, a HEALTHCHECK that follows the port and TLS settings, constrained installs).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import (
    ROOT,
    arg_defaults,
    console_scripts,
    copy_problems,
    dockerignore_rules,
    from_images,
    instructions,
    is_excluded,
    project_version,
    useradd_problems,
)

from tributary.cli import build_parser

DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / ".dockerignore").read_text()
INSTRUCTIONS = instructions(DOCKERFILE)
FINAL = [i for i in INSTRUCTIONS if i.stage == max(i.stage for i in INSTRUCTIONS)]


def _final(name: str) -> list[str]:
    return [i.value for i in FINAL if i.name == name]


def _env() -> dict[str, str]:
    out: dict[str, str] = {}
    for value in _final("ENV"):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            out[key] = val
    return out


def test_base_images_are_pinned_cuda13_cudnn9_on_ubuntu_2404() -> None:
    images = from_images(INSTRUCTIONS)
    assert len(images) >= 2  # build stage + runtime stage
    stages = {alias for _, alias in images if alias}
    for image, _ in images:
        if image in stages:
            continue
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and "@" not in name, image
    base = arg_defaults(INSTRUCTIONS)["BASE"]
    # onnxruntime-gpu 1.31 is built for CUDA 13 + cuDNN 9; runtime, not devel.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    assert "onnxruntime-gpu==1.31." in (ROOT / "constraints.txt").read_text()
    # Both stages use BASE (same Python for the venv), and the documented CPU variant is the
    # same Ubuntu release without CUDA.
    assert [image for image, _ in images] == [base, base]
    assert "--build-arg BASE=ubuntu:24.04" in DOCKERFILE


def test_runs_as_numeric_uid_1000() -> None:
    users = _final("USER")
    assert users, "the runtime stage must set USER"
    # Numeric, so Kubernetes' runAsNonRoot can check it; 1000 is what KServe and deploy/ use.
    assert re.fullmatch(r"1000(:1000)?", users[-1]), users[-1]


def test_uid_1000_is_freed_before_it_is_created() -> None:
    assert useradd_problems(DOCKERFILE) == []
    # The line this Dockerfile used to have, on the same base, is caught.
    old = "FROM ubuntu:24.04\nRUN useradd --uid 1000 --create-home tributary\nUSER 1000\n"
    assert useradd_problems(old) == ["stage 0: `useradd --uid 1000` but uid 1000 is taken"]
    freed_later = "FROM ubuntu:24.04\nRUN useradd -u 1000 x && userdel -r ubuntu\n"
    assert useradd_problems(freed_later) != []
    other_stage = (
        "FROM ubuntu:24.04 AS a\nRUN userdel -r ubuntu\nFROM ubuntu:24.04\nRUN useradd -u 1000 x\n"
    )
    assert useradd_problems(other_stage) == ["stage 1: `useradd -u 1000` but uid 1000 is taken"]


def test_healthcheck_follows_the_configured_target_and_tls() -> None:
    (health,) = _final("HEALTHCHECK")
    options, _, command = health.partition("CMD")
    assert "--start-period=" in options and "--timeout=" in options
    command = command.strip()
    assert not command.startswith("["), "shell form, so the env vars expand at run time"
    assert command.split()[0] == "tributary-health"
    assert '"$TRIBUTARY_HEALTH_TARGET"' in command and "$TRIBUTARY_HEALTH_ARGS" in command
    assert "tributary-health" in console_scripts()
    env = _env()
    default_grpc = build_parser().get_default("grpc_port")
    assert env["TRIBUTARY_HEALTH_TARGET"] == f"localhost:{default_grpc}"
    assert env["TRIBUTARY_HEALTH_ARGS"] == ""


def _run_healthcheck(tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """Run the HEALTHCHECK command as Docker does (/bin/sh -c) with a stand-in
    tributary-health that records its argv; returns (exit code, argv)."""
    (health,) = _final("HEALTHCHECK")
    command = health.partition("CMD")[2].strip()
    record = tmp_path / "argv"
    fake = tmp_path / "tributary-health"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "sys.exit(0 if sys.argv[1].endswith(':8001') else 3)\n"
    )
    fake.chmod(0o755)
    full_env = {**_env(), **env, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(["/bin/sh", "-c", command], env=full_env, timeout=30)
    return done.returncode, json.loads(record.read_text())


def test_healthcheck_command_expands_as_documented(tmp_path: Path) -> None:
    assert _run_healthcheck(tmp_path) == (0, ["localhost:8001"])
    code, argv = _run_healthcheck(
        tmp_path,
        TRIBUTARY_HEALTH_TARGET="localhost:9000",
        TRIBUTARY_HEALTH_ARGS="--tls --ca /certs/ca.pem",
    )
    assert argv == ["localhost:9000", "--tls", "--ca", "/certs/ca.pem"]
    assert code == 1  # any failure is 'unhealthy' (exit 1), as Docker requires


def test_the_server_writes_nothing_to_the_image() -> None:
    # deploy/ runs with readOnlyRootFilesystem; onnxruntime would otherwise create a telemetry
    # id under ~/.cache (measured with strace: the only file the server opens for writing).
    env = _env()
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def _run_entrypoint(tmp_path: Path, *args: str) -> list[str]:
    """Run the image's entrypoint script with stand-ins for `tributary` and `bash` on PATH that
    print what they were called as; returns that argv (program name first)."""
    (entry,) = _final("ENTRYPOINT")
    assert json.loads(entry) == ["tributary-entrypoint"]
    copies = [i.value.split() for i in INSTRUCTIONS if i.name == "COPY"]
    [source] = [c[0] for c in copies if c[-1] == "/usr/local/bin/tributary-entrypoint"]
    script = ROOT / source
    assert os.access(script, os.X_OK), "the entrypoint must be executable in git"
    for name in ("tributary", "bash"):
        fake = tmp_path / name
        fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv))\n")
        fake.chmod(0o755)
    done = subprocess.run(
        [str(script), *args],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    argv = json.loads(done.stdout)
    return [Path(argv[0]).name, *argv[1:]]


def test_entrypoint_takes_flags_and_triton_command_lines(tmp_path: Path) -> None:
    """KServe's Triton runtime passes `tritonserver --model-store=... --grpc-port=9000 ...` as
    the container's args; the image must start tributary with those flags."""
    kserve = ["--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080"]
    assert _run_entrypoint(tmp_path, "tritonserver", *kserve) == ["tributary", *kserve]
    assert _run_entrypoint(tmp_path, "--grpc-port=9000") == ["tributary", "--grpc-port=9000"]
    assert _run_entrypoint(tmp_path, "tributary", "--version") == ["tributary", "--version"]
    assert _run_entrypoint(tmp_path, "bash", "-c", "true") == ["bash", "-c", "true"]
    (cmd,) = _final("CMD")
    default = json.loads(cmd)
    assert _run_entrypoint(tmp_path, *default) == ["tributary", *default]
    # and what tributary then receives parses, KServe's line included
    build_parser().parse_args(["--model-store=/tmp", *kserve[1:]])


def test_entrypoint_cmd_and_ports_match_the_cli() -> None:
    assert "tributary" in console_scripts()
    (cmd,) = _final("CMD")
    args = json.loads(cmd)
    parsed = build_parser().parse_args(args)
    assert [str(p) for p in parsed.model_repository] == ["/models"]
    exposed = {int(p.split("/")[0]) for v in _final("EXPOSE") for p in v.split()}
    parser = build_parser()
    assert exposed == {
        parser.get_default("grpc_port"),
        parser.get_default("http_port"),
        parser.get_default("metrics_port"),
    }


def test_installs_are_constrained_and_ready_for_the_sdk_package() -> None:
    runs = [i.value for i in INSTRUCTIONS if i.name == "RUN"]
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if "pip install" in cmd]
    assert installs
    for cmd in installs:
        assert "-c constraints.txt" in cmd, cmd
    server_install = [c for c in installs if '".[gpu]"' in c]
    assert len(server_install) == 1 and "--build-constraint constraints.txt" in server_install[0]
    # The server requires tributary-client, which is on no index: it comes from ./clients in
    # the same command (clients/ is its own distribution).
    assert './clients ".[gpu]"' in server_install[0]
    assert (ROOT / "clients" / "pyproject.toml").is_file()
    assert f'org.opencontainers.image.version="{project_version()}"' in DOCKERFILE


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    assert copy_problems(DOCKERFILE, DOCKERIGNORE) == []
    broken = copy_problems(DOCKERFILE, DOCKERIGNORE + "\nserver/**/*.py\nREADME.md\n")
    assert any(p.startswith("COPY server/: .dockerignore drops") for p in broken), broken
    assert "COPY README.md: excluded by .dockerignore" in broken
    missing = copy_problems(DOCKERFILE + "\nCOPY no_such_dir/ /x/\n", DOCKERIGNORE)
    assert missing == ["COPY no_such_dir/: not in the repository"]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "server/tributary/__pycache__/app.cpython-312.pyc",
        ".pytest_cache/v/cache/nodeids",
        "build/lib/tributary/app.py",
        "clients/build/lib/tributary_client/health.py",
        "tributary.egg-info/PKG-INFO",
        "server/tributary.egg-info/PKG-INFO",
        "benchmarks/out/results.json",
        "model_repository/mlp/1/model.onnx",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert is_excluded(path, dockerignore_rules(DOCKERIGNORE))


@pytest.mark.parametrize(
    "path",
    [
        "constraints.txt",
        "pyproject.toml",
        "README.md",
        "server/tributary/app.py",
        "clients/tributary_client/health.py",
        "model_repository/simple/1/model.onnx",
    ],
)
def test_dockerignore_keeps_what_the_image_needs(path: str) -> None:
    assert not is_excluded(path, dockerignore_rules(DOCKERIGNORE))


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = dockerignore_rules("# comment\n*.md\n!README.md\n/docs\n**/x?z\nlib/*.[ch]\n")
    assert is_excluded("NOTES.md", rules) and not is_excluded("README.md", rules)
    assert not is_excluded("sub/NOTES.md", rules)  # '*' does not cross '/'
    assert is_excluded("docs/a/b.txt", rules)  # a folder takes its contents with it
    assert is_excluded("a/b/xyz", rules) and is_excluded("xaz", rules)
    assert is_excluded("lib/a.c", rules) and not is_excluded("lib/a.o", rules)
