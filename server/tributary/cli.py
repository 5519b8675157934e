"""`tributary` command line: tritonserver's flag spellings and defaults (PROTOCOL.md §5).

It only parses and validates into a `ServerOptions`; app.py builds everything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .options import INT32_MAX, ServerOptions

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _nonneg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a value >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _nonneg(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be <= 65535, got {value}")
    return value


def _positive(text: str) -> int:
    value = _nonneg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a value >= 1, got 0")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, then exit 2
        sys.stderr.write(f"tributary: error: {message} (see tributary --help)\n")
        raise SystemExit(2)


def _flag(group: argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
    """Triton-style boolean: `--x`, `--x=true`, `--x=false`."""
    group.add_argument(
        name,
        type=_bool,
        nargs="?",
        const=True,
        default=default,
        metavar="BOOL",
        help=f"{help} (default: {str(default).lower()})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tributary",
        description="Serve ONNX models from a Triton-style model repository over the KServe v2 "
        "gRPC protocol with Triton's extensions.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"tributary {__version__}")
    m = p.add_argument_group("model repository")
    m.add_argument(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
        help="model repository path (repeatable)",
    )
    m.add_argument(
        "--model-control-mode",
        choices=["none", "poll", "explicit"],
        default="none",
        help="none: load every model at start-up (default). explicit: load only the "
        "--load-model models, then load/unload through RepositoryModelLoad/Unload. poll is "
        "not implemented and is refused",
    )
    m.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="model to load at start-up (repeatable; explicit mode only; '*' = every model, "
        "and then the only one)",
    )
    m.add_argument(
        "--model-config-name", metavar="NAME", help="use <model>/configs/NAME.pbtxt where present"
    )
    m.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        help="do not complete configs from the ONNX graph",
    )
    _flag(m, "--strict-model-config", False, "deprecated: true disables auto-complete")
    m.add_argument(
        "--backend-config",
        action="append",
        default=[],
        metavar="BACKEND,KEY=VALUE",
        help="e.g. onnxruntime,default-max-batch-size=4",
    )
    m.add_argument("--model-load-thread-count", type=_positive, default=4, metavar="N")
    s = p.add_argument_group("server")
    s.add_argument(
        "--id",
        dest="server_id",
        default="tributary",
        help="server name reported by ServerMetadata (default: tributary; "
        "use 'triton' for clients that check it)",
    )
    _flag(s, "--strict-readiness", True, "ready only when every model is READY")
    _flag(s, "--exit-on-error", True, "exit if any model fails to load at start-up")
    s.add_argument(
        "--exit-timeout-secs",
        type=_nonneg,
        default=30,
        metavar="SECS",
        help="time to finish in-flight work on shutdown (default: 30)",
    )
    s.add_argument("--log-verbose", type=_nonneg, default=0, metavar="LEVEL")
    s.add_argument(
        "--max-tensor-bytes",
        type=_positive,
        default=INT32_MAX,
        metavar="BYTES",
        help="refuse input tensors whose shape implies more bytes (default: 2^31-1)",
    )
    s.add_argument(
        "--port-file",
        type=Path,
        metavar="PATH",
        help="write the bound ports as JSON here once serving ('-' = stdout)",
    )
    g = p.add_argument_group("gRPC")
    g.add_argument("--grpc-address", default="0.0.0.0")
    g.add_argument("--grpc-port", type=_port, default=8001, help="0 picks a free port")
    g.add_argument(
        "--grpc-worker-threads",
        type=_positive,
        default=128,
        metavar="N",
        help="gRPC handler threads for unary RPCs (default: 128); streams have their own",
    )
    g.add_argument(
        "--grpc-max-streams",
        type=_positive,
        default=512,
        metavar="N",
        help="open ModelStreamInfer streams allowed at once; more get RESOURCE_EXHAUSTED "
        "(default: 512)",
    )
    g.add_argument(
        "--grpc-stream-max-pending",
        type=_positive,
        default=256,
        metavar="N",
        help="replies a stream may have unsent before the server stops reading its "
        "requests (default: 256)",
    )
    g.add_argument(
        "--grpc-max-message-size",
        type=_positive,
        default=INT32_MAX,
        metavar="BYTES",
        help="max send/receive message size (default: 2^31-1)",
    )
    _flag(g, "--reuse-grpc-port", False, "allow several servers on one port (SO_REUSEPORT)")
    _flag(
        g,
        "--allow-grpc-reflection",
        True,
        "serve gRPC server reflection (grpc.reflection.v1 and v1alpha) for grpcurl and Postman",
    )
    _flag(g, "--grpc-use-ssl", False, "serve TLS")
    _flag(g, "--grpc-use-ssl-mutual", False, "require client certificates")
    g.add_argument("--grpc-server-cert", type=Path, metavar="PEM")
    g.add_argument("--grpc-server-key", type=Path, metavar="PEM")
    g.add_argument("--grpc-root-cert", type=Path, metavar="PEM")
    g.add_argument(
        "--grpc-infer-response-compression-level",
        choices=["none", "low", "medium", "high"],
        default="none",
    )
    g.add_argument("--grpc-keepalive-time", type=_nonneg, default=7_200_000, metavar="MS")
    g.add_argument("--grpc-keepalive-timeout", type=_nonneg, default=20_000, metavar="MS")
    _flag(g, "--grpc-keepalive-permit-without-calls", False, "allow keepalive pings when idle")
    g.add_argument("--grpc-http2-max-pings-without-data", type=_nonneg, default=2, metavar="N")
    g.add_argument(
        "--grpc-http2-min-recv-ping-interval-without-data",
        type=_nonneg,
        default=300_000,
        metavar="MS",
    )
    g.add_argument("--grpc-http2-max-ping-strikes", type=_nonneg, default=2, metavar="N")
    x = p.add_argument_group("metrics")
    _flag(x, "--allow-metrics", True, "serve Prometheus metrics")
    _flag(x, "--allow-cpu-metrics", True, "CPU utilisation and memory gauges")
    _flag(x, "--allow-gpu-metrics", True, "GPU gauges (where GPUs exist)")
    x.add_argument("--metrics-address", default="0.0.0.0")
    x.add_argument("--metrics-port", type=_port, default=8002, help="0 picks a free port")
    x.add_argument("--metrics-interval-ms", type=_positive, default=2000, metavar="MS")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.model_control_mode == "poll":
        parser.error("--model-control-mode=poll is not implemented; use 'none' or 'explicit'")
    if a.load_model and a.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode=explicit")
    if "*" in a.load_model and len(a.load_model) > 1:
        parser.error("--load-model=* loads every model and must be the only --load-model")
    if "" in a.load_model:
        parser.error("--load-model needs a model name")
    if (a.grpc_use_ssl or a.grpc_use_ssl_mutual) and not (a.grpc_server_cert and a.grpc_server_key):
        parser.error("--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key")
    if a.grpc_use_ssl_mutual and not a.grpc_root_cert:
        parser.error("--grpc-use-ssl-mutual needs --grpc-root-cert")
    for path in a.model_repository:
        if not path.is_dir():
            parser.error(f"model repository '{path}' is not a directory")
    default_mbs = 4
    for entry in a.backend_config:
        backend, _, setting = entry.partition(",")
        key, eq, value = setting.partition("=")
        if backend != "onnxruntime" or not eq:
            parser.error(f"--backend-config '{entry}': expected onnxruntime,<key>=<value>")
        if key == "default-max-batch-size":
            default_mbs = _nonneg(value)
        else:
            parser.error(f"--backend-config: unknown onnxruntime setting '{key}'")
    return ServerOptions(
        model_repositories=list(a.model_repository),
        model_control_mode=a.model_control_mode,
        load_models=list(a.load_model),
        model_config_name=a.model_config_name,
        auto_complete_config=not (a.disable_auto_complete_config or a.strict_model_config),
        default_max_batch_size=default_mbs,
        strict_readiness=a.strict_readiness,
        exit_on_error=a.exit_on_error,
        exit_timeout_secs=float(a.exit_timeout_secs),
        server_id=a.server_id,
        log_verbose=a.log_verbose,
        model_load_thread_count=a.model_load_thread_count,
        grpc_address=a.grpc_address,
        grpc_port=a.grpc_port,
        grpc_worker_threads=a.grpc_worker_threads,
        grpc_max_streams=a.grpc_max_streams,
        grpc_stream_max_pending=a.grpc_stream_max_pending,
        grpc_max_message_bytes=a.grpc_max_message_size,
        reuse_grpc_port=a.reuse_grpc_port,
        allow_grpc_reflection=a.allow_grpc_reflection,
        grpc_use_ssl=a.grpc_use_ssl or a.grpc_use_ssl_mutual,
        grpc_use_ssl_mutual=a.grpc_use_ssl_mutual,
        grpc_server_cert=a.grpc_server_cert,
        grpc_server_key=a.grpc_server_key,
        grpc_root_cert=a.grpc_root_cert,
        grpc_keepalive_time_ms=a.grpc_keepalive_time,
        grpc_keepalive_timeout_ms=a.grpc_keepalive_timeout,
        grpc_keepalive_permit_without_calls=a.grpc_keepalive_permit_without_calls,
        grpc_http2_max_pings_without_data=a.grpc_http2_max_pings_without_data,
        grpc_http2_min_recv_ping_interval_without_data_ms=(
            a.grpc_http2_min_recv_ping_interval_without_data
        ),
        grpc_http2_max_ping_strikes=a.grpc_http2_max_ping_strikes,
        grpc_infer_response_compression_level=a.grpc_infer_response_compression_level,
        max_tensor_bytes=a.max_tensor_bytes,
        allow_metrics=a.allow_metrics,
        allow_cpu_metrics=a.allow_cpu_metrics,
        allow_gpu_metrics=a.allow_gpu_metrics,
        metrics_address=a.metrics_address,
        metrics_port=a.metrics_port,
        metrics_interval_ms=a.metrics_interval_ms,
        port_file=a.port_file,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    from .logs import grpc_core_verbosity

    grpc_core_verbosity(options.log_verbose)  # must precede the first `import grpc`
    from .app import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
