"""Ensemble vs its steps called one by one, response-cache hit vs miss, and the key's cost.

1. `digits_pipeline` (digits_pre -> digits -> digits_topk, model_repository/) called as one
   ensemble request, against a client calling the three models itself (three round trips,
   each tensor encoded, sent, decoded again). A sync tritonclient loop, batch 1, alternating
   rounds; client latency (p50, p99) and server CPU µs per pipeline (from /proc).
2. The response cache on `mlp` (benchmark model, ~15 MB of weights, compute-bound):
   the same request again and again (every call after the first is a hit) against a new
   input every call (every call a miss: lookup, run, store). Same server, same loop.
   With $PERF_ANALYZER set, also perf_analyzer's view (hits only: `--input-data zero`)
   against an identical model without the cache.
3. The key: `ModelCache.key` over inputs of growing size, in process (µs and GB/s).

    python benchmarks/ensemble_cache.py [--requests 2000] [--rounds 3]
    PERF_ANALYZER=/path/to/perf_analyzer python benchmarks/ensemble_cache.py
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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import build_models  # noqa: E402

from tributary.scheduler.cache import ResponseCache  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, n: int, call: Callable[[int], object]) -> dict[str, float]:
    lat: list[float] = []
    cpu0 = cpu_seconds(pid)
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - t0)
    cpu = cpu_seconds(pid) - cpu0
    lat.sort()
    return {
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99) - 1] * 1e6,
        "cpu_us": cpu / n * 1e6,
        "rps": n / sum(lat),
    }


def one(kind: str, values: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(v[k] for v in values) for k in values[0]}


def row(name: str, r: dict[str, float]) -> str:
    return (
        f"| {name} | {r['p50_us']:,.0f} | {r['p99_us']:,.0f} | {r['cpu_us']:,.0f} | "
        f"{r['rps']:,.0f} |"
    )


HEADER = (
    "| path | p50 (µs) | p99 (µs) | server CPU µs/request | requests/s |\n"
    "| --- | ---: | ---: | ---: | ---: |"
)


def tensor(name: str, arr: np.ndarray, datatype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


def ensemble_vs_steps(url: str, pid: int, n: int, rounds: int) -> None:
    c = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (1, 64), dtype=np.uint8) for _ in range(64)]

    def ensemble(i: int) -> object:
        r = c.infer("digits_pipeline", [tensor("PIXELS", images[i % 64], "UINT8")])
        return r.as_numpy("TOP_LABELS")

    def steps(i: int) -> object:
        pre = c.infer("digits_pre", [tensor("pixels", images[i % 64], "UINT8")])
        dig = c.infer("digits", [tensor("input", pre.as_numpy("input"), "FP32")])
        top = c.infer(
            "digits_topk", [tensor("probabilities", dig.as_numpy("probabilities"), "FP32")]
        )
        return (dig.as_numpy("label"), top.as_numpy("labels"))

    for i in range(8):  # the two paths agree
        assert np.array_equal(ensemble(i), steps(i)[1])
    results: dict[str, list[dict[str, float]]] = {"ensemble": [], "steps": []}
    for r in range(rounds):
        for kind in ("ensemble", "steps") if r % 2 == 0 else ("steps", "ensemble"):
            results[kind].append(measure(pid, n, ensemble if kind == "ensemble" else steps))
    e, s = one("ensemble", results["ensemble"]), one("steps", results["steps"])
    print(
        f"\n### Ensemble vs steps (digits_pipeline, batch 1, sync, {n} requests x {rounds} "
        "rounds, medians)\n"
    )
    print(HEADER)
    print(row("ensemble: 1 request", e))
    print(row("client calls the 3 steps", s))
    print(
        f"\nensemble / steps: latency p50 {e['p50_us'] / s['p50_us']:.2f}x, "
        f"server CPU {e['cpu_us'] / s['cpu_us']:.2f}x, throughput {e['rps'] / s['rps']:.2f}x"
    )
    c.close()


def hit_vs_miss(url: str, pid: int, n: int, rounds: int) -> None:
    c = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(1)
    same = rng.standard_normal((1, 512), dtype=np.float32)
    fresh = rng.standard_normal((n * rounds + 1, 1, 512), dtype=np.float32)
    counter = iter(range(len(fresh)))

    def hit(i: int) -> object:
        return c.infer("mlp", [tensor("INPUT0", same, "FP32")]).as_numpy("OUTPUT0")

    def miss(i: int) -> object:
        x = fresh[next(counter)]
        return c.infer("mlp", [tensor("INPUT0", x, "FP32")]).as_numpy("OUTPUT0")

    def uncached(i: int) -> object:
        return c.infer("mlp_nocache", [tensor("INPUT0", same, "FP32")]).as_numpy("OUTPUT0")

    assert np.array_equal(hit(0), uncached(0))
    results: dict[str, list[dict[str, float]]] = {"hit": [], "miss": [], "uncached": []}
    calls = {"hit": hit, "miss": miss, "uncached": uncached}
    for r in range(rounds):
        order = ["hit", "miss", "uncached"]
        for kind in order if r % 2 == 0 else order[::-1]:
            results[kind].append(measure(pid, n, calls[kind]))
    h, m, u = (one(k, results[k]) for k in ("hit", "miss", "uncached"))
    print(
        f"\n### Response cache (mlp, FP32 [1,512] -> [1,10], sync, {n} requests x {rounds} "
        "rounds, medians)\n"
    )
    print(HEADER)
    print(row("cache hit", h))
    print(row("cache miss (lookup + run + store)", m))
    print(row("same model, cache off", u))
    print(
        f"\nhit / miss: latency p50 {h['p50_us'] / m['p50_us']:.2f}x, "
        f"server CPU {h['cpu_us'] / m['cpu_us']:.2f}x; miss / cache off: latency p50 "
        f"{m['p50_us'] / u['p50_us']:.2f}x, server CPU {m['cpu_us'] / u['cpu_us']:.2f}x"
    )
    (entry,) = [s for s in c.get_inference_statistics("mlp").model_stats]
    st = entry.inference_stats
    print(
        f"server-side (ModelStatistics): cache_hit {st.cache_hit.count} x "
        f"{st.cache_hit.ns / max(st.cache_hit.count, 1) / 1e3:.1f} µs, cache_miss "
        f"{st.cache_miss.count} x {st.cache_miss.ns / max(st.cache_miss.count, 1) / 1e3:.1f} µs, "
        f"compute_infer {st.compute_infer.ns / max(st.compute_infer.count, 1) / 1e3:.1f} µs"
    )
    c.close()


def perf_analyzer(pa: str, url: str, pid: int) -> None:
    print("\n### perf_analyzer (concurrency 1, `--input-data zero`: every request is the same)\n")
    print("| model | infer/s | p50 (µs) | p99 (µs) | server CPU µs/request |")
    print("| --- | ---: | ---: | ---: | ---: |")
    commands = []
    for model in ("mlp", "mlp_nocache"):
        cmd = [pa, "-m", model, "-i", "grpc", "-u", url, "--concurrency-range", "1"]
        cmd += ["--measurement-interval", "3000", "--max-trials", "4"]
        cmd += ["--stability-percentage", "999", "--input-data", "zero", "--percentile=99"]
        c = grpcclient.InferenceServerClient(url)

        def served(c: grpcclient.InferenceServerClient = c, model: str = model) -> int:
            reply = c.get_inference_statistics(model)
            return sum(m.inference_stats.success.count for m in reply.model_stats)

        cpu0, n0 = cpu_seconds(pid), served()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        cpu, n = cpu_seconds(pid) - cpu0, served() - n0
        c.close()
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed:\n{done.stdout[-2000:]}{done.stderr}")
        out = done.stdout
        found = re.search(r"Throughput: ([0-9.]+) infer/sec", out)
        p50 = re.search(r"p50 latency: ([0-9]+) usec", out)
        p99 = re.search(r"p99 latency: ([0-9]+) usec", out)
        print(
            f"| {model} | {float(found.group(1)) if found else 0:,.0f} | "
            f"{int(p50.group(1)) if p50 else 0:,} | {int(p99.group(1)) if p99 else 0:,} | "
            f"{cpu / max(n, 1) * 1e6:,.0f} |"
        )
        commands.append(" ".join(["$PERF_ANALYZER", *cmd[1:]]))
    print("\nCommands (the server's port varies):\n")
    for command in commands:
        print(f"    {command}")


def key_cost() -> None:
    view = ResponseCache(1 << 20).for_model("m", 1)
    print("\n### Cache key (BLAKE2b-128 over the request's bytes, in process)\n")
    print("| input | µs per key | GB/s |")
    print("| --- | ---: | ---: |")
    for size in (64, 2 * 1024, 600 * 1024, 64 << 20):
        x = {"INPUT0": np.ones(size // 4, np.float32)}
        outs = [("OUTPUT0", 0)]
        reps = max(3, min(2000, (256 << 20) // max(size, 1)))
        t0 = time.perf_counter()
        for _ in range(reps):
            view.key(x, outs)
        per = (time.perf_counter() - t0) / reps
        print(f"| {size:,} bytes | {per * 1e6:,.1f} | {size / per / 1e9:.2f} |")
    cache = ResponseCache(64 << 20)
    result = {"OUTPUT0": np.ones((1, 10), np.float32)}
    keys = [i.to_bytes(16, "little") for i in range(20000)]
    t0 = time.perf_counter()
    for k in keys:
        cache.put(k, ("m", 1), result)
    put = (time.perf_counter() - t0) / len(keys)
    t0 = time.perf_counter()
    for k in keys:
        cache.get(k)
    get = (time.perf_counter() - t0) / len(keys)
    print(f"\nStore a [1,10] FP32 result: {put * 1e6:.1f} µs; look one up: {get * 1e6:.2f} µs.")


def build(root: Path) -> None:
    for name in ("digits", "digits_pre", "digits_topk", "digits_pipeline"):
        build_models.BUILDERS[name](root)
    build_models.build_mlp(root, "mlp")
    build_models.build_mlp(root, "mlp_nocache")
    for name in ("mlp", "mlp_nocache"):  # one instance each: the comparison is per request
        cfg = root / name / "config.pbtxt"
        text = cfg.read_text() + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        if name == "mlp":
            text += "response_cache { enable: true }\n"
        cfg.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    key_cost()
    with tempfile.TemporaryDirectory(prefix="ens-cache-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        with Server([repo], Path(tmp) / "server", "--cache-config=local,size=67108864") as server:
            ensemble_vs_steps(server.url, server.pid, args.requests, args.rounds)
            hit_vs_miss(server.url, server.pid, args.requests, args.rounds)
            pa = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
            if pa:
                perf_analyzer(pa, server.url, server.pid)
            else:
                print("\n(perf_analyzer not found: set $PERF_ANALYZER for its view)")


if __name__ == "__main__":
    main()
