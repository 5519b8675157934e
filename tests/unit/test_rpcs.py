"""tributary.rpcs pieces that need no server."""

from __future__ import annotations


def test_health_watchers_leave_no_entry_behind() -> None:
    """grpcio's HealthServicer kept an empty set per watched service name forever."""
    from grpc_health.v1 import health_pb2

    from tributary.rpcs import HealthService

    class Context:
        def __init__(self) -> None:
            self.callbacks: list = []

        def add_callback(self, fn) -> bool:
            self.callbacks.append(fn)
            return True

    svc = HealthService()
    sent: list = []
    contexts = []
    for i in range(50):
        ctx = Context()
        svc.Watch(health_pb2.HealthCheckRequest(service=f"svc-{i}"), ctx, sent.append)
        contexts.append(ctx)
    assert svc.watched_services() == 50
    for ctx in contexts:
        for fn in ctx.callbacks:
            fn()
    assert svc.watched_services() == 0
