"""Big requests: the server's peak memory per payload byte, and what a big request does to others.

For each payload size (default 64 MiB, 256 MiB, 1 GiB, skipping sizes this machine's free RAM
cannot hold), and for two cases:

    bytes      (with --cases bytes) one BYTES tensor of that size, 4-byte strings, through
               a string identity model: the element-wise decode/encode path
    accepted   one FP32 tensor of that size through an identity model (max_batch_size 0,
               dims [-1]), built into a temporary repository next to model_repository/
    rejected   the same bytes, but a declared shape one element larger: INVALID_ARGUMENT

it starts a fresh server (so one size's allocations cannot hide in the next one's numbers),
warms it up, sets its VmHWM back to its current RSS (`clear_refs`; without that, the peak is
measured from the fresh process's own high-water mark and the report says so), sends the
request once, and reads:

    peak     VmHWM - baseline RSS: the most memory the request made the server hold
    held     RSS a moment after the answer - baseline RSS: what the request left behind

Then, on the same server, a second process sends small `simple` requests back to back: first
for --idle-seconds with nothing else going on, then while the big request is sent --repeats
times. p50 and max of those small requests, idle vs during, show how much one big request
holds up everyone else (the GIL, the gRPC threads, the CPU).

    python benchmarks/big_requests.py                       # 64M,256M,1G
    python benchmarks/big_requests.py --sizes 16M,64M

The request is serialized once in the client before timing starts, and sent as bytes, so the
numbers are the server's (on a small machine the client's receive still competes for CPU).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import (  # noqa: E402
    ROOT,
    Server,
    mem_available_kib,
    peak_kib,
    reset_peak,
    rss_kib,
)

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL = "big_identity"
STRINGS = "big_strings"
MiB = 1024 * 1024
# What a size costs this machine at most, in payloads: the client holds the request and the
# response (and briefly a second copy while building the request); the server a few copies.
CLIENT_COPIES, SERVER_COPIES = 3, 8
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(n: float) -> str:
    return f"{n / (1024 * MiB):g} GiB" if n >= 1024 * MiB else f"{n / MiB:g} MiB"


def build_repository(out: Path) -> Path:
    """OUTPUT0 = Identity(INPUT0), FP32, max_batch_size 0, dims [-1]."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_models
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        MODEL,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["n"])],
    )
    config = (
        f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
    )
    build_models.write_model(out, MODEL, build_models.make_model(graph), config)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        STRINGS,
        [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["n"])],
    )
    config = config.replace(MODEL, STRINGS).replace("TYPE_FP32", "TYPE_STRING")
    build_models.write_model(out, STRINGS, build_models.make_model(graph), config)
    return out


def bytes_request(nbytes: int) -> bytes:
    """A ModelInferRequest carrying `nbytes` of BYTES elements, each the 4-byte string 'abcd'."""
    elements = nbytes // 8
    head = pb.ModelInferRequest(model_name=STRINGS, id=f"strings-{nbytes}")
    head.inputs.add(name="INPUT0", datatype="BYTES", shape=[elements])
    prefix = head.SerializeToString() + b"\x3a" + _varint(elements * 8)
    one = np.frombuffer(b"\x04\x00\x00\x00abcd", dtype=np.uint64)
    return prefix + np.broadcast_to(one, (elements,)).tobytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def big_request(nbytes: int, declared_extra: int = 0) -> bytes:
    """A serialized ModelInferRequest carrying `nbytes` of FP32, built with one payload copy."""
    elements = nbytes // 4
    head = pb.ModelInferRequest(model_name=MODEL, id=f"big-{nbytes}")
    head.inputs.add(name="INPUT0", datatype="FP32", shape=[elements + declared_extra])
    prefix = head.SerializeToString() + b"\x3a" + _varint(elements * 4)  # raw_input_contents
    buf = bytearray(len(prefix) + elements * 4)
    buf[: len(prefix)] = prefix
    np.frombuffer(buf, np.float32, offset=len(prefix))[:] = 1.5
    return bytes(buf)


def small_request() -> bytes:
    request = pb.ModelInferRequest(model_name="simple", id="probe")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.arange(16, dtype="<i4").tobytes())
    return request.SerializeToString()


def probe(url: str, stop, conn) -> None:
    """(start, seconds, ok) of back-to-back small requests until told to stop."""
    payload = small_request()
    samples: list[tuple[float, float, bool]] = []
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        infer(payload, timeout=30)
        conn.send("ready")
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                infer(payload, timeout=60)
                ok = True
            except grpc.RpcError:
                ok = False
            samples.append((t0, time.monotonic() - t0, ok))
    conn.send(samples)


