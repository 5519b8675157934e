"""Helpers for the SDK's end-to-end tests: inputs for `simple`, a refused port, an attempt
counter and a recording proxy that shows what actually crossed the wire."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np


def simple_inputs(batch: int = 1, offset: int = 0) -> dict[str, np.ndarray]:
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16) + offset
    return {"INPUT0": a, "INPUT1": np.full((batch, 16), 3, dtype=np.int32)}


@contextmanager
def refused_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts attempts on the wire (each retry is a new call) and keeps the last request."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.last_request: object = None

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls.append(client_call_details.method.rsplit("/", 1)[-1])
        self.last_request = request
        return continuation(client_call_details, request)


@dataclass(frozen=True)
class Seen:
    """One call as the proxy received it."""

    method: str
    headers: dict[str, str | bytes]
    time_remaining: float | None


class RecordingProxy(grpc.GenericRpcHandler):
    """A real gRPC server in front of a real Tributary: forwards every call's bytes unchanged
    and records the method, the metadata and the deadline the client sent. `delays` maps a
    unary method's short name to seconds to wait before forwarding it (a slow server)."""

    def __init__(self, target: str) -> None:
        self.seen: list[Seen] = []
        self.delays: dict[str, float] = {}
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(target)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((self,))
        self.url = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        headers = {key: value for key, value in context.invocation_metadata()}
        with self._lock:
            self.seen.append(Seen(method.rsplit("/", 1)[-1], headers, context.time_remaining()))

    def last(self, method: str) -> Seen:
        with self._lock:
            return [s for s in self.seen if s.method == method][-1]

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method.endswith("/ModelStreamInfer"):

            def stream(requests, context):
                self._record(method, context)
                yield from self._upstream.stream_stream(method)(requests)

            return grpc.stream_stream_rpc_method_handler(stream)

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._record(method, context)
            time.sleep(self.delays.get(method.rsplit("/", 1)[-1], 0.0))
            try:
                return self._upstream.unary_unary(method)(request, timeout=30)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(unary)

    def close(self) -> None:
        self._server.stop(grace=None)
        self._upstream.close()
