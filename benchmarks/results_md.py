"""Render benchmarks/out/results.json as benchmarks/RESULTS.md: tables, ratios, targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def render(res: dict, command: str, pa_flags: list[str]) -> str:
    m, inproc, floor, trib = res["machine"], res["inproc"], res["floor"], res["tributary"]
    inproc = {int(k): v for k, v in inproc.items()}
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}` (perf_analyzer flags: `{' '.join(pa_flags)}`).",
        f"Machine: {m['cpus']} CPU(s), {m['cpu']}, Python {m['python']}; client and server "
        "share the same cores. All numbers below come from one run.",
        "",
        "## In-process ONNX Runtime, `mlp` (default session options)",
        "",
        "| batch | rows/s | p50 per run (µs) |",
        "| ---: | ---: | ---: |",
    ]
    for b, r in sorted(inproc.items()):
        lines.append(f"| {b} | {r['rows_per_s']:,.0f} | {r['p50_us']:,.0f} |")
    lines += [
        "",
        "## Served (perf_analyzer, gRPC)",
        "",
        "| server | model | -b | c | infer/s | p50 (µs) | p99 (µs) | mean batch "
        "| server CPU µs/inference |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in floor.items():
        model, c = key.rsplit("-c", 1)
        lines.append(
            f"| echo floor | {model} | 1 | {c} | {r['infer_per_s']:,.0f} | "
            f"{r['p50_us']:,.0f} | {r['p99_us']:,.0f} | | |"
        )
    for key, r in trib.items():
        parts = key.split("-")
        model, c = parts[0], parts[-1][1:]
        b = parts[1][1:] if len(parts) == 3 else "1"
        lines.append(
            f"| tributary | {model} | {b} | {c} | {r['infer_per_s']:,.0f} | "
            f"{r['p50_us']:,.0f} | {r['p99_us']:,.0f} | {r.get('mean_batch', 0):.1f} | "
            f"{r.get('cpu_us_per_inference', 0):,.0f} |"
        )
    lines += ["", "Server-side batch sizes (executions per batch size, from ModelStatistics):", ""]
    for key, r in trib.items():
        if r.get("batches"):
            dist = ", ".join(f"{k}×{v}" for k, v in r["batches"].items())
            lines.append(f"- {key}: {dist}")
    lines += [
        "",
        "## Targets (ratios within this run)",
        "",
        "| target | measured | status |",
        "| --- | --- | --- |",
    ]
    for key in ("simple-c8", "mlp-c32", "mlp-c64"):
        if key in trib and key in floor:
            ratio = trib[key]["infer_per_s"] / floor[key]["infer_per_s"]
            lines.append(f"| {key} ≥ 0.85 × floor | {ratio:.2f} × | {_ok(ratio >= 0.85)} |")
    if "mlp-c1" in trib and "mlp-c1" in floor:
        budget = 1.3 * (floor["mlp-c1"]["p50_us"] + inproc[1]["p50_us"])
        p50 = trib["mlp-c1"]["p50_us"]
        lines.append(
            f"| mlp c=1 p50 ≤ 1.3 × (floor p50 + in-process batch-1) = {budget:,.0f} µs "
            f"| {p50:,.0f} µs | {_ok(p50 <= budget)} |"
        )
    if "mlp-b8-c16" in trib:
        ratio = trib["mlp-b8-c16"]["infer_per_s"] / inproc[64]["rows_per_s"]
        lines.append(
            f"| mlp -b 8 c=16 ≥ 0.6 × in-process rows/s at batch 64 | {ratio:.2f} × | "
            f"{_ok(ratio >= 0.6)} |"
        )
    if "mlp-c32" in trib and "mlp_nobatch-c32" in trib:
        a = trib["mlp-c32"]["cpu_us_per_inference"]
        b = trib["mlp_nobatch-c32"]["cpu_us_per_inference"]
        lines.append(
            f"| server CPU/inference with batching < without (c=32) | {a:,.0f} vs "
            f"{b:,.0f} µs | {_ok(a < b)} |"
        )
    lines += [
        "",
        "Why targets are missed, the profiles and what would move them: "
        "[ANALYSIS.md](ANALYSIS.md).",
    ]
    if "tributary_idle_rss_mib" in res:
        lines += [
            "",
            f"Tributary idle RSS with this repository loaded: "
            f"{res['tributary_idle_rss_mib']:.0f} MiB.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(render(data, "python benchmarks/results_md.py", []))
