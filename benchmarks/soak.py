"""Soak: minutes of mixed good and bad traffic against one server, watching its memory.

Starts `python -m tributary.cli` on model_repository/ (loopback, free ports), then drives it
for --minutes (or --seconds) at --concurrency threads, each with its own channel, each picking
per request (seeded, so a run is repeatable in mix if not in timing):

    simple         valid ModelInfer on `simple` (INT32 [b,16], b in 1..8)
    simple_string  valid ModelInfer on `simple_string` (BYTES)
    stream         one ModelStreamInfer with 1-4 requests: valid, garbage bytes, bad version
    malformed      undecodable bytes through ModelInfer
    cancelled      a request given up mid-flight: a 0.5-5 ms deadline, or future.cancel()
    bad_version    versions "2", "-1", "abc", 5,000 digits; an unknown model

The server's RSS is sampled every second. The report gives RSS at start/end/max, the
least-squares slope of RSS over time (KiB/min) and over requests served (KiB per 1,000
requests), over the whole run and over its second half (after allocator warm-up), and request
counts by kind and status code. A server that keeps memory per request shows a steady slope;
one that only warms up flattens in the second half.

    python benchmarks/soak.py                     # 2 minutes, concurrency 8
    python benchmarks/soak.py --seconds 20 --concurrency 4

Everything stays on 127.0.0.1, every RPC has a deadline, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Sampler, Server, rss_kib, slope  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
TIMEOUT = 10.0
KINDS = {
    "simple": 30,
    "simple_string": 15,
    "stream": 15,
    "malformed": 15,
    "cancelled": 10,
    "bad_version": 15,
}
BAD_VERSIONS = [("simple", "2"), ("simple", "-1"), ("simple", "abc"), ("simple", "9" * 5000)]
BAD_VERSIONS += [("no_such_model", ""), ("simple", "99999999999999999999")]


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def simple_bytes(rng: random.Random, version: str = "", model: str = "simple") -> bytes:
    batch = rng.randint(1, 8)
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="soak")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[batch, 16])
        request.raw_input_contents.append(
            np.full(batch * 16, rng.randint(-99, 99), "<i4").tobytes()
        )
    return request.SerializeToString()


def string_bytes(rng: random.Random) -> bytes:
    batch = rng.randint(1, 4)
    request = pb.ModelInferRequest(model_name="simple_string", id="soak-s")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="BYTES", shape=[batch, 16])
        values = [str(rng.randint(-9999, 9999)).encode() for _ in range(batch * 16)]
        request.raw_input_contents.append(_bytes_tensor(values))
    return request.SerializeToString()


def malformed_bytes(rng: random.Random) -> bytes:
    good = simple_bytes(rng)
    choice = rng.randrange(4)
    if choice == 0:  # truncated
        return good[: rng.randrange(1, len(good))]
    if choice == 1:  # a length prefix far past the end
        return good[:20] + b"\x3a\xff\xff\xff\xff\x07" + b"\0" * rng.randrange(16)
    if choice == 2:  # undefined wire type
        return good + bytes([0x3F]) + rng.randbytes(4)
    return rng.randbytes(rng.randrange(1, 200))


def bad_version_bytes(rng: random.Random) -> bytes:
    model, version = rng.choice(BAD_VERSIONS)
    return simple_bytes(rng, version=version, model=model)


class Soak:
    def __init__(self, url: str, concurrency: int, seconds: float, seed: int) -> None:
        self.url = url
        self.concurrency = concurrency
        self.deadline = time.monotonic() + seconds
        self.seed = seed
        self.counts: Counter[tuple[str, str]] = Counter()
        self.requests = 0
        self._lock = threading.Lock()

    def count(self, kind: str, code: str, requests: int = 1) -> None:
        with self._lock:
            self.counts[(kind, code)] += 1
            self.requests += requests

    def served(self) -> int:
        return self.requests

    def run(self) -> None:
        threads = [
            threading.Thread(target=self.worker, args=(i,), name=f"soak-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, self.deadline - time.monotonic()) + 4 * TIMEOUT)

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds, weights = list(KINDS), list(KINDS.values())
        options = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),  # one connection per worker
        ]
        with grpc.insecure_channel(self.url, options=options) as channel:
            infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            stream = channel.stream_stream(
                STREAM, request_serializer=None, response_deserializer=None
            )
            while time.monotonic() < self.deadline:
                kind = rng.choices(kinds, weights)[0]
                try:
                    self.one(kind, rng, infer, stream)
                except Exception as exc:  # noqa: BLE001 - a client-side surprise is a result too
                    self.count(kind, f"client:{type(exc).__name__}")

    def unary(self, kind: str, infer, payload: bytes) -> None:
        try:
            infer(payload, timeout=TIMEOUT)
            self.count(kind, "OK")
        except grpc.RpcError as err:
            self.count(kind, err.code().name)

    def one(self, kind: str, rng: random.Random, infer, stream) -> None:
        if kind == "simple":
            self.unary(kind, infer, simple_bytes(rng))
        elif kind == "simple_string":
            self.unary(kind, infer, string_bytes(rng))
        elif kind == "malformed":
            self.unary(kind, infer, malformed_bytes(rng))
        elif kind == "bad_version":
            self.unary(kind, infer, bad_version_bytes(rng))
        elif kind == "cancelled":
            payload = simple_bytes(rng)
            if rng.random() < 0.5:
                future = infer.future(payload, timeout=rng.uniform(0.0005, 0.005))
            else:
                future = infer.future(payload, timeout=TIMEOUT)
                time.sleep(rng.uniform(0, 0.002))
                future.cancel()
            try:
                future.result()
                self.count(kind, "OK")
            except grpc.FutureCancelledError:
                self.count(kind, "CANCELLED")
            except grpc.RpcError as err:
                self.count(kind, err.code().name)
        elif kind == "stream":
            makers = [simple_bytes, string_bytes, malformed_bytes, bad_version_bytes]
            payloads = [rng.choice(makers)(rng) for _ in range(rng.randint(1, 4))]
            replies = 0
            try:
                for raw in stream(iter(payloads), timeout=TIMEOUT):
                    replies += 1
                    reply = pb.ModelStreamInferResponse.FromString(raw)
                    self.count("stream_reply", "error_message" if reply.error_message else "OK", 0)
                self.count(kind, "OK" if replies == len(payloads) else "OK_missing_replies")
            except grpc.RpcError as err:
                self.count(kind, err.code().name)
            with self._lock:
                self.requests += len(payloads)


def fit(samples: list[tuple[float, int, int]]) -> dict[str, float]:
    if len(samples) < 2:
        return {"kib_per_min": 0.0, "kib_per_1k_requests": 0.0}
    t0 = samples[0][0]
    minutes = [(t - t0) / 60 for t, _, _ in samples]
    rss = [float(r) for _, r, _ in samples]
    served = [float(n) for _, _, n in samples]
    return {
        "kib_per_min": slope(minutes, rss),
        "kib_per_1k_requests": slope(served, rss) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seconds", type=float, help="overrides --minutes")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("server_args", nargs="*", help="extra tributary flags (after --)")
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else a.minutes * 60

    workdir = Path(tempfile.mkdtemp(prefix="tributary-soak-"))
    with Server([a.model_repository], workdir, *a.server_args) as server:
        warm = random.Random(-1)
        with grpc.insecure_channel(server.url) as channel:  # load code paths before measuring
            infer = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
            for _ in range(20):
                infer(simple_bytes(warm), timeout=TIMEOUT)
                infer(string_bytes(warm), timeout=TIMEOUT)
        soak = Soak(server.url, a.concurrency, seconds, a.seed)
        sampler = Sampler(server.pid, 1.0, soak.served).start()
        started = time.monotonic()
        soak.run()
        elapsed = time.monotonic() - started
        samples = sampler.stop()
        alive = server.alive()
        end_rss = rss_kib(server.pid) if alive else 0
        tracebacks = server.log().count("Traceback")
        command = " ".join(server.command)

    half = [s for s in samples if s[0] >= samples[0][0] + (samples[-1][0] - samples[0][0]) / 2]
    whole, second = fit(samples), fit(half)
    rss = [r for _, r, _ in samples]
    result = {
        "seconds": round(elapsed, 1),
        "concurrency": a.concurrency,
        "requests": soak.requests,
        "requests_per_s": round(soak.requests / elapsed, 1),
        "rss_start_kib": rss[0],
        "rss_end_kib": end_rss,
        "rss_max_kib": max(rss),
        "slope_all": whole,
        "slope_second_half": second,
        "server_alive": alive,
        "server_log_tracebacks": tracebacks,
        "counts": {f"{k}:{c}": n for (k, c), n in sorted(soak.counts.items())},
        "server_command": command,
    }

    mib = 1024
    print(f"# Soak: {elapsed:.0f} s, concurrency {a.concurrency}, seed {a.seed}\n")
    print(f"server: `{command}`\n")
    print("| metric | value |\n| --- | --- |")
    print(f"| requests (stream messages count one each) | {soak.requests} |")
    print(f"| requests/s | {soak.requests / elapsed:.0f} |")
    print(f"| RSS start / end / max (MiB) | {rss[0] / mib:.1f} / {end_rss / mib:.1f} / "
          f"{max(rss) / mib:.1f} |")  # fmt: skip
    for label, f in (("whole run", whole), ("second half", second)):
        print(f"| RSS slope, {label} (KiB/min) | {f['kib_per_min']:.1f} |")
        print(f"| RSS slope, {label} (KiB per 1,000 requests) | {f['kib_per_1k_requests']:.2f} |")
    print(f"| server alive at end | {alive} |")
    print(f"| tracebacks in server log | {tracebacks} |\n")
    print("| kind | status | count |\n| --- | --- | --- |")
    for (kind, code), n in sorted(soak.counts.items()):
        print(f"| {kind} | {code} | {n} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(f"\nserver log: {workdir / 'server.log'}", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
