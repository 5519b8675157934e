"""The SDK is its own distribution (`tributary-client`, built from clients/): it must work with
nothing of the server's installed.

The dev environment has everything installed, so the proof runs the SDK in a child interpreter
whose imports of the server package and of every server-only dependency fail (a meta-path
finder raising ImportError), and has it call a live server: inference, metadata, health (the
`tributary-health` entry point) and the asyncio client. The child also reports every non-stdlib
top-level module it ended up importing, which must be the SDK's declared dependencies only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

# Everything the server or the tests have that the SDK must never need.
BLOCKED = [
    "tributary",
    "onnxruntime",
    "onnx",
    "grpc_health",
    "grpc_reflection",
    "grpc_tools",
    "prometheus_client",
    "tritonclient",
    "sklearn",
]

CHILD = r"""
import asyncio, importlib.abc, json, sys

BLOCKED = set(sys.argv[2].split(","))


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None


sys.meta_path.insert(0, Block())
for name in BLOCKED:  # the blocker itself must work, or this test proves nothing
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable")

import numpy as np
from tributary_client import AsyncClient, Client
from tributary_client.health import main as health_main

url = sys.argv[1]
a = np.arange(32, dtype=np.int32).reshape(2, 16)
b = np.full((2, 16), 3, dtype=np.int32)
out = {}
with Client(url, timeout=30) as client:
    out["ready"] = client.is_ready()
    result = client.infer("simple", {"INPUT0": a, "INPUT1": b})
    out["sum_ok"] = bool((result["OUTPUT0"] == a + b).all())
    meta = client.model_metadata("simple")
    out["inputs"] = [[t.name, t.datatype, list(t.shape)] for t in meta.inputs]
    future = client.infer_async("simple", {"INPUT0": a, "INPUT1": b})
    out["future_ok"] = bool((future.result(30)["OUTPUT1"] == a - b).all())


async def via_asyncio():
    async with AsyncClient(url, timeout=30) as client:
        result = await client.infer("simple", {"INPUT0": a, "INPUT1": b})
        return bool((result["OUTPUT0"] == a + b).all())


out["async_ok"] = asyncio.run(via_asyncio())
out["health_rc"] = health_main([url, "--timeout", "10"])
out["modules"] = sorted(
    {m.partition(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"}
)
print(json.dumps(out))
"""


def test_sdk_calls_a_live_server_with_server_packages_unimportable(server, tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, server.url, ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repository root, so nothing is importable from the cwd
        check=False,
    )
    assert run.returncode == 0, run.stderr
    *printed, last = run.stdout.splitlines()
    out = json.loads(last)
    assert printed == ["status: SERVING"]  # tributary-health's own output
    assert out["ready"] and out["sum_ok"] and out["future_ok"] and out["async_ok"]
    assert out["inputs"] == [["INPUT0", "INT32", [-1, 16]], ["INPUT1", "INT32", [-1, 16]]]
    assert out["health_rc"] == 0
    # Non-stdlib modules the SDK pulled in: its three dependencies (protobuf is `google`), the
    # SDK itself, plus interpreter plumbing: the editable-install hook that makes clients/
    # importable, setuptools' distutils shim (a .pth) and the Cython runtime grpc is built on.
    plumbing = ("__editable__", "_distutils_hack", "_cython_", "cython_runtime")
    extra = {m for m in out["modules"] if not m.startswith(plumbing)}
    # typing_extensions comes with grpcio (its own dependency).
    expected = {"tributary_client", "grpc", "google", "numpy", "typing_extensions"}
    assert extra == expected, out["modules"]


def _installed(name: str) -> metadata.Distribution:
    """The installed distribution's metadata, never a stale *.egg-info in the working dir."""
    (dist,) = metadata.distributions(name=name, path=[sysconfig.get_path("purelib")])
    return dist


def _requirements(name: str) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in _installed(name).requires or []}


def test_distributions_declare_the_split() -> None:
    client = _requirements("tributary-client")
    assert sorted(client) == ["grpcio", "numpy", "protobuf"]
    server = _requirements("tributary")
    client_version = _installed("tributary-client").version
    assert str(server["tributary-client"].specifier) == "==" + client_version
    # the SDK keeps the server's ranges, so both (and tritonclient) fit in one environment
    for name, requirement in client.items():
        assert requirement.specifier == server[name].specifier, name
    scripts = {
        ep.name: ep.dist.name if ep.dist else None
        for ep in metadata.entry_points(group="console_scripts")
        if ep.name.startswith("tributary")
    }
    assert scripts == {"tributary": "tributary", "tributary-health": "tributary-client"}
    # and the source of truth agrees with what is installed
    declared = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert declared["version"] == client_version
    assert sorted(Requirement(r).name for r in declared["dependencies"]) == sorted(client)
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert root["packages"]["find"]["where"] == ["server"]


def test_build_requires_a_setuptools_that_reads_spdx_licenses() -> None:
    """`license = "Apache-2.0"` (an SPDX expression) is PEP 639, which setuptools reads from
    77.0 on; an older one, allowed by a looser build requirement, fails to build or mangles it."""
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "pyproject.toml"):
        data = tomllib.loads(pyproject.read_text())
        assert isinstance(data["project"]["license"], str), pyproject
        (setuptools,) = [
            Requirement(r)
            for r in data["build-system"]["requires"]
            if Requirement(r).name == "setuptools"
        ]
        assert not setuptools.specifier.contains("76.9"), (pyproject, str(setuptools))
        assert setuptools.specifier.contains("77.0.0"), (pyproject, str(setuptools))
