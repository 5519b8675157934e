"""HTTP/REST beside gRPC: perf_analyzer `-i http` and `-i grpc` on the same server, same models.

One server (model_repository's `simple`, and `mlp` built as benchmarks/run.py builds it: one
instance, dynamic batching) serves both front ends. For each case (simple at concurrency 1
and 8, mlp at 8) the two protocols alternate over rounds; each run reports perf_analyzer's
infer/s and the server's user+system CPU (from /proc) divided by the requests it served
(from ModelStatistics), so the cost of the HTTP translation shows up as CPU per request.
perf_analyzer sends random binary tensors over HTTP (Triton's binary extension) and raw ones
over gRPC, and asks for binary outputs, as its defaults do.

    PERF_ANALYZER=/path/to/perf_analyzer python benchmarks/http.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import build_models  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc  # noqa: E402

CASES = [("simple", 1), ("simple", 8), ("mlp", 8)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build(repo: Path) -> None:
    build_models.build_simple(repo)
    build_models.build_mlp(repo)
    with (repo / "mlp" / "config.pbtxt").open("a") as f:
        f.write("\ninstance_group [ { kind: KIND_CPU, count: 1 } ]\n")


def served(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def run(pa: str, server: Server, stub, model: str, c: int, proto: str, interval_ms: int) -> dict:
    port = server.http_port if proto == "http" else server.port
    cmd = [pa, "-m", model, "-i", proto, "-u", f"127.0.0.1:{port}"]
    cmd += ["--concurrency-range", str(c), "--measurement-interval", str(interval_ms)]
    cmd += ["--max-trials", "4", "--stability-percentage", "999"]
    before_cpu, before_n = cpu_seconds(server.pid), served(stub, model)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({proto}):\n{done.stdout[-2000:]}{done.stderr}")
    cpu, n = cpu_seconds(server.pid) - before_cpu, served(stub, model) - before_n
    found = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    return {
        "cpu_us": cpu / max(n, 1) * 1e6,
        "rps": float(found.group(1)) if found else float("nan"),
        "cmd": " ".join(cmd),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=2000)
    args = parser.parse_args()
    pa = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not pa:
        sys.exit("perf_analyzer not found: set $PERF_ANALYZER or put it on PATH")
    rows = []
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        with Server([repo], Path(tmp) / "server", "--allow-metrics=false") as server:
            channel = grpc.insecure_channel(server.url)
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for model, c in CASES:
                results: dict[str, list[dict]] = {"grpc": [], "http": []}
                for r in range(args.rounds):
                    for proto in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                        res = run(pa, server, stub, model, c, proto, args.interval_ms)
                        results[proto].append(res)
                        print(
                            f"{model} c={c} round {r + 1} {proto}: {res['rps']:.0f} infer/s, "
                            f"{res['cpu_us']:.0f} µs CPU/request",
                            flush=True,
                        )
                med = {
                    p: (
                        statistics.median(x["rps"] for x in results[p]),
                        statistics.median(x["cpu_us"] for x in results[p]),
                    )
                    for p in results
                }
                rows.append((model, c, med))
            channel.close()
    print()
    print(
        "| model | concurrency | gRPC infer/s | HTTP infer/s | HTTP/gRPC | gRPC CPU µs/req "
        "| HTTP CPU µs/req |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, c, med in rows:
        (g_rps, g_cpu), (h_rps, h_cpu) = med["grpc"], med["http"]
        print(
            f"| {model} | {c} | {g_rps:,.0f} | {h_rps:,.0f} | {h_rps / g_rps:.2f} "
            f"| {g_cpu:,.0f} | {h_cpu:,.0f} |"
        )


if __name__ == "__main__":
    main()
