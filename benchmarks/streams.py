"""Open streams vs everyone else: unary and health latency with N idle streams, and SIGTERM.

For each N in --streams (default 0 and 300): start a server, open N ModelStreamInfer streams
and prove each is served (one `simple` request answered), leave them idle, then time
--calls calls each of ServerLive, ModelInfer (`simple`, [1,16]) and grpc.health.v1 Check on a
separate channel: p50, p99, max. Then, with 20 idle streams open (and a 30 s exit timeout),
time SIGTERM to process exit. The target (issue "hardening"): with 300 idle streams all three
RPCs answer within 100 ms, and exit takes a second or two, not the exit timeout.

    python benchmarks/streams.py
    python benchmarks/streams.py --streams 0,300,500 --calls 500
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import ROOT, Server  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def simple_request(rid: str = "") -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="simple", id=rid)
    for name in ("INPUT0", "INPUT1"):
        r.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        r.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    return r


class IdleStream:
    def __init__(self, channel: grpc.Channel, rid: str) -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.q.put(simple_request(rid))
        call = channel.stream_stream(
            STREAM,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self.call = call(self._feed())

    def _feed(self) -> Iterator[pb.ModelInferRequest]:
        while (r := self.q.get()) is not None:
            yield r

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()


def open_streams(channel: grpc.Channel, n: int) -> list[IdleStream]:
    streams = [IdleStream(channel, str(i)) for i in range(n)]
    for i, s in enumerate(streams):
        reply = next(s.call)
        assert reply.infer_response.id == str(i) and not reply.error_message, reply
    return streams


def timings(call: Callable[[], object], n: int) -> tuple[float, float, float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    a = np.array(out)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def measure(channel: grpc.Channel, calls: int) -> list[tuple[str, float, float, float]]:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    req = simple_request()
    rpcs = {
        "ServerLive": lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=10),
        "ModelInfer": lambda: stub.ModelInfer(req, timeout=10),
        "health Check": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
    }
    out = []
    for name, call in rpcs.items():
        call()  # warm
        out.append((name, *timings(call, calls)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--streams", default="0,300")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--shutdown-streams", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tributary-streams-"))
    rows = []
    for n in [int(x) for x in args.streams.split(",")]:
        with Server([ROOT / "model_repository"], work / f"s{n}") as srv:
            held = grpc.insecure_channel(srv.url)
            streams = open_streams(held, n)
            probe = grpc.insecure_channel(srv.url)
            rows += [(n, *row) for row in measure(probe, args.calls)]
            for s in streams:
                s.close()
            probe.close()
            held.close()
    print(f"# Idle streams vs unary and health latency ({args.calls} calls each)\n")
    print("| open idle streams | RPC | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for n, name, p50, p99, mx in rows:
        print(f"| {n} | {name} | {p50:.2f} | {p99:.2f} | {mx:.2f} |")

    srv = Server([ROOT / "model_repository"], work / "sigterm", "--exit-timeout-secs", "30")
    channel = grpc.insecure_channel(srv.url)
    streams = open_streams(channel, args.shutdown_streams)
    t0 = time.monotonic()
    code = srv.stop(timeout=60)
    took = time.monotonic() - t0
    ended = 0
    for s in streams:
        try:
            next(s.call)
        except grpc.RpcError as err:
            ended += err.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    print(
        f"\nSIGTERM with {args.shutdown_streams} idle streams open (--exit-timeout-secs 30): "
        f"exit code {code} after {took:.2f}s; {ended} streams ended with UNAVAILABLE"
    )


if __name__ == "__main__":
    main()
