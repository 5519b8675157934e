"""`tributary` command line: tritonserver's flags, spellings and defaults (docs/flags.md).

The parser is built from the table in `tributary.flags`, which says for every tritonserver flag
whether it is implemented, accepted and ignored (one warning line at start-up), or refused.
This module only parses and validates into a `ServerOptions`; app.py builds everything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from . import flags
from .options import ServerOptions
from .restrict import by_category
from .traceconfig import TRITON, TraceConfig, parse_config

DEFAULT_MAX_BATCH_SIZE = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, then exit 2
        sys.stderr.write(f"tributary: error: {message} (see tributary --help)\n")
        raise SystemExit(2)


def _help(flag: flags.Flag) -> str:
    """The flag's help, with the table's verdict in brackets unless it simply works."""
    text = flag.help
    if flag.status != flags.IMPLEMENTED or flag.rule is not None:
        text += f" [{flag.verdict()}]"
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tributary",
        usage="tributary --model-repository PATH [flags]",
        description="Serve ONNX models from a Triton-style model repository over the KServe v2 "
        "gRPC protocol with Triton's extensions. Takes tritonserver's flags: each one is "
        "implemented, accepted and ignored with a warning, or refused, as said in [brackets] "
        "below and in docs/flags.md.",
        allow_abbrev=False,
        add_help=False,
    )
    groups = {name: p.add_argument_group(name) for name in flags.GROUPS}
    for flag in flags.FLAGS:
        groups[flag.group].add_argument(*flag.names, help=_help(flag), **flag.kwargs)
    return p


def _backend_config(entries: list[str], parser: argparse.ArgumentParser) -> tuple[int, list[str]]:
    """default-max-batch-size and the warnings for settings that configure nothing here."""
    default_mbs = DEFAULT_MAX_BATCH_SIZE
    ignored: list[str] = []
    for entry in entries:
        head, eq, value = entry.partition("=")
        backend, comma, key = head.rpartition(",")
        if not eq or not key or not value or (comma and not backend):
            parser.error(f"--backend-config '{entry}': expected [<backend>,]<setting>=<value>")
        if backend not in ("", "onnxruntime"):
            ignored.append(f"--backend-config={entry} (backend '{backend}' is not available)")
        elif key == "default-max-batch-size":
            try:
                default_mbs = flags.nonneg(value)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"--backend-config '{entry}': {exc}")
        elif backend == "onnxruntime" and key in flags.ORT_THREAD_SETTINGS:
            ignored.append(f"--backend-config={entry} (ONNX Runtime's threads keep their defaults)")
        elif backend == "onnxruntime":
            parser.error(f"--backend-config: unknown onnxruntime setting '{key}'")
        else:
            ignored.append(f"--backend-config={entry} (not a setting Tributary has)")
    warnings = [f"ignoring {', '.join(ignored)}"] if ignored else []
    return default_mbs, warnings


MAX_PEM_BYTES = 1024 * 1024


MAX_CACHE_BYTES = 1 << 40
"""`size=` above this (1 TiB) is refused at start-up rather than promised."""


@dataclass(frozen=True)
class CacheConfig:
    """The parsed --cache-config: only the `local` cache exists here."""

    size: int


def parse_cache_config(settings: Iterable[str], legacy_size: int | None) -> CacheConfig | None:
    """`--cache-config local,size=N` (repeatable) and the deprecated
    `--response-cache-byte-size=N`. Texts follow tritonserver's for the cases it refuses."""
    entries = list(settings)
    if entries and legacy_size is not None:
        raise ValueError(
            "Incompatible flags --response-cache-byte-size and --cache-config both provided. "
            "Please provide one or the other."
        )
    if legacy_size is not None:
        return CacheConfig(_cache_size(str(legacy_size))) if legacy_size > 0 else None
    if not entries:
        return None
    caches: dict[str, dict[str, str]] = {}
    for entry in entries:
        cache, sep, setting = entry.partition(",")
        key, eq, value = setting.partition("=")
        if not sep or not eq or not cache or not key:
            raise ValueError(
                f"--cache-config option format is '<cache name>,<setting>=<value>'. Got {entry}"
            )
        caches.setdefault(cache, {})[key] = value
    if len(caches) > 1:
        raise ValueError(
            "found multiple cache configurations, but only one cache may be configured: "
            + ", ".join(sorted(caches))
        )
    ((cache, values),) = caches.items()
    if cache != "local":
        raise ValueError(
            f"cache '{cache}' is not available: only the 'local' cache (in server memory) is "
            "implemented"
        )
    unknown = sorted(set(values) - {"size"})
    if unknown:
        raise ValueError(f"unknown setting(s) for the local cache: {', '.join(unknown)}")
    if "size" not in values:
        raise ValueError("the local cache needs its size: --cache-config local,size=<bytes>")
    size = _cache_size(values["size"])
    return CacheConfig(size) if size > 0 else None


def _cache_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"cache size must be a number of bytes, got '{text[:64]}'") from None
    if size < 0 or size > MAX_CACHE_BYTES:
        raise ValueError(f"cache size must be between 0 and {MAX_CACHE_BYTES} bytes, got {size}")
    return size


def _pem_problem(path: Path) -> str | None:
    """Why a TLS file cannot be used, checked before any model loads; None when it looks
    like PEM. (gRPC itself only finds out when the port is bound, and then says "failed to
    bind", which points at the wrong thing.)"""
    try:
        if not path.is_file():
            return "not a readable file"
        if path.stat().st_size > MAX_PEM_BYTES:
            return f"larger than {MAX_PEM_BYTES} bytes, not a certificate or key"
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if b"-----BEGIN " not in data:
        return "not PEM (no '-----BEGIN' line)"
    return None


