"""Reloads under traffic: does any request fail while poll mode swaps versions and configs?

Starts a poll-mode server (`--repository-poll-secs`, default 1) over a temporary repository
holding `simple` (dynamic batching, `version_policy latest 2`), sends `simple` requests for
version "" from --concurrency threads (raw stubs), and every --period seconds changes the
repository, in turn:

    add        copy the newest version directory to version N+1 (N+1 loads, N-1 unloads)
    config     rewrite config.pbtxt with another max_queue_delay_microseconds (every version
               reloads beside the running ones)
    remove     delete the oldest version directory (already unloaded by the policy: a no-op
               swap that must not disturb anything)

After each change it waits (polling RepositoryIndex / ModelConfig, with a deadline) until the
server shows it, and the span from the change to that moment, plus 250 ms, is a "swap window".
It reports failed requests (the target is 0, with the first few errors), the total, and p50/p99
latency overall, inside swap windows and outside them.

    python benchmarks/reload.py                 # 60 s, concurrency 16
    python benchmarks/reload.py --seconds 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import build_models as bm  # noqa: E402
from rss import Server  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

SWAP_TAIL_S = 0.25


def config_text(delay_us: int) -> str:
    return (
        bm.simple_config("simple")
        + "version_policy { latest { num_versions: 2 } }\n"
        + f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    )


def request() -> bytes:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name="simple", model_version="")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(a.tobytes())
    return req.SerializeToString()


class Load:
    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.samples: list[list[tuple[float, float]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, i: int) -> None:
        data = request()
        out = self.samples[i]
        with grpc.insecure_channel(self.url) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=None,
                response_deserializer=None,
            )
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    call(data, timeout=30)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                out.append((start, time.monotonic() - start))


def wait_until(predicate, deadline_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--poll-secs", type=int, default=1)
    p.add_argument("--period", type=float, default=1.0, help="seconds between changes")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    repo = work / "models"
    bm.build_simple(repo, "simple", config=config_text(100), versions=(1, 2))
    server = Server(
        [repo],
        work / "server",
        "--model-control-mode=poll",
        f"--repository-poll-secs={a.poll_secs}",
    )
    channel = grpc.insecure_channel(server.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def ready_versions() -> set[int]:
        reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
        return {int(m.version) for m in reply.models if m.name == "simple"}

    def delay() -> int:
        reply = stub.ModelConfig(pb.ModelConfigRequest(name="simple"))
        return int(reply.config.dynamic_batching.max_queue_delay_microseconds)

    load = Load(server.url, a.concurrency)
    for t in load.threads:
        t.start()
    windows: list[tuple[float, float]] = []
    applied: list[float] = []
    missed = 0
    newest, oldest, step, delay_us = 2, 1, 0, 100
    begin = time.monotonic()
    try:
        while time.monotonic() - begin < a.seconds:
            tick = time.monotonic()
            kind = ("add", "config", "remove")[step % 3]
            step += 1
            if kind == "add":
                shutil.copytree(repo / "simple" / str(newest), repo / "simple" / str(newest + 1))
                newest += 1
                want = {newest - 1, newest}
                ok = wait_until(lambda w=want: ready_versions() == w)  # type: ignore[misc]
            elif kind == "config":
                delay_us = 100 + (step * 37) % 900
                tmp = repo / "simple" / ".config.pbtxt.tmp"
                tmp.write_text(config_text(delay_us))
                tmp.replace(repo / "simple" / "config.pbtxt")
                ok = wait_until(lambda d=delay_us: delay() == d)  # type: ignore[misc]
            else:
                victims = [v for v in range(oldest, newest - 1)]
                for v in victims:
                    shutil.rmtree(repo / "simple" / str(v), ignore_errors=True)
                oldest = newest - 1
                ok = True
            done = time.monotonic()
            if kind != "remove":
                windows.append((tick, done + SWAP_TAIL_S))
                applied.append(done - tick)
                missed += not ok
            rest = a.period - (time.monotonic() - tick)
            if rest > 0:
                time.sleep(rest)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(60)
        elapsed = time.monotonic() - begin
        channel.close()
        code = server.stop()

    samples = [s for per in load.samples for s in per]

    def inside(t: float) -> bool:
        return any(lo <= t <= hi for lo, hi in windows)

    swap = np.array([d for t, d in samples if inside(t)]) * 1e3
    calm = np.array([d for t, d in samples if not inside(t)]) * 1e3
    every = np.array([d for _, d in samples]) * 1e3

    def pct(x: np.ndarray, q: float) -> str:
        return f"{np.percentile(x, q):.1f}" if len(x) else "-"

    print(
        f"duration {elapsed:.1f}s, concurrency {a.concurrency}, poll every {a.poll_secs}s, "
        f"a change every {a.period}s; server exit status {code}"
    )
    print(
        f"swaps (add or config): {len(applied)} (not seen within 30 s: {missed}); "
        f"change -> visible: median {np.median(applied) * 1e3:.0f} ms, "
        f"max {max(applied) * 1e3:.0f} ms"
        if applied
        else "no changes applied"
    )
    print(
        f"requests: {len(samples) + len(load.errors)} total, {len(load.errors)} failed, "
        f"{len(samples) / elapsed:.0f}/s"
    )
    print("| requests | count | p50 (ms) | p99 (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for label, x in (("all", every), ("during swaps", swap), ("outside swaps", calm)):
        print(f"| {label} | {len(x):,} | {pct(x, 50)} | {pct(x, 99)} |")
    for e in sorted(set(load.errors))[:5]:
        print(f"error: {e} (x{load.errors.count(e)})")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if load.errors or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
