"""`tributary-health [HOST:PORT]`: exit 0 when grpc.health.v1 Check says SERVING, else 1.

For container HEALTHCHECKs and exec probes where a native Kubernetes gRPC probe is not used.
It speaks plaintext by default; `--tls` (implied by `--ca`, `--cert`/`--key`) follows a server
started with --grpc-use-ssl or --grpc-use-ssl-mutual. Usage errors (a bad --timeout, a file
that is not the PEM it should be) exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc

from ._options import MAX_TIMEOUT, TLSConfig, check_timeout
from ._proto import health_pb2, health_pb2_grpc


def check(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    *,
    tls: TLSConfig | None = None,
) -> bool:
    """True when `service` ("" = the whole server) reports SERVING; the reason goes to stderr.

    A `timeout` that is not > 0 and finite raises ValueError (see `Client`'s timeout)."""
    seconds = check_timeout(timeout)
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
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=seconds)
        except grpc.RpcError as exc:
            code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            print(f"health check failed: {code}: {details}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"status: {status}")
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (a probe's log shows that line, not a usage screen)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _seconds(text: str) -> float:
    """--timeout: grpc turns 0, negative, NaN and huge deadlines into instant failures."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"must be seconds > 0 and at most {MAX_TIMEOUT:g}, not {text!r}"
        )
    return value


# What each TLS file must hold: one PEM block at least, of the right kind. grpc only parses
# them when it connects, and then reports a bad file as UNAVAILABLE among C-core log lines.
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.+?)\r?\n-----END \1-----", re.DOTALL)
_PEM_WANTED = {
    "--ca": ("CERTIFICATE", "certificate"),
    "--cert": ("CERTIFICATE", "certificate"),
    "--key": ("PRIVATE KEY", "private key"),
}


def _pem_problem(option: str, path: str, data: bytes) -> str | None:
    """Why `data` cannot be what `option` needs, or None when it looks right."""
    suffix, noun = _PEM_WANTED[option]
    blocks = [(m.group(1).decode(), m.group(2)) for m in _PEM_BLOCK.finditer(data)]
    if not blocks:
        return f"{option} {path}: not a PEM file (no -----BEGIN ...----- block)"
    for label, body in blocks:
        if option == "--key" and b":" in body:  # RFC 1421 headers: Proc-Type: 4,ENCRYPTED
            return f"{option} {path}: the {label} is encrypted; give an unencrypted one"
        try:
            base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error:
            return f"{option} {path}: its {label} block is not valid base64"
    labels = [label for label, _ in blocks]
    if not any(label.endswith(suffix) for label in labels):
        found = ", ".join(sorted(set(labels)))
        return f"{option} {path}: holds no PEM {noun}, only {found}"
    if option == "--key" and all(label.startswith("ENCRYPTED") for label in labels):
        return f"{option} {path}: the private key is encrypted; give an unencrypted one"
    return None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tributary-health", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("target", nargs="?", default="localhost:8001", help="HOST:PORT")
    parser.add_argument("--service", default="", help='service name ("" = whole server)')
    parser.add_argument("--timeout", type=_seconds, default=2.0, help="seconds (default 2)")
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
    use_tls = a.tls or any(x is not None for x in (a.ca, a.cert, a.key, a.server_name))
    tls = None
    if use_tls:
        try:
            tls = TLSConfig.from_files(a.ca, a.key, a.cert, server_name_override=a.server_name)
        except OSError as exc:
            parser.error(f"cannot read {exc.filename}: {exc.strerror}")
        files = (("--ca", a.ca, tls.root_certificates), ("--cert", a.cert, tls.certificate_chain))
        for option, path, data in (*files, ("--key", a.key, tls.private_key)):
            if data is not None and (problem := _pem_problem(option, path, data)):
                parser.error(problem)
    return 0 if check(a.target, a.service, a.timeout, tls=tls) else 1


if __name__ == "__main__":
    sys.exit(main())
