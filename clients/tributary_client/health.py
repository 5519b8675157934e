"""`tributary-health [HOST:PORT]`: exit 0 when grpc.health.v1 Check says SERVING, else 1.

For container HEALTHCHECKs and exec probes where a native Kubernetes gRPC probe is not used.
It speaks plaintext by default; `--tls` (implied by `--ca`, `--cert`/`--key`) follows a server
started with --grpc-use-ssl or --grpc-use-ssl-mutual. Usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from ._options import TLSConfig
from ._proto import health_pb2, health_pb2_grpc


def check(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    *,
    tls: TLSConfig | None = None,
) -> bool:
    """True when `service` ("" = the whole server) reports SERVING; the reason goes to stderr."""
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        options = []
        if tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", tls.server_name_override))
        channel = grpc.secure_channel(target, tls.credentials(), options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            print(f"health check failed: {code}: {details}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"status: {status}")
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tributary-health", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("target", nargs="?", default="localhost:8001", help="HOST:PORT")
    parser.add_argument("--service", default="", help='service name ("" = whole server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS (system root CAs unless --ca)")
    tls.add_argument("--ca", metavar="FILE", help="PEM root certificate(s) to trust")
    tls.add_argument("--cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    tls.add_argument("--key", metavar="FILE", help="PEM client private key (mutual TLS)")
    tls.add_argument(
        "--server-name",
        metavar="NAME",
        help="check the server certificate against NAME instead of the target's host",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if (a.cert is None) != (a.key is None):
        parser.error("--cert and --key go together")
    if a.timeout <= 0:
        parser.error("--timeout must be > 0")
    use_tls = a.tls or any(x is not None for x in (a.ca, a.cert, a.key, a.server_name))
    tls = None
    if use_tls:
        try:
            tls = TLSConfig.from_files(a.ca, a.key, a.cert, server_name_override=a.server_name)
        except OSError as exc:
            parser.error(f"cannot read {exc.filename}: {exc.strerror}")
    return 0 if check(a.target, a.service, a.timeout, tls=tls) else 1


if __name__ == "__main__":
    sys.exit(main())