def _trace_config(a: argparse.Namespace, parser: argparse.ArgumentParser) -> TraceConfig:
    try:
        config = parse_config(
            a.trace_config,
            file=a.trace_file,
            levels=a.trace_level,
            rate=a.trace_rate,
            count=a.trace_count,
            log_frequency=a.trace_log_frequency,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if config.mode == TRITON and config.file:
        target = Path(config.file)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            parser.error(f"trace file '{target}': not a file in a writable directory")
    return config


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    parser = build_parser()
    a = parser.parse_args(argv)
    refusal, warnings = flags.review(a)
    if refusal:
        parser.error(refusal)
    if a.load_model and a.model_control_mode != "explicit":
        parser.error("--load-model needs --model-control-mode=explicit")
    if "*" in a.load_model and len(a.load_model) > 1:
        parser.error("--load-model=* loads every model and must be the only --load-model")
    if "" in a.load_model:
        parser.error("--load-model needs a model name")
    if a.model_config_name == "":
        parser.error("--model-config-name needs a name")
    if (a.grpc_use_ssl or a.grpc_use_ssl_mutual) and not (a.grpc_server_cert and a.grpc_server_key):
        parser.error("--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key")
    if a.grpc_use_ssl_mutual and not a.grpc_root_cert:
        parser.error("--grpc-use-ssl-mutual needs --grpc-root-cert")
    for path in a.model_repository:
        if not path.is_dir():
            parser.error(f"model repository '{path}' is not a directory")
    for flag, target in (("--log-file", a.log_file), ("--port-file", a.port_file)):
        if target is None or str(target) == "-":
            continue
        folder = target.parent
        if target.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"{flag} '{target}': not a file in a writable directory")
    if a.grpc_use_ssl or a.grpc_use_ssl_mutual:
        for flag, pem in (
            ("--grpc-server-cert", a.grpc_server_cert),
            ("--grpc-server-key", a.grpc_server_key),
            ("--grpc-root-cert", a.grpc_root_cert),
        ):
            if pem is not None:
                problem = _pem_problem(pem)
                if problem:
                    parser.error(f"{flag} '{pem}': {problem}")
    default_mbs, backend_warnings = _backend_config(a.backend_config, parser)
    try:
        restricted = by_category(a.grpc_restricted_protocol or ())
    except ValueError as exc:
        parser.error(f"--grpc-restricted-protocol: {exc}")
    try:
        http_restricted = by_category(a.http_restricted_api or ())
    except ValueError as exc:
        parser.error(f"--http-restricted-api: {exc}")
    try:
        cache = parse_cache_config(a.cache_config or (), a.response_cache_byte_size)
    except ValueError as exc:
        parser.error(str(exc))
    trace = _trace_config(a, parser)
    warnings += trace.warnings
    if a.strict_model_config:
        warnings.append(
            "--strict-model-config is deprecated (as in tritonserver): "
            "use --disable-auto-complete-config"
        )
    return ServerOptions(
        model_repositories=list(a.model_repository),
        model_control_mode=a.model_control_mode,
        repository_poll_secs=a.repository_poll_secs,
        load_models=list(a.load_model),
        model_config_name=a.model_config_name,
        auto_complete_config=not (a.disable_auto_complete_config or a.strict_model_config),
        default_max_batch_size=default_mbs,
        strict_readiness=a.strict_readiness,
        exit_on_error=a.exit_on_error,
        exit_timeout_secs=float(a.exit_timeout_secs),
        server_id=a.server_id,
        model_load_thread_count=a.model_load_thread_count,
        model_load_retry_count=a.model_load_retry_count,
        log_verbose=a.log_verbose,
        log_info=a.log_info,
        log_warning=a.log_warning,
        log_error=a.log_error,
        log_format=a.log_format,
        log_file=a.log_file,
        allow_http=a.allow_http,
        http_address=a.http_address,
        http_port=a.http_port,
        reuse_http_port=a.reuse_http_port,
        http_thread_count=a.http_thread_count,
        http_max_input_size=a.http_max_input_size,
        http_max_connections=a.http_max_connections,
        http_restricted_apis=http_restricted,
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
        grpc_max_connection_age_ms=a.grpc_max_connection_age,
        grpc_max_connection_age_grace_ms=a.grpc_max_connection_age_grace,
        grpc_infer_response_compression_level=a.grpc_infer_response_compression_level,
        max_tensor_bytes=a.max_tensor_bytes,
        grpc_restricted_protocols=restricted,
        allow_client_shm=bool(a.allow_client_shm),
        client_shm_max_bytes=a.client_shm_max_bytes,
        client_shm_key_prefix=a.client_shm_key_prefix,
        allow_metrics=a.allow_metrics,
        allow_cpu_metrics=a.allow_cpu_metrics,
        allow_gpu_metrics=a.allow_gpu_metrics,
        metrics_address=a.metrics_address,
        metrics_port=a.metrics_port,
        metrics_interval_ms=a.metrics_interval_ms,
        port_file=a.port_file,
        cache_bytes=cache.size if cache is not None else 0,
        trace=trace,
        warnings=warnings + backend_warnings,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    from .logs import grpc_core_verbosity

    grpc_core_verbosity(options.log_verbose)  # must precede the first `import grpc`
    from .app import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
