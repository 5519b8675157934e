"""What tracing costs: server CPU per `simple` request with tracing off, on, and off again, in
one server and one run.

The server starts with `--trace-config mode=opentelemetry` and level OFF, exporting to an
OTLP/gRPC receiver started here (opentelemetry-proto's TraceService stubs; it counts spans).
Each round sends --requests `simple` ModelInfer requests ([1,16] INT32) from --concurrency
client threads (raw stubs, a fresh W3C traceparent on every request, so the off path also
sees the header it ignores) in three phases: off, on (TraceSetting level=TIMESTAMPS, rate=1:
every request traced), off again; the TraceSetting RPC switches between them. The "on"
phase ends when the receiver holds all its spans (they are built and sent after the
replies), so their CPU is counted there. Server CPU (user+system from /proc) per request,
median of rounds per phase, and the ratios are printed.

    python benchmarks/tracing.py [--requests 4000] [--rounds 5] [--concurrency 8]

Tracing off against a build without tracing at all: `benchmarks/cpu_ab.py --b <checkout>`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_ab import INFER, cpu_seconds, request  # noqa: E402
from rss import ROOT, Server  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402

SETTINGS = "/inference.GRPCInferenceService/TraceSetting"
SPANS_PER_REQUEST = 3  # InferRequest, queue, compute


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts spans."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def Export(self, request, context):  # noqa: N802 - the RPC's name
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait(self, spans: int, timeout: float = 60.0) -> None:
        """Poll until `spans` spans have arrived (or `timeout` passed: reported at the end)."""
        deadline = time.monotonic() + timeout
        while self.spans < spans and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.stop(0)


def set_level(channel: grpc.Channel, level: str) -> None:
    call = channel.unary_unary(
        SETTINGS,
        request_serializer=pb.TraceSettingRequest.SerializeToString,
        response_deserializer=pb.TraceSettingResponse.FromString,
    )
    req = pb.TraceSettingRequest()
    req.settings["trace_level"].value.append(level)
    reply = call(req, timeout=10)
    assert list(reply.settings["trace_level"].value) == [level], reply


def drive(call, payload: bytes, requests: int, concurrency: int) -> None:
    """`requests` ModelInfer calls spread over `concurrency` threads, each sequential."""
    per = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def client(n: int) -> None:
        for _ in range(n):
            parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
            call(payload, timeout=30, metadata=(("traceparent", parent),))

    with futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, per))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    receiver = Receiver()
    work = Path(tempfile.mkdtemp(prefix="tributary-tracing-"))
    server = Server(
        [ROOT / "model_repository"],
        work,
        "--trace-config=mode=opentelemetry",
        "--trace-config=rate=1",
        f"--trace-config=opentelemetry,url=127.0.0.1:{receiver.port}",
        "--trace-config=opentelemetry,bsp_schedule_delay=100",
    )
    payload = request("simple")
    phases = ("off", "on", "off again")
    per: dict[str, list[float]] = {p: [] for p in phases}
    traced = 0
    try:
        channel = grpc.insecure_channel(server.url)
        call = channel.unary_unary(INFER)
        drive(call, payload, 500, args.concurrency)  # warm
        for _ in range(args.rounds):
            for phase in phases:
                set_level(channel, "TIMESTAMPS" if phase == "on" else "OFF")
                before = cpu_seconds(server.pid)
                drive(call, payload, args.requests, args.concurrency)
                if phase == "on":
                    # Spans are built and sent after the replies: their CPU counts here.
                    traced += args.requests
                    receiver.wait(traced * SPANS_PER_REQUEST)
                per[phase].append((cpu_seconds(server.pid) - before) / args.requests * 1e6)
    finally:
        server.stop()
        receiver.stop()
    med = {p: statistics.median(v) for p, v in per.items()}
    print(
        f"server CPU per `simple` request, c={args.concurrency} "
        f"(median of {args.rounds} rounds of {args.requests}; {os.cpu_count()} CPU(s)):"
    )
    for phase in phases:
        rounds = ", ".join(f"{x:.0f}" for x in per[phase])
        print(f"  tracing {phase:9s}: {med[phase]:.0f} us   (rounds: {rounds})")
    print(f"  on / off       = {med['on'] / med['off']:.2f}")
    print(f"  off again / off = {med['off again'] / med['off']:.2f}")
    print(f"  spans received: {receiver.spans} of {traced * SPANS_PER_REQUEST} expected")


if __name__ == "__main__":
    main()
