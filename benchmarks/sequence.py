"""Sequence batching under perf_analyzer's sequence mode: throughput, latency, server CPU.

Starts one server on `model_repository/` (as committed) and runs perf_analyzer with
`--sequence-length` against the sequence models: `simple_sequence` (direct strategy,
START/READY controls), `accumulator` (implicit state kept by the server) and
`simple_dyna_sequence` (oldest strategy; its config holds a batch up to 10 ms for more
sequences, so its latency shows that window). Concurrency is the number of sequences in
flight (perf_analyzer keeps one request outstanding per sequence with `--serial-sequences`).
For each run it reads the server's user+system CPU from /proc and the requests served from
ModelStatistics, and prints a markdown table (infer/s, p50/p99, server CPU µs per request,
mean rows per execution) plus the perf_analyzer command.

    PERF_ANALYZER=/path/to/perf_analyzer python benchmarks/sequence.py [--interval-ms 3000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc  # noqa: E402

CASES = [
    ("simple_sequence", 1),
    ("simple_sequence", 8),
    ("accumulator", 1),
    ("accumulator", 8),
    ("simple_dyna_sequence", 8),
]
SEQUENCE_LENGTH = 20


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    pa: str, server: Server, stub, model: str, concurrency: int, interval_ms: int
) -> dict[str, object]:
    cmd = [pa, "-m", model, "-i", "grpc", "-u", server.url]
    cmd += ["--concurrency-range", str(concurrency), "--sequence-length", str(SEQUENCE_LENGTH)]
    cmd += ["--serial-sequences", "--input-data", "zero", "--percentile=99"]
    cmd += ["--measurement-interval", str(interval_ms), "--max-trials", "4"]
    cmd += ["--stability-percentage", "999"]
    stats_before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    before_cpu = cpu_seconds(server.pid)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({model}):\n{done.stdout[-2000:]}{done.stderr}")
    cpu = cpu_seconds(server.pid) - before_cpu
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]
    n = after.inference_stats.success.count - stats_before.inference_stats.success.count
    executions = after.execution_count - stats_before.execution_count
    out = done.stdout

    def num(pattern: str) -> float:
        found = re.search(pattern, out)
        return float(found.group(1)) if found else float("nan")

    return {
        "model": model,
        "c": concurrency,
        "rps": num(r"Throughput: ([0-9.]+) infer/sec"),
        "p50": num(r"p50 latency: ([0-9]+) usec"),
        "p99": num(r"p99 latency: ([0-9]+) usec"),
        "cpu_us": cpu / max(n, 1) * 1e6,
        "per_exec": n / max(executions, 1),
        "cmd": " ".join(["perf_analyzer", *cmd[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args()
    pa = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not pa:
        sys.exit("perf_analyzer not found: set $PERF_ANALYZER or put it on PATH")
    workdir = ROOT / "benchmarks" / "out" / "sequence"
    with Server([ROOT / "model_repository"], workdir) as server:
        channel = grpc.insecure_channel(server.url)
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        results = []
        for model, concurrency in CASES:
            res = run(pa, server, stub, model, concurrency, args.interval_ms)
            results.append(res)
            print(
                f"{model} c={concurrency}: {res['rps']:.0f} infer/s, p50 {res['p50']:.0f} µs, "
                f"p99 {res['p99']:.0f} µs, {res['cpu_us']:.0f} µs server CPU/request",
                flush=True,
            )
        channel.close()
    print()
    print(f"sequence length {SEQUENCE_LENGTH} (±20%), one request outstanding per sequence")
    print(
        "| model | sequences (c) | infer/s | p50 (µs) | p99 (µs) | server CPU µs/request "
        "| requests per execution |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['model']} | {r['c']} | {r['rps']:,.0f} | {r['p50']:,.0f} | {r['p99']:,.0f} "
            f"| {r['cpu_us']:,.0f} | {r['per_exec']:.1f} |"
        )
    print()
    print(f"command (per row, -m and --concurrency-range vary): {results[-1]['cmd']}")


if __name__ == "__main__":
    main()
