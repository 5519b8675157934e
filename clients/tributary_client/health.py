"""`tributary-health HOST:PORT`: exit 0 when grpc.health.v1 Check says SERVING, else 1.

For container HEALTHCHECKs and exec probes where a native Kubernetes gRPC probe is not used.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"status: {status}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    parser = argparse.ArgumentParser(prog="tributary-health", description=__doc__)
    parser.add_argument("target", nargs="?", default="localhost:8001")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=2.0)
    a = parser.parse_args()
    return 0 if check(a.target, a.service, a.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
