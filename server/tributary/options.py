"""ServerOptions: every setting the CLI parses, with tritonserver's defaults where it has one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .traceconfig import TraceConfig

if TYPE_CHECKING:
    from .restrict import Restriction

from .constants import (
    DEFAULT_CLIENT_SHM_MAX_BYTES,
    DEFAULT_HTTP_MAX_CONNECTIONS,
    DEFAULT_HTTP_MAX_INPUT_SIZE,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_STREAM_MAX_PENDING,
    INT32_MAX,
)


@dataclass
class ServerOptions:
    model_repositories: list[Path] = field(default_factory=list)
    model_control_mode: str = "none"
    repository_poll_secs: int = 15
    load_models: list[str] = field(default_factory=list)
    model_config_name: str | None = None
    auto_complete_config: bool = True
    default_max_batch_size: int = 4
    strict_readiness: bool = True
    exit_on_error: bool = True
    exit_timeout_secs: float = 30.0
    server_id: str = "tributary"
    model_load_thread_count: int = 4
    model_load_retry_count: int = 0
    # logging (tributary.logs)
    log_verbose: int = 0
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_format: str = "default"  # default, ISO8601 or json
    log_file: Path | None = None
    # HTTP/REST (tributary.http)
    allow_http: bool = True
    http_address: str = "0.0.0.0"
    http_port: int = 8000
    reuse_http_port: bool = False
    http_thread_count: int = 1
    http_max_input_size: int = DEFAULT_HTTP_MAX_INPUT_SIZE
    http_max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS
    # --http-restricted-api: {category: the header it requires} (tributary.restrict)
    http_restricted_apis: dict[str, Restriction] = field(default_factory=dict)
    # gRPC
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    grpc_worker_threads: int = 128
    grpc_max_streams: int = DEFAULT_MAX_STREAMS
    grpc_stream_max_pending: int = DEFAULT_STREAM_MAX_PENDING
    grpc_max_message_bytes: int = INT32_MAX
    reuse_grpc_port: bool = False
    allow_grpc_reflection: bool = True
    grpc_use_ssl: bool = False
    grpc_use_ssl_mutual: bool = False
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    grpc_keepalive_time_ms: int = 7_200_000
    grpc_keepalive_timeout_ms: int = 20_000
    grpc_keepalive_permit_without_calls: bool = False
    grpc_http2_max_pings_without_data: int = 2
    grpc_http2_min_recv_ping_interval_without_data_ms: int = 300_000
    grpc_http2_max_ping_strikes: int = 2
    grpc_max_connection_age_ms: int | None = None
    grpc_max_connection_age_grace_ms: int | None = None
    grpc_infer_response_compression_level: str = "none"
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    # --grpc-restricted-protocol: {category: the header it requires} (tributary.restrict)
    grpc_restricted_protocols: dict[str, Restriction] = field(default_factory=dict)
    allow_client_shm: bool = False
    client_shm_max_bytes: int = DEFAULT_CLIENT_SHM_MAX_BYTES
    client_shm_key_prefix: str | None = None  # an object name's start, without a leading "/"
    # metrics
    allow_metrics: bool = True
    allow_cpu_metrics: bool = True
    allow_gpu_metrics: bool = True
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002
    metrics_interval_ms: int = 2000
    # --cache-config local,size=N: the response cache's bytes (0 = no cache)
    cache_bytes: int = 0
    # tracing (--trace-config and the deprecated --trace-* flags; tributary.tracing)
    trace: TraceConfig = field(default_factory=TraceConfig)
    # where to announce bound ports (tests and scripts read it; "-" = stdout)
    port_file: Path | None = None
    # one line each, logged at start-up: flags accepted and ignored (tributary.flags)
    warnings: list[str] = field(default_factory=list)
