"""Render run.py's results (benchmarks/out/results.json) as its section of RESULTS.md.

RESULTS.md holds sections written by several scripts (shm, reload, ...). run.py owns only the
text between BEGIN and END below; `replace_section` swaps that and keeps everything else, so a
`make bench` never destroys another script's numbers.

    python benchmarks/results_md.py benchmarks/out/results.json   # print the section
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- run.py section: begin (rewritten by benchmarks/run.py) -->"
END = "<!-- run.py section: end -->"
TITLE = "# Benchmark results"
ORDER = ["floor", "inline", "tributary", "kserve", "mlserver", "pytriton"]
NAMES = {
    "floor": "echo floor (sync grpcio, 16 threads, no model)",
    "inline": "inline server (same + session.run per request)",
    "tributary": "Tributary",
    "kserve": "KServe ModelServer (grpc.aio, no batching)",
    "mlserver": "MLServer (adaptive batching)",
    "pytriton": "Triton via PyTriton (dynamic batching)",
}
PEERS = ["kserve", "mlserver", "pytriton"]
PEER_PACKAGE = {"kserve": "kserve", "mlserver": "mlserver", "pytriton": "nvidia-pytriton"}


def replace_section(text: str, section: str) -> str:
    """`text` with run.py's section replaced by `section` (added after the title if absent)."""
    block = f"{BEGIN}\n\n{section.strip()}\n\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    if text.startswith(TITLE):
        return f"{TITLE}\n\n{block}\n" + text[len(TITLE) :]
    return f"{TITLE}\n\n{block}\n\n{text}"


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def _cell(res: dict[str, Any], server: str, key: str) -> dict[str, Any] | None:
    cell = res["servers"].get(server, {}).get("cells", {}).get(key)
    return cell if cell and "error" not in cell else None


def _label(key: str) -> str:
    model, _, rest = key.partition("-")
    parts = rest.split("-")
    b = f" -b {parts[0][1:]}" if len(parts) == 2 else ""
    return f"{model}{b} c={parts[-1][1:]}"


