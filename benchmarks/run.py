"""One benchmark run: in-process ONNX Runtime, the Python gRPC floor, and Tributary.

Everything is measured in the same run on the same machine and reported as ratios, since
absolute numbers move with the machine. Writes benchmarks/RESULTS.md (and raw JSON under
benchmarks/out/). perf_analyzer must be on PATH or named by $PERF_ANALYZER: `pip install
perf-analyzer` (glibc 2.38 or newer; see docs/benchmarks.md for older systems).

    python benchmarks/run.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "scripts"))

PA_FLAGS = [
    "-i",
    "grpc",
    "--measurement-interval",
    "3000",
    "--max-trials",
    "6",
    "--stability-percentage",
    "999",
    "--input-data",
    "zero",
    "--percentile=99",
]


def perf_analyzer() -> str:
    path = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not path:
        sys.exit("perf_analyzer not found: pip install perf-analyzer, or set $PERF_ANALYZER")
    return path


def build_repo(repo: Path) -> None:
    import build_models as bm

    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    bm.build_simple(repo)
    bm.build_mlp(repo)
    # One instance using both cores: two instances would each hold the 15 MB of weights and
    # evict each other from the cache (measured: c=1 p50 1020 -> 819 us, c=32 +3%).
    with (repo / "mlp" / "config.pbtxt").open("a") as f:
        f.write("\ninstance_group [ { kind: KIND_CPU, count: 1 } ]\n")
    # The same graph without dynamic batching, to compare server CPU per inference.
    shutil.copytree(repo / "mlp", repo / "mlp_nobatch")
    cfg = (repo / "mlp" / "config.pbtxt").read_text()
    cfg = cfg.replace('name: "mlp"', 'name: "mlp_nobatch"')
    cfg = cfg[: cfg.index("dynamic_batching")] if "dynamic_batching" in cfg else cfg
    cfg += "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
    (repo / "mlp_nobatch" / "config.pbtxt").write_text(cfg)


def in_process(model: Path, batches: list[int], seconds: float = 1.5) -> dict[int, dict]:
    """Rows/s and per-run latency of plain ORT (default session options) at each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    results = {}
    for b in batches:
        x = np.zeros((b, 512), dtype=np.float32)
        for _ in range(20):
            session.run(None, {name: x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t)
        results[b] = {
            "rows_per_s": b * len(times) / sum(times),
            "p50_us": statistics.median(times) * 1e6,
        }
    return results


class Proc:
    """A server subprocess that announces its port through a JSON file."""

    def __init__(self, cmd: list[str], port_file: Path, log: Path) -> None:
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:3]} failed to start; see {log}")
            time.sleep(0.05)
        self.port = json.loads(port_file.read_text())["grpc_port"]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pa_run(pa: str, model: str, port: int, concurrency: int, batch: int, tag: str) -> dict:
    report = OUT / f"pa-{tag}.csv"
    cmd = [
        pa,
        "-m",
        model,
        "-u",
        f"127.0.0.1:{port}",
        "-b",
        str(batch),
        "--concurrency-range",
        str(concurrency),
        *PA_FLAGS,
        "-f",
        str(report),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    (OUT / f"pa-{tag}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({tag}):\n{done.stdout[-2000:]}{done.stderr}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    return {
        "cmd": " ".join(cmd),
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
    }


def batch_distribution(port: int, model: str) -> dict[int, int]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {
        int(b["batch_size"]): int(b["compute_infer"].get("count", 0))
        for b in stats.get("batch_stats", [])
    }


def measure(pa: str, proc: Proc, model: str, c: int, b: int, tag: str, server: bool) -> dict:
    before_cpu = proc.cpu_seconds()
    before = batch_distribution(proc.port, model) if server else {}
    r = pa_run(pa, model, proc.port, c, b, tag)
    r["server_cpu_s"] = proc.cpu_seconds() - before_cpu
    if server:
        after = batch_distribution(proc.port, model)
        r["batches"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)}
        r["batches"] = {k: v for k, v in r["batches"].items() if v}
        executions = sum(r["batches"].values())
        rows = sum(k * v for k, v in r["batches"].items())
        r["mean_batch"] = rows / executions if executions else 0.0
        r["cpu_us_per_inference"] = r["server_cpu_s"] / rows * 1e6 if rows else 0.0
    print(f"{tag:24s} {r['infer_per_s']:9.1f} infer/s  p50 {r['p50_us']:8.0f} us", flush=True)
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="c=1 and c=32 only (smoke run)")
    opts = parser.parse_args()
    pa = perf_analyzer()
    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    build_repo(repo)
    conc = [1, 32] if opts.quick else [1, 8, 32, 64]
    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
        }
    }
    print("in-process ONNX Runtime (mlp)", flush=True)
    res["inproc"] = in_process(repo / "mlp" / "1" / "model.onnx", [1, 2, 4, 8, 16, 32, 64])
    for b, r in res["inproc"].items():
        print(f"  batch {b:3d}: {r['rows_per_s']:9.0f} rows/s  p50 {r['p50_us']:7.0f} us")

    py = sys.executable
    floor: dict = {}
    for model in ("mlp", "simple"):
        pf = OUT / f"echo-{model}.json"
        proc = Proc(
            [py, str(HERE / "echo_server.py"), str(repo / model), str(pf)],
            pf,
            OUT / f"echo-{model}.log",
        )
        try:
            for c in conc if model == "mlp" else [8]:
                floor[f"{model}-c{c}"] = measure(
                    pa, proc, model, c, 1, f"floor-{model}-c{c}", False
                )
        finally:
            proc.stop()
    res["floor"] = floor

    pf = OUT / "tributary.json"
    trib: dict = {}
    proc = Proc(
        [
            py,
            "-m",
            "tributary.cli",
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--grpc-address",
            "127.0.0.1",
            "--allow-metrics=false",
            "--allow-http=false",
            "--port-file",
            str(pf),
        ],
        pf,
        OUT / "tributary.log",
    )
    try:
        idle_rss = _rss_mib(proc.proc.pid)
        for c in conc:
            trib[f"mlp-c{c}"] = measure(pa, proc, "mlp", c, 1, f"tributary-mlp-c{c}", True)
        trib["simple-c8"] = measure(pa, proc, "simple", 8, 1, "tributary-simple-c8", True)
        trib["mlp-b8-c16"] = measure(pa, proc, "mlp", 16, 8, "tributary-mlp-b8-c16", True)
        for c in (1, 32):
            trib[f"mlp_nobatch-c{c}"] = measure(
                pa, proc, "mlp_nobatch", c, 1, f"tributary-mlp_nobatch-c{c}", True
            )
    finally:
        proc.stop()
    res["tributary"] = trib
    res["tributary_idle_rss_mib"] = idle_rss
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    write_results(res, " ".join(["python", "benchmarks/run.py"] + sys.argv[1:]))
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_results(res: dict, command: str) -> None:
    from results_md import render

    (HERE / "RESULTS.md").write_text(render(res, command, PA_FLAGS))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    sys.exit(main())
