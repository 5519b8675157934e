"""GPU benchmark: ResNet-50 on ONNX Runtime's CUDA provider, in-process vs served.

Run on a machine with an NVIDIA GPU, onnxruntime-gpu (with its CUDA 13 / cuDNN 9 libraries),
torch + torchvision (only to export the model, random weights) and perf_analyzer:

    python benchmarks/gpu_resnet.py [--out benchmarks/out/gpu]

Measures in one run: in-process ORT CUDA images/s and p50 at batch 1-64; Tributary with
dynamic batching under perf_analyzer at c=1, 16, 64 (-b 1) and c=16 (-b 8) with p50/p99; GPU
utilisation as reported by our own /metrics (NVML) next to nvidia-smi's. Prints a Markdown
section for benchmarks/RESULTS.md. Not run in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

CONFIG = """name: "resnet50"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 1000 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_GPU count: 2 } ]
"""


def export(repo: Path) -> Path:
    import torch
    import torchvision

    model_dir = repo / "resnet50"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(CONFIG)
    path = model_dir / "1" / "model.onnx"
    if not path.exists():
        net = torchvision.models.resnet50(weights=None).eval()
        torch.onnx.export(
            net,
            torch.zeros(1, 3, 224, 224),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
            opset_version=17,
        )
    return path


def in_process(path: Path) -> dict[int, dict]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
    out = {}
    for b in (1, 2, 4, 8, 16, 32, 64):
        x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
        for _ in range(10):
            s.run(None, {"input": x})
        times = []
        end = time.perf_counter() + 3
        while time.perf_counter() < end:
            t = time.perf_counter()
            s.run(None, {"input": x})
            times.append(time.perf_counter() - t)
        out[b] = {
            "images_per_s": b * len(times) / sum(times),
            "p50_ms": statistics.median(times) * 1e3,
        }
        print(
            f"in-process batch {b:2d}: {out[b]['images_per_s']:8.0f} img/s  "
            f"p50 {out[b]['p50_ms']:.2f} ms",
            flush=True,
        )
    return out


def gpu_util_sampler(metrics_port: int, stop: threading.Event, into: dict) -> None:
    """Sample our nv_gpu_utilization and nvidia-smi's together, once a second."""
    ours, smi = [], []
    while not stop.wait(1.0):
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        vals = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nv_gpu_utilization{")
        ]
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        if vals and q.returncode == 0:
            ours.append(vals[0] * 100)
            smi.append(float(q.stdout.split()[0]))
    into["ours"], into["smi"] = ours, smi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu"))
    parser.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer"))
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    repo = a.out / "repo"
    path = export(repo)
    inproc = in_process(path)
    port_file = a.out / "ports.json"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tributary.cli",
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--metrics-interval-ms",
            "500",
            "--allow-http=false",
            "--port-file",
            str(port_file),
        ],
        stdout=(a.out / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    while not port_file.exists():
        if server.poll() is not None:
            sys.exit(f"server failed: see {a.out / 'server.log'}")
        time.sleep(0.1)
    ports = json.loads(port_file.read_text())
    rows = []
    try:
        for conc, batch in ((1, 1), (16, 1), (64, 1), (16, 8)):
            util: dict = {}
            stop = threading.Event()
            sampler = threading.Thread(
                target=gpu_util_sampler, args=(ports["metrics_port"], stop, util)
            )
            sampler.start()
            report = a.out / f"pa-c{conc}-b{batch}.csv"
            cmd = [
                a.perf_analyzer,
                "-m",
                "resnet50",
                "-i",
                "grpc",
                "-u",
                f"127.0.0.1:{ports['grpc_port']}",
                "-b",
                str(batch),
                "--concurrency-range",
                str(conc),
                "--measurement-interval",
                "5000",
                "--input-data",
                "random",
                "--percentile=99",
                "-f",
                str(report),
            ]
            subprocess.run(cmd, check=True, capture_output=True)
            stop.set()
            sampler.join()
            r = next(csv.DictReader(report.open()))
            rows.append(
                (
                    conc,
                    batch,
                    float(r["Inferences/Second"]),
                    float(r["p50 latency"]),
                    float(r["p99 latency"]),
                    util,
                    " ".join(cmd),
                )
            )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    best = max(v["images_per_s"] for v in inproc.values())
    print("\n## GPU: ResNet-50 (random weights), ONNX Runtime CUDA\n")
    print("| batch | in-process img/s | p50 ms |\n| ---: | ---: | ---: |")
    for b, v in inproc.items():
        print(f"| {b} | {v['images_per_s']:,.0f} | {v['p50_ms']:.2f} |")
    print(
        "\n| c | -b | served img/s | × best in-process | p50 µs | p99 µs | GPU util ours / "
        "nvidia-smi (mean %) |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    for conc, batch, ips, p50, p99, util, _ in rows:
        ours = np.mean(util.get("ours") or [0])
        smi = np.mean(util.get("smi") or [0])
        print(
            f"| {conc} | {batch} | {ips:,.0f} | {ips / best:.2f} | {p50:,.0f} | {p99:,.0f} | "
            f"{ours:.0f} / {smi:.0f} |"
        )
    print("\nCommands:\n")
    for *_, cmd in rows:
        print(f"    {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