def _table(
    res: dict[str, Any], keys: list[str], value: Any, servers: list[str] | None = None
) -> list[str]:
    lines = [
        "| server | " + " | ".join(_label(k) for k in keys) + " |",
        "| --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for server in servers or [s for s in ORDER if s in res["servers"]]:
        row = []
        for key in keys:
            cell = _cell(res, server, key)
            if cell is not None:
                row.append(value(cell))
            else:
                err = res["servers"].get(server, {}).get("cells", {}).get(key, {}).get("error")
                row.append("failed" if err else "–")
        lines.append(f"| {NAMES[server]} | " + " | ".join(row) + " |")
    return lines


def machine_limit(res: dict[str, Any], key: str) -> float | None:
    """1 / (1/floor rows/s + 1/in-process batch-64 rows/s): every row pays both on one machine."""
    floor = _cell(res, "floor", key)
    inproc = {int(k): v for k, v in res["inproc"].items()}
    if floor is None or 64 not in inproc:
        return None
    return 1 / (1 / floor["infer_per_s"] + 1 / inproc[64]["rows_per_s"])


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each of the issue's targets this run can judge."""
    out: list[tuple[str, str, bool]] = []
    trib = lambda k: _cell(res, "tributary", k)  # noqa: E731
    floor = lambda k: _cell(res, "floor", k)  # noqa: E731
    inline = lambda k: _cell(res, "inline", k)  # noqa: E731
    t, f = trib("simple-c8"), floor("simple-c8")
    if t and f:
        r = t["infer_per_s"] / f["infer_per_s"]
        out.append(("simple c=8 ≥ 0.85 × floor", f"{r:.2f} ×", r >= 0.85))
    t, i = trib("mlp-c1"), inline("mlp-c1")
    if t and i:
        r = t["p50_us"] / i["p50_us"]
        out.append(("mlp c=1 p50 ≤ 1.1 × inline", f"{r:.2f} ×", r <= 1.1))
        r = t["infer_per_s"] / i["infer_per_s"]
        out.append(("mlp c=1 throughput ≥ 0.9 × inline", f"{r:.2f} ×", r >= 0.9))
    t, i = trib("mlp_ortdefault-c1"), inline("mlp-c1")
    if t and i:  # the batcher's own cost: same session options as the inline server
        r = t["p50_us"] / i["p50_us"]
        out.append(("mlp c=1, inline's ORT options: p50 ≤ 1.1 × inline", f"{r:.2f} ×", r <= 1.1))
        r = t["infer_per_s"] / i["infer_per_s"]
        out.append(
            ("mlp c=1, inline's ORT options: throughput ≥ 0.9 × inline", f"{r:.2f} ×", r >= 0.9)
        )
    for key in ("mlp-c32", "mlp-c64", "mlp-b8-c16"):
        t, i, limit = trib(key), inline(key), machine_limit(res, key)
        if t and i and key != "mlp-b8-c16":
            r = t["infer_per_s"] / i["infer_per_s"]
            out.append((f"{_label(key)} ≥ 1.3 × inline", f"{r:.2f} ×", r >= 1.3))
        if t and limit:
            r = t["infer_per_s"] / limit
            out.append(
                (f"{_label(key)} ≥ 0.85 × machine limit ({limit:,.0f}/s)", f"{r:.2f} ×", r >= 0.85)
            )
    for key in res["cases"]:
        t = trib(key)
        peers = {p: _cell(res, p, key) for p in PEERS if _cell(res, p, key)}
        if t and peers:
            best = max(peers, key=lambda p: peers[p]["infer_per_s"])  # type: ignore[index]
            r = t["infer_per_s"] / peers[best]["infer_per_s"]  # type: ignore[index]
            out.append((f"{_label(key)}: lead every peer (best: {best})", f"{r:.2f} ×", r > 1.0))
    return out


def render(res: dict[str, Any], command: str, note: str | None = None) -> str:
    m = res["machine"]
    keys = [k for k in res["cases"]]
    served = [s for s in ORDER if s in res["servers"]]
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items())
    lines = ["## Side by side: floor, inline server, Tributary and peers (`benchmarks/run.py`)", ""]
    if note:
        lines += [f"**{note}**", ""]
    lines += [
        f"Command: `{command}`; perf_analyzer flags: `{' '.join(res['pa_flags'])}`. Every "
        "server runs alone in its own process, one after another, in this one run.",
        f"Machine: {m['cpus']} CPU(s), {m['cpu']}, Python {m['python']}; client and server "
        f"share the cores (1-minute load average {m['load_before']:.1f} before, "
        f"{m.get('load_after', 0):.1f} after).",
        f"Ours: {versions}.",
        "",
        "### Peers",
        "",
        "| peer | versions (exact pins: `benchmarks/peers/<name>.txt`) | installed | serves "
        "| correct | measured |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for peer in PEERS:
        status = res["peers"].get(peer)
        if status is None:
            continue
        entry = res["servers"].get(peer, {})
        err = entry.get("error", "")
        vers = ", ".join(f"{k} {v}" for k, v in status.get("versions", {}).items())
        installed = "yes" if status["ok"] else f"no: {status.get('why', '')}"
        serves = "no: " + err if err.startswith("did not start") else "yes"
        check = entry.get("check")
        correct = (
            "–"
            if check is None
            else f"yes (max abs diff {check['max_abs_diff']:.1g})"
            if check["ok"]
            else f"no: {check['why']}"
        )
        cells = entry.get("cells", {})
        good = sum(1 for c in cells.values() if "error" not in c)
        measured = f"{good}/{len(cells)} cells" if cells else "no"
        if not status["ok"]:
            serves = correct = measured = "–"
        lines.append(
            f"| {NAMES[peer]} | {vers} | {installed} | {serves} | {correct} | {measured} |"
        )
    for server in served:
        err = res["servers"][server].get("error")
        if err and server not in PEERS:
            lines += ["", f"{NAMES[server]}: {err}"]
    inproc = {int(k): v for k, v in res["inproc"].items()}
    lines += [
        "",
        "### In-process ONNX Runtime, `mlp` (default session options)",
        "",
        "| batch | " + " | ".join(str(b) for b in sorted(inproc)) + " |",
        "| --- | " + " | ".join("---:" for _ in inproc) + " |",
        "| rows/s | "
        + " | ".join(f"{inproc[b]['rows_per_s']:,.0f}" for b in sorted(inproc))
        + " |",
        "| p50 per run (µs) | "
        + " | ".join(f"{inproc[b]['p50_us']:,.0f}" for b in sorted(inproc))
        + " |",
        "",
        "### Throughput, infer/s (rows/s)",
        "",
        *_table(res, keys, lambda c: f"{c['infer_per_s']:,.0f}"),
    ]
    limits = {k: machine_limit(res, k) for k in keys if k.startswith("mlp")}
    if any(limits.values()):
        lines.append(
            "| machine limit: 1/(1/floor + 1/in-process batch-64 rows/s) | "
            + " | ".join(f"{limits[k]:,.0f}" if limits.get(k) else "–" for k in keys)
            + " |"
        )
    lines += [
        "",
        "### Latency, p50 / p99 (µs)",
        "",
        *_table(res, keys, lambda c: f"{c['p50_us']:,.0f} / {c['p99_us']:,.0f}"),
        "",
        "### Server CPU per request (µs, user+system of the server and every process it started)",
        "",
        *_table(
            res,
            keys,
            lambda c: (
                f"{c['cpu_us_per_request']:,.0f}"
                + ("" if c["requests_from"] == "server statistics" else " ≈")
            ),
        ),
        "",
        "Requests are counted from the server's ModelStatistics where it has them (floor and "
        "inline count too); ≈ marks servers without them (KServe, MLServer): perf_analyzer's "
        "rate × the run's wall time, which counts its idle start-up too (a few % low).",
    ]
    extra = res["servers"].get("tributary", {}).get("cells", {})
    for prefix, title in (
        ("mlp_nobatch", "Tributary on `mlp_nobatch` (the same graph without dynamic batching):"),
        (
            "mlp_ortdefault",
            "Tributary on `mlp_ortdefault` (the batched mlp with the inline server's ONNX "
            "Runtime options: a thread per core, spinning):",
        ),
    ):
        cells = [(k, c) for k, c in extra.items() if k.startswith(prefix) and "error" not in c]
        if not cells:
            continue
        lines += ["", title, ""]
        for key, c in cells:
            lines.append(
                f"- {_label(key)}: {c['infer_per_s']:,.0f} infer/s, p50 {c['p50_us']:,.0f} µs, "
                f"{c['cpu_us_per_request']:,.0f} server CPU µs/request."
            )
    if "big-c8" in keys:
        lines += [
            "",
            "### Large tensors: `big`, FP32 [3,224,224] in and out (602,112 bytes each way), c=8",
            "",
            "The floor parses and builds its messages with the generated protobuf classes, which"
            " copy the payload each way; a server that avoids those copies can beat it here.",
            "",
            "| server | MB/s in (= out) | vs floor |",
            "| --- | ---: | ---: |",
        ]
        floor = _cell(res, "floor", "big-c8")
        for server in served:
            cell = _cell(res, server, "big-c8")
            if cell:
                ratio = f"{cell['infer_per_s'] / floor['infer_per_s']:.2f} ×" if floor else "–"
                lines.append(f"| {NAMES[server]} | {cell['payload_mb_per_s']:,.0f} | {ratio} |")
    lines += [
        "",
        "### Executed batch sizes (from ModelStatistics: size × executions)",
        "",
    ]
    for server in ("tributary", "pytriton"):
        for key, cell in res["servers"].get(server, {}).get("cells", {}).items():
            if cell.get("batches"):
                dist = ", ".join(f"{k}×{v}" for k, v in cell["batches"].items())
                lines.append(
                    f"- {NAMES[server]}, {_label(key)}: mean {cell['mean_batch']:.1f}; {dist}"
                )
    lines += [
        "",
        "### Targets (issue #12; ratios within this run)",
        "",
        "| target | measured | status |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {v} | {_ok(ok)} |" for t, v, ok in targets(res)]
    lines += [
        "",
        "Why targets are missed, the profiles and what would move them: "
        "[ANALYSIS.md](ANALYSIS.md).",
    ]
    rss = res["servers"].get("tributary", {}).get("idle_rss_mib")
    if rss:
        lines += ["", f"Tributary RSS with this repository loaded, before traffic: {rss:.0f} MiB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    print(render(data, "python benchmarks/results_md.py"))
