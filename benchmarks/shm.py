"""Server CPU per request and throughput, raw path against system shared memory, in one run.

Builds a temporary repository with `big`: FP32 [3,224,224] in, the same out (an identity-like
model: OUTPUT0 = INPUT0 + 0, so ONNX Runtime cannot hand back its input), no batching. Starts
one server with --allow-client-shm=true and alternates perf_analyzer runs (concurrency 1, sync
gRPC) between the raw path (tensors in the message both ways) and
`--shared-memory=system --output-shared-memory-size=602112` (input and output in /dev/shm).
For each run it reads the server's user+system CPU from /proc and the requests it served from
ModelStatistics, and reports CPU µs per request and requests/s per mode (median of rounds)
and the ratio shm/raw.

    PERF_ANALYZER=/path/to/perf_analyzer python benchmarks/shm.py [--rounds 3]
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
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import build_models  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc  # noqa: E402

SHAPE = [3, 224, 224]
BYTES = 3 * 224 * 224 * 4


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build(root: Path) -> None:
    import numpy as np

    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "Z")
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "Z"], ["OUTPUT0"])],
        "big",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, SHAPE)],
        initializer=[zero],
    )
    config = (
        'name: "big"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]\n'
    )
    build_models.write_model(root, "big", build_models.make_model(graph), config)


def served(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="big"))
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def run(pa: str, server: Server, stub, mode: str, interval_ms: int) -> dict[str, float]:
    cmd = [pa, "-m", "big", "-i", "grpc", "-u", server.url, "--concurrency-range", "1"]
    cmd += ["--measurement-interval", str(interval_ms), "--max-trials", "4"]
    cmd += ["--stability-percentage", "999"]
    if mode == "shm":
        cmd += ["--shared-memory=system", f"--output-shared-memory-size={BYTES}"]
    before_cpu, before_n = cpu_seconds(server.pid), served(stub)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({mode}):\n{done.stdout[-2000:]}{done.stderr}")
    cpu, n = cpu_seconds(server.pid) - before_cpu, served(stub) - before_n
    found = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    return {
        "cpu_us": cpu / max(n, 1) * 1e6,
        "rps": float(found.group(1)) if found else float("nan"),
        "n": n,
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
    with tempfile.TemporaryDirectory(prefix="shm-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        with Server([repo], Path(tmp) / "server", "--allow-client-shm=true") as server:
            channel = grpc.insecure_channel(server.url)
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            results: dict[str, list[dict[str, float]]] = {"raw": [], "shm": []}
            for r in range(args.rounds):
                for mode in ("raw", "shm") if r % 2 == 0 else ("shm", "raw"):
                    res = run(pa, server, stub, mode, args.interval_ms)
                    results[mode].append(res)
                    print(
                        f"round {r + 1} {mode}: {res['cpu_us']:.0f} µs CPU/request, "
                        f"{res['rps']:.0f} req/s ({res['n']:.0f} requests)",
                        flush=True,
                    )
            channel.close()
    print()
    print(f"model big: FP32 {SHAPE} in and out ({BYTES} bytes each way), concurrency 1, sync")
    print("| path | server CPU µs/request | requests/s |")
    print("| --- | --- | --- |")
    med: dict[str, tuple[float, float]] = {}
    for mode in ("raw", "shm"):
        cpu = statistics.median(x["cpu_us"] for x in results[mode])
        rps = statistics.median(x["rps"] for x in results[mode])
        med[mode] = (cpu, rps)
        print(f"| {mode} | {cpu:.0f} | {rps:.0f} |")
    print()
    print(
        f"shm/raw: CPU per request {med['shm'][0] / med['raw'][0]:.2f}x, "
        f"throughput {med['shm'][1] / med['raw'][1]:.2f}x"
    )
    print(f"commands: {results['raw'][0]['cmd']}\n          {results['shm'][0]['cmd']}")


if __name__ == "__main__":
    main()
