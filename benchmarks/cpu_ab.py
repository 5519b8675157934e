"""Server CPU per request, A/B: the working tree against another checkout, in one run.

Starts one server per side (`--a` / `--b`: a source root holding server/ and clients/, e.g. a
`git worktree` of an older commit; the default is this tree), then alternates rounds: each
round sends --requests sequential `simple` ModelInfer requests ([1,16] INT32, the smallest
real request) to one side and reads that server's user+system CPU time from /proc. Reports
CPU µs per request per side (median of rounds) and the ratio b/a. CPU time moves least on a
noisy machine, which is why it is the figure we track.

    git worktree add /tmp/before <commit>
    python benchmarks/cpu_ab.py --b /tmp/before

`--a-flags` / `--b-flags` pass server flags to one side (e.g. `--b . --b-flags=--log-verbose=1`
measures what the per-request log line costs).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(model: str) -> bytes:
    r = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        r.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        r.raw_input_contents.append(np.arange(16, dtype="<i4").tobytes())
    return r.SerializeToString()


def start(root: Path, workdir: Path, flags: str = "") -> Server:
    env_path = f"{root / 'server'}{os.pathsep}{root / 'clients'}"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        return Server([ROOT / "model_repository"], workdir, *shlex.split(flags))
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--a", type=Path, default=ROOT)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--a-flags", default="", help="server flags for side a")
    ap.add_argument("--b-flags", default="", help="server flags for side b")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tributary-cpu-ab-"))
    payload = request("simple")
    servers = {
        "a": start(args.a, work / "a", args.a_flags),
        "b": start(args.b, work / "b", args.b_flags),
    }
    per: dict[str, list[float]] = {"a": [], "b": []}
    try:
        channels = {k: grpc.insecure_channel(s.url) for k, s in servers.items()}
        calls = {k: c.unary_unary(INFER) for k, c in channels.items()}
        for call in calls.values():
            for _ in range(200):  # warm
                call(payload, timeout=10)
        for _ in range(args.rounds):
            for side in ("a", "b"):
                pid = servers[side].pid
                before = cpu_seconds(pid)
                for _ in range(args.requests):
                    calls[side](payload, timeout=10)
                per[side].append((cpu_seconds(pid) - before) / args.requests * 1e6)
    finally:
        for s in servers.values():
            s.stop()
    a, b = statistics.median(per["a"]), statistics.median(per["b"])
    print(f"server CPU per `simple` request (median of {args.rounds} rounds of {args.requests}):")
    for side, value in (("a", a), ("b", b)):
        rounds = ", ".join(f"{x:.0f}" for x in per[side])
        where = f"{getattr(args, side)} {getattr(args, side + '_flags')}".strip()
        print(f"  {side} {where}: {value:.0f} us   (rounds: {rounds})")
    print(f"  b / a = {b / a:.2f}")


if __name__ == "__main__":
    main()