def window(samples, start: float, end: float) -> list[float]:
    return [s for t0, s, ok in samples if start <= t0 < end and ok]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def settle(pid: int, seconds: float = 3.0) -> int:
    """RSS once it stops falling (freed buffers returned), at most `seconds` later."""
    last = rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kib(pid)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def measure(repos: list[Path], workdir: Path, nbytes: int, case: str, a) -> dict:
    extra = 1 if case == "rejected" else 0
    payload = bytes_request(nbytes) if case == "bytes" else big_request(nbytes, extra)
    args = ["--grpc-max-message-size", str(2**31 - 1), "--max-tensor-bytes", str(2**31 - 1)]
    with Server(repos, workdir / f"{case}-{nbytes}", *args) as server:
        with grpc.insecure_channel(server.url, options=CHANNEL_OPTIONS) as channel:
            infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            for _ in range(3):  # warm up the model and the paths, not the allocator's big pools
                infer(big_request(4096), timeout=60)
                infer(small_request(), timeout=60)
            baseline = settle(server.pid)
            method = "clear_refs" if reset_peak(server.pid) else "fresh-process VmHWM"
            peak_before = peak_kib(server.pid)
            t0 = time.monotonic()
            try:
                reply = infer(payload, timeout=600)
                status, reply_len = "OK", len(reply)
                del reply
            except grpc.RpcError as err:
                status, reply_len = err.code().name, 0
            seconds = time.monotonic() - t0
            peak = peak_kib(server.pid) - peak_before
            held = settle(server.pid) - baseline

            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            parent, child = ctx.Pipe()
            worker = ctx.Process(target=probe, args=(server.url, stop, child), daemon=True)
            worker.start()
            if not parent.poll(60):
                raise RuntimeError("latency probe did not start")
            parent.recv()
            idle_start = time.monotonic()
            time.sleep(a.idle_seconds)
            busy_start = time.monotonic()
            for _ in range(a.repeats):
                try:
                    infer(payload, timeout=600)
                except grpc.RpcError:
                    pass
            busy_end = time.monotonic()
            stop.set()
            samples = parent.recv() if parent.poll(120) else []
            worker.join(30)
    idle = window(samples, idle_start, busy_start)
    busy = window(samples, busy_start, busy_end)
    return {
        "size": nbytes,
        "case": case,
        "status": status,
        "reply_bytes": reply_len,
        "seconds": seconds,
        "baseline_kib": baseline,
        "peak_kib": peak,
        "held_kib": held,
        "method": method,
        "idle_p50": pct(idle, 0.5),
        "idle_max": max(idle, default=float("nan")),
        "busy_p50": pct(busy, 0.5),
        "busy_max": max(busy, default=float("nan")),
        "busy_n": len(busy),
        "idle_n": len(idle),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64M,256M,1G", help="comma-separated, e.g. 16M,64M,1G")
    p.add_argument("--repeats", type=int, default=2, help="big requests during the probe")
    p.add_argument("--idle-seconds", type=float, default=2.0)
    p.add_argument("--cases", default="accepted,rejected")
    a = p.parse_args(argv)

    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    avail = mem_available_kib() * 1024
    budget = int(avail * 0.8)
    workdir = Path(tempfile.mkdtemp(prefix="tributary-big-"))
    repos = [build_repository(workdir / "repo"), ROOT / "model_repository"]
    rows = []
    for nbytes in sizes:
        need = nbytes * (CLIENT_COPIES + SERVER_COPIES)
        if need > budget or nbytes > 2**31 - 1 - 4096:
            print(
                f"skipping {human(nbytes)}: needs about {human(need)}, 80% of available RAM is "
                f"{human(budget)} (or over gRPC's 2 GiB message limit)",
                file=sys.stderr,
            )
            continue
        for case in a.cases.split(","):
            print(f"{human(nbytes)} {case} ...", file=sys.stderr, flush=True)
            rows.append(measure(repos, workdir, nbytes, case, a))

    print(f"# Big requests (available RAM at start: {human(avail)})\n")
    print(
        "Fresh server per size and case; peak = VmHWM - RSS after warm-up "
        f"(VmHWM reset with {rows[0]['method'] if rows else '?'}); held = RSS after the reply "
        "settles - the same baseline. Small-request latency: `simple` [1,16] back to back from "
        f"another process, {a.idle_seconds:g} s idle vs while the big request is sent "
        f"{a.repeats}x.\n"
    )
    print(
        "| payload | case | status | big req s | peak MiB | peak/payload | held MiB "
        "| small p50 ms idle / busy (x) | small max ms idle / busy (x) | n idle / busy |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak = r["peak_kib"] * 1024
        print(
            f"| {human(r['size'])} | {r['case']} | {r['status']} | {r['seconds']:.2f} "
            f"| {peak / MiB:.0f} | {peak / r['size']:.2f} | {r['held_kib'] / 1024:.0f} "
            f"| {r['idle_p50'] * 1e3:.2f} / {r['busy_p50'] * 1e3:.2f} "
            f"({r['busy_p50'] / r['idle_p50']:.1f}x) "
            f"| {r['idle_max'] * 1e3:.1f} / {r['busy_max'] * 1e3:.1f} "
            f"({r['busy_max'] / r['idle_max']:.1f}x) | {r['idle_n']} / {r['busy_n']} |"
        )
    print(f"\nserver logs and the identity model: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
