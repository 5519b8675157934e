"""Every tritonserver flag, and every flag of our own, in one table.

Each entry says what Tributary does with the flag:
- implemented: it does what tritonserver's flag does (some values may be refused, see below);
- ignored: accepted with its value checked, then one warning line at start-up; only flags
  whose absence is harmless to the user are here (a feature we do not serve whose flag only
  tunes it, or a knob of Triton's C++ internals);
- refused: the command line fails at once (exit 2) with one line saying why and what to use;
  for flags whose silent absence would mislead or expose something (for example a protocol
  restriction that would not be enforced);
- tributary: a flag of our own.
A rule can apply to some values only (`--allow-grpc=false` is refused,
`--allow-sagemaker=true` is refused). `cli.py` builds the parser from this table, `--help`
and the start-up warnings quote its reasons, and `docs/flags.md` carries its rendering
(`scripts/flags_doc.py`), so the three cannot disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .constants import (
    DEFAULT_CLIENT_SHM_MAX_BYTES,
    DEFAULT_HTTP_MAX_CONNECTIONS,
    DEFAULT_HTTP_MAX_INPUT_SIZE,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_STREAM_MAX_PENDING,
    INT32_MAX,
)
from .restrict import parse_http_restriction, parse_restriction

INT64_MAX = 2**63 - 1

IMPLEMENTED = "implemented"
IGNORED = "ignored"
REFUSED = "refused"
OURS = "tributary"

# -- value types (each error becomes one `tributary: error:` line and exit 2) -----------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _bounded(text: str, low: int, high: int) -> int:
    value = integer(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a value >= {low}, got {value}")
    if value > high:
        raise argparse.ArgumentTypeError(f"expected a value <= {high}, got {value}")
    return value


def nonneg(text: str) -> int:
    """A count, seconds or milliseconds: at most 2^31-1, as tritonserver parses them (int32).
    More would also overflow gRPC's C int channel options and Python's timed waits, each a
    traceback well after the flags were accepted."""
    return _bounded(text, 0, INT32_MAX)


def positive(text: str) -> int:
    return _bounded(text, 1, INT32_MAX)


def byte_count(text: str) -> int:
    """A size in bytes, which may pass 2^31-1 (shared memory is not bound by gRPC's limit)."""
    return _bounded(text, 1, INT64_MAX)


def port(text: str) -> int:
    value = nonneg(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be <= 65535, got {value}")
    return value


def verbosity(text: str) -> int:
    """Triton's --log-verbose: an integer level, or true (1) / false (0) as KServe passes it."""
    value = text.strip().lower()
    if value == "true":
        return 1
    if value == "false":
        return 0
    return nonneg(text)


def lower(*choices: str) -> Callable[[str], str]:
    """Case-insensitive choice (tritonserver lower-cases these), returned as spelled here."""
    by_key = {c.lower(): c for c in choices}

    def parse(text: str) -> str:
        found = by_key.get(text.strip().lower())
        if found is None:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got '{text}'")
        return found

    parse.__name__ = "choice"
    return parse


def setting(text: str) -> str:
    """`[<name>,]<setting>=<value>`, as tritonserver's repeatable config flags take."""
    if "=" not in text or text.startswith(("=", ",")):
        raise argparse.ArgumentTypeError(f"expected [<name>,]<setting>=<value>, got '{text}'")
    return text


def shm_prefix(text: str) -> str:
    """The start of a shared memory object's name (an optional leading "/" is dropped)."""
    name = text[1:] if text.startswith("/") else text
    if not name or "/" in name or "\0" in name or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise argparse.ArgumentTypeError(
            f"expected the start of a shared memory object name (no other '/'), got '{text}'"
        )
    return name


# -- the table ------------------------------------------------------------------------------


def _given(value: Any) -> bool:
    return value is not None


@dataclass(frozen=True)
class Rule:
    """What happens when a flag is given a value `applies` accepts: IGNORED (accepted, one
    warning line at start-up) or REFUSED (exit 2), and why. `values` names those values for
    --help and the docs ("" = any value)."""

    action: str
    why: str
    values: str = ""
    applies: Callable[[Any], bool] = _given


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    group: str
    help: str
    kind: str = IMPLEMENTED  # IMPLEMENTED or OURS; IGNORED/REFUSED come from an any-value rule
    rule: Rule | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.name[2:].replace("-", "_")

    @property
    def status(self) -> str:
        """The table's verdict on the flag as a whole."""
        if self.rule is not None and not self.rule.values:
            return self.rule.action
        return self.kind

    def verdict(self) -> str:
        """One sentence: what we do with this flag (docs and --help)."""
        rule = self.rule
        if rule is None:
            return "tributary's own flag" if self.kind == OURS else self.status
        action = "ignored, with a warning" if rule.action == IGNORED else "refused"
        if not rule.values:
            return f"{action}: {rule.why}"
        return f"{self.kind}; with {rule.values}: {action}: {rule.why}"


def _bool_flag(default: bool | None) -> dict[str, Any]:
    """Triton's boolean spelling: `--x=true`, `--x false`; a bare `--x` means true."""
    return {"type": boolean, "nargs": "?", "const": True, "default": default, "metavar": "BOOL"}


def _default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _impl(names: str | tuple[str, ...], group: str, help: str, **kw: Any) -> Flag:
    rule = kw.pop("rule", None)
    kind = kw.pop("kind", IMPLEMENTED)
    if isinstance(names, str):
        names = (names,)
    return Flag(names, group, help, kind, rule, kw)


def _ours(name: str, group: str, help: str, **kw: Any) -> Flag:
    return _impl(name, group, help, kind=OURS, **kw)


def _ignored(name: str, group: str, help: str, why: str, **kw: Any) -> Flag:
    kw.setdefault("default", None)
    return _impl(name, group, help, rule=Rule(IGNORED, why), **kw)


def _refused(name: str, group: str, help: str, why: str, **kw: Any) -> Flag:
    kw.setdefault("default", None)
    return _impl(name, group, help, rule=Rule(REFUSED, why), **kw)


SERVER = "Server"
LOGGING = "Logging"
REPOSITORY = "Model repository"
HTTP = "HTTP/REST"
GRPC = "gRPC"
SAGEMAKER = "SageMaker"
VERTEX = "Vertex AI"
METRICS = "Metrics"
TRACING = "Tracing"
CACHE = "Response cache"
RATE_LIMIT = "Rate limiter"
MEMORY = "Memory and devices"
SHM = "Shared memory"
BACKEND = "Backends and repository agents"
DEPRECATED = "Deprecated by tritonserver"

WHY_SAGEMAKER_OFF = "SageMaker's endpoints are not served, and --allow-sagemaker=true is refused"
WHY_VERTEX_OFF = "Vertex AI's endpoints are not served, and --allow-vertex-ai=true is refused"
WHY_POOLS = (
    "ONNX Runtime allocates host and device memory itself; there is no server memory pool to size"
)
WHY_GRPC_POOLS = "a tuning knob of Triton's C++ gRPC front end, which has no counterpart here"
WHY_RATE_LIMIT = (
    "there is no rate limiter: a request runs as soon as a model instance is free, as with "
    "--rate-limit=off"
)

FLAGS: tuple[Flag, ...] = (
    # -- server ------------------------------------------------------------------------------
    _impl(("--help", "-h"), SERVER, "print this help and exit", action="help"),
    _ours(
        "--version",
        SERVER,
        "print the version and exit",
        action="version",
        version=f"tributary {__version__}",
    ),
    _impl(
        "--id",
        SERVER,
        "server name that ServerMetadata reports (default: tributary, where tritonserver's is "
        "triton; pass --id=triton for clients that check it)",
        dest="server_id",
        default="tributary",
        metavar="NAME",
    ),
    _impl(
        "--exit-timeout-secs",
        SERVER,
        "on SIGTERM/SIGINT, how long in-flight requests may take to finish before the server "
        "exits anyway, with status 1 if work was still running (default: 30)",
        type=nonneg,
        default=30,
        metavar="SECS",
    ),
    _ours(
        "--max-tensor-bytes",
        SERVER,
        "refuse an input tensor whose shape implies more bytes than this, before allocating "
        "(default: 2^31-1)",
        type=byte_count,
        default=DEFAULT_MAX_TENSOR_BYTES,
        metavar="BYTES",
    ),
    _ours(
        "--port-file",
        SERVER,
        "once serving, write the bound ports and pid as JSON to this file ('-' = stdout); "
        "for scripts and tests that bind port 0",
        type=Path,
        default=None,
        metavar="PATH",
    ),
    # -- logging -----------------------------------------------------------------------------
    _impl(
        "--log-verbose",
        LOGGING,
        "verbose level: 0 (default) is off; 1 adds a line per request (RPC, model, version, "
        "request id, status, microseconds); 2 adds libraries' debug lines and gRPC core's "
        "info messages, 3 gRPC core's debug messages. true/false mean 1/0",
        type=verbosity,
        default=0,
        metavar="LEVEL",
    ),
    _impl("--log-info", LOGGING, "print info messages", **_bool_flag(True)),
    _impl("--log-warning", LOGGING, "print warnings", **_bool_flag(True)),
    _impl("--log-error", LOGGING, "print errors", **_bool_flag(True)),
    _impl(
        "--log-format",
        LOGGING,
        "default: tritonserver's line 'I1201 17:05:06.123456 <pid> <logger>:<line>] "
        "message' (UTC); ISO8601: the same with a '2024-12-01T17:05:06Z I' head; json "
        "(ours): one JSON object per line with time, level, logger, message and, where "
        "known, model and request_id",
        type=lower("default", "ISO8601", "json"),
        default="default",
        metavar="{default,ISO8601,json}",
    ),
    _impl(
        "--log-file",
        LOGGING,
        "append log lines to this file instead of stderr (native gRPC core and ONNX Runtime "
        "messages still go to stderr)",
        type=Path,
        default=None,
        metavar="PATH",
    ),
    # -- model repository --------------------------------------------------------------------
    _impl(
        ("--model-repository", "--model-store"),
        REPOSITORY,
        "model repository directory (repeatable; a model name may appear in only one)",
        dest="model_repository",
        action="append",
        type=Path,
        required=True,
        metavar="PATH",
    ),
    _impl(
        "--exit-on-error",
        REPOSITORY,
        "exit when a start-up model fails to load",
        **_bool_flag(True),
    ),
    _impl(
        "--disable-auto-complete-config",
        REPOSITORY,
        "do not complete model configs from the ONNX graph: every config must be complete",
        action="store_true",
    ),
    _impl(
        "--strict-readiness",
        REPOSITORY,
        "ready only while every model is ready and at least one is loaded (tritonserver is "
        "also ready with none loaded, e.g. explicit mode before a load); false: ready "
        "whenever the server answers",
        **_bool_flag(True),
    ),
    _impl(
        "--model-control-mode",
        REPOSITORY,
        "none (default): load every model at start-up, refuse load/unload requests. "
        "poll: like none at start-up, then re-scan the repository every "
        "--repository-poll-secs and load, reload or unload what changed. "
        "explicit: load only the --load-model models, then load/unload on request",
        type=lower("none", "poll", "explicit"),
        default="none",
        metavar="{none,poll,explicit}",
    ),
    _impl(
        "--repository-poll-secs",
        REPOSITORY,
        "seconds between repository scans in poll mode (default: 15; 0: never scan, as "
        "tritonserver); other modes ignore it, as tritonserver does",
        type=nonneg,
        default=15,
        metavar="SECS",
    ),
    _impl(
        "--load-model",
        REPOSITORY,
        "model to load at start-up in explicit mode (repeatable; '*' loads every model and "
        "must then be the only --load-model)",
        action="append",
        default=[],
        metavar="NAME",
    ),
    _impl(
        "--model-config-name",
        REPOSITORY,
        "use <model>/configs/NAME.pbtxt instead of config.pbtxt where it exists",
        metavar="NAME",
    ),
    _impl(
        "--model-load-thread-count",
        REPOSITORY,
        "models loaded in parallel (default: 4)",
        type=positive,
        default=4,
        metavar="N",
    ),
    _impl(
        "--model-load-retry-count",
        REPOSITORY,
        "times to retry loading a model version that failed to load (default: 0)",
        type=nonneg,
        default=0,
        metavar="N",
    ),
    _impl(
        "--model-namespacing",
        REPOSITORY,
        "serve models of the same name from different repositories side by side",
        **_bool_flag(False),
        rule=Rule(
            REFUSED,
            "model namespacing is not implemented (a name found in two repositories is a "
            "start-up error); give the models distinct names",
            values="true",
            applies=lambda v: v is True,
        ),
    ),
    _ignored(
        "--enable-peer-access",
        REPOSITORY,
        "let GPUs access each other's memory",
        "ONNX Runtime decides device-to-device copies itself",
        **_bool_flag(None),
    ),
    # -- HTTP/REST ---------------------------------------------------------------------------
    _impl(
        "--allow-http",
        HTTP,
        "serve HTTP/REST v2 on --http-port (default: true, as tritonserver)",
        **_bool_flag(True),
    ),
    _impl(
        "--http-address",
        HTTP,
        "HTTP bind address (default: 0.0.0.0)",
        default="0.0.0.0",
        metavar="ADDRESS",
    ),
    _impl(
        "--http-port", HTTP, "HTTP port (default: 8000)", type=port, default=8000, metavar="PORT"
    ),
    _impl(
        "--reuse-http-port",
        HTTP,
        "let other processes bind the same HTTP port (SO_REUSEPORT; default: false)",
        **_bool_flag(False),
    ),
    _ignored(
        "--http-header-forward-pattern",
        HTTP,
        "HTTP headers to forward as request parameters (regex)",
        "request parameters are not read by ONNX models, so no header is forwarded",
        metavar="REGEX",
    ),
    _impl(
        "--http-thread-count",
        HTTP,
        "event-loop threads serving HTTP, sharing the one listening socket; model runs happen "
        "on the scheduler's threads, not these (default: 1)",
        type=positive,
        default=1,
        metavar="N",
    ),
    _impl(
        "--http-max-input-size",
        HTTP,
        "largest HTTP request body in bytes, checked from Content-Length before reading and "
        "again while decompressing (default: 67108864, 64 MiB, as tritonserver)",
        type=byte_count,
        default=DEFAULT_HTTP_MAX_INPUT_SIZE,
        metavar="BYTES",
    ),
    _impl(
        "--http-max-connections",
        HTTP,
        "open HTTP connections at most, over all --http-thread-count loops; one more is closed "
        "as soon as it is accepted, so idle or stalled clients cannot use up the process's file "
        "descriptors (default: 1024)",
        type=positive,
        default=DEFAULT_HTTP_MAX_CONNECTIONS,
        metavar="N",
    ),
    _impl(
        "--http-restricted-api",
        HTTP,
        "API categories (comma-separated: health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) that answer only requests "
        "carrying the header <key>: <value>; others get 403. Repeatable, each category in one "
        "group only",
        type=parse_http_restriction,
        action="append",
        default=None,
        metavar="CATEGORIES:KEY=VALUE",
    ),
    # -- gRPC --------------------------------------------------------------------------------
    _impl(
        "--allow-grpc",
        GRPC,
        "serve gRPC (default: true)",
        **_bool_flag(True),
        rule=Rule(
            REFUSED,
            "the gRPC port also carries the health probes, reflection and streaming inference "
            "that deployments rely on; leave it on (HTTP/REST is served beside it)",
            values="false",
            applies=lambda v: v is False,
        ),
    ),
    _impl(
        "--grpc-address",
        GRPC,
        "gRPC bind address (default: 0.0.0.0)",
        default="0.0.0.0",
        metavar="ADDRESS",
    ),
    _impl(
        "--grpc-port",
        GRPC,
        "gRPC port (default: 8001; 0 picks a free port)",
        type=port,
        default=8001,
        metavar="PORT",
    ),
    _impl(
        "--reuse-grpc-port",
        GRPC,
        "let several servers listen on the gRPC port (SO_REUSEPORT)",
        **_bool_flag(False),
    ),
    _ignored(
        "--grpc-header-forward-pattern",
        GRPC,
        "gRPC headers to forward as request parameters (regex)",
        "headers are not forwarded; ONNX Runtime models do not read request parameters",
        metavar="REGEX",
    ),
    _ignored(
        "--grpc-infer-thread-count",
        GRPC,
        "tritonserver's gRPC inference handler threads (2-128)",
        "the threads that handle requests here are set by --grpc-worker-threads",
        type=integer,
        metavar="N",
    ),
    _ignored(
        "--grpc-infer-allocation-pool-size",
        GRPC,
        "request/response states kept for reuse",
        WHY_GRPC_POOLS,
        type=integer,
        metavar="N",
    ),
    _ignored(
        "--grpc-max-response-pool-size",
        GRPC,
        "response objects kept allocated",
        WHY_GRPC_POOLS,
        type=positive,
        metavar="N",
    ),
    _impl("--grpc-use-ssl", GRPC, "serve gRPC over TLS", **_bool_flag(False)),
    _impl(
        "--grpc-use-ssl-mutual",
        GRPC,
        "serve gRPC over TLS and require client certificates (implies --grpc-use-ssl)",
        **_bool_flag(False),
    ),
    _impl("--grpc-server-cert", GRPC, "server certificate (PEM file)", type=Path, metavar="PEM"),
    _impl("--grpc-server-key", GRPC, "server private key (PEM file)", type=Path, metavar="PEM"),
    _impl(
        "--grpc-root-cert",
        GRPC,
        "CA certificate that client certificates must chain to (PEM file)",
        type=Path,
        metavar="PEM",
    ),
    _impl(
        "--grpc-infer-response-compression-level",
        GRPC,
        "gzip level for responses: none (default), low, medium, high",
        type=lower("none", "low", "medium", "high"),
        default="none",
        metavar="{none,low,medium,high}",
    ),
    _impl(
        "--grpc-keepalive-time",
        GRPC,
        "milliseconds between keepalive pings (default: 7200000)",
        type=nonneg,
        default=7_200_000,
        metavar="MS",
    ),
    _impl(
        "--grpc-keepalive-timeout",
        GRPC,
        "milliseconds to wait for a keepalive ping's answer (default: 20000)",
        type=nonneg,
        default=20_000,
        metavar="MS",
    ),
    _impl(
        "--grpc-keepalive-permit-without-calls",
        GRPC,
        "allow keepalive pings on connections with no call in flight",
        **_bool_flag(False),
    ),
    _impl(
        "--grpc-http2-max-pings-without-data",
        GRPC,
        "pings sent without data before waiting for data; 0 = no limit (default: 2)",
        type=nonneg,
        default=2,
        metavar="N",
    ),
    _impl(
        "--grpc-http2-min-recv-ping-interval-without-data",
        GRPC,
        "shortest interval between a client's pings without data; a shorter one is a strike "
        "(default: 300000 ms)",
        type=nonneg,
        default=300_000,
        metavar="MS",
    ),
    _impl(
        "--grpc-http2-max-ping-strikes",
        GRPC,
        "bad pings tolerated before the connection is closed; 0 = any number (default: 2)",
        type=nonneg,
        default=2,
        metavar="N",
    ),
    _impl(
        "--grpc-max-connection-age",
        GRPC,
        "close a connection (with GOAWAY) after this many milliseconds (default: no limit)",
        type=positive,
        default=None,
        metavar="MS",
    ),
    _impl(
        "--grpc-max-connection-age-grace",
        GRPC,
        "after --grpc-max-connection-age, milliseconds that calls in flight may take to finish "
        "(default: no limit)",
        type=nonneg,
        default=None,
        metavar="MS",
    ),
    _impl(
        "--grpc-restricted-protocol",
        GRPC,
        "RPC categories (comma-separated: health, metadata, inference, shared-memory, "
        "model-config, model-repository, statistics, trace, logging) that answer only calls "
        "carrying the header triton-grpc-protocol-<key>: <value>; others get UNAVAILABLE. "
        "Repeatable, each category in one group only",
        type=parse_restriction,
        action="append",
        default=None,
        metavar="CATEGORIES:KEY=VALUE",
    ),
    _ours(
        "--grpc-worker-threads",
        GRPC,
        "threads that handle unary RPCs (default: 128); streams, probes and reflection have "
        "threads of their own",
        type=positive,
        default=128,
        metavar="N",
    ),
    _ours(
        "--grpc-max-streams",
        GRPC,
        "open ModelStreamInfer streams allowed at once; more get RESOURCE_EXHAUSTED (default: 512)",
        type=positive,
        default=DEFAULT_MAX_STREAMS,
        metavar="N",
    ),
    _ours(
        "--grpc-stream-max-pending",
        GRPC,
        "replies a stream may have unsent before the server stops reading its requests "
        "(default: 256)",
        type=positive,
        default=DEFAULT_STREAM_MAX_PENDING,
        metavar="N",
    ),
    _ours(
        "--grpc-max-message-size",
        GRPC,
        "largest gRPC message sent or received (default: 2^31-1)",
        type=positive,
        default=INT32_MAX,
        metavar="BYTES",
    ),
    _ours(
        "--allow-grpc-reflection",
        GRPC,
        "serve gRPC server reflection (grpc.reflection.v1 and v1alpha) for grpcurl and Postman",
        **_bool_flag(True),
    ),
    # -- SageMaker and Vertex AI -------------------------------------------------------------
    _impl(
        "--allow-sagemaker",
        SAGEMAKER,
        "serve SageMaker's HTTP endpoints (default: false)",
        **_bool_flag(False),
        rule=Rule(
            REFUSED,
            "SageMaker's endpoints (/ping, /invocations) are not served; use the gRPC "
            "endpoint with a KServe v2 client",
            values="true",
            applies=lambda v: v is True,
        ),
    ),
    _ignored(
        "--sagemaker-port",
        SAGEMAKER,
        "SageMaker port",
        WHY_SAGEMAKER_OFF,
        type=port,
        metavar="PORT",
    ),
    _ignored(
        "--sagemaker-safe-port-range",
        SAGEMAKER,
        "ports other endpoints may use (<lo>-<hi>)",
        WHY_SAGEMAKER_OFF,
        metavar="LO-HI",
    ),
    _ignored(
        "--sagemaker-thread-count",
        SAGEMAKER,
        "SageMaker handler threads",
        WHY_SAGEMAKER_OFF,
        type=integer,
        metavar="N",
    ),
    _impl(
        "--allow-vertex-ai",
        VERTEX,
        "serve Vertex AI's HTTP endpoints (default: false)",
        **_bool_flag(False),
        rule=Rule(
            REFUSED,
            "Vertex AI's prediction endpoints are not served; use the gRPC endpoint with a "
            "KServe v2 client",
            values="true",
            applies=lambda v: v is True,
        ),
    ),
    _ignored(
        "--vertex-ai-port", VERTEX, "Vertex AI port", WHY_VERTEX_OFF, type=port, metavar="PORT"
    ),
    _ignored(
        "--vertex-ai-thread-count",
        VERTEX,
        "Vertex AI handler threads",
        WHY_VERTEX_OFF,
        type=integer,
        metavar="N",
    ),
    _ignored(
        "--vertex-ai-default-model",
        VERTEX,
        "model for single-model Vertex AI requests",
        WHY_VERTEX_OFF,
        metavar="NAME",
    ),
    # -- metrics -----------------------------------------------------------------------------
    _impl("--allow-metrics", METRICS, "serve Prometheus metrics", **_bool_flag(True)),
    _impl(
        "--allow-gpu-metrics",
        METRICS,
        "GPU gauges, where GPUs and NVML exist (needs --allow-metrics)",
        **_bool_flag(True),
    ),
    _impl(
        "--allow-cpu-metrics",
        METRICS,
        "CPU utilisation and memory gauges (needs --allow-metrics)",
        **_bool_flag(True),
    ),
    _impl(
        "--metrics-address",
        METRICS,
        "metrics bind address (default: 0.0.0.0)",
        default="0.0.0.0",
        metavar="ADDRESS",
    ),
    _impl(
        "--metrics-port",
        METRICS,
        "metrics port (default: 8002; 0 picks a free port)",
        type=port,
        default=8002,
        metavar="PORT",
    ),
    _impl(
        "--metrics-interval-ms",
        METRICS,
        "how often the CPU and GPU gauges are sampled (default: 2000)",
        type=positive,
        default=2000,
        metavar="MS",
    ),
    _ignored(
        "--metrics-config",
        METRICS,
        "metrics setting (<setting>=<value>, repeatable)",
        "the metric families are fixed: Triton's counters and gauges, plus latency "
        "histograms under tributary_* names; no summaries",
        action="append",
        type=setting,
        metavar="SETTING=VALUE",
    ),
    # -- tracing -----------------------------------------------------------------------------
    _impl(
        "--trace-config",
        TRACING,
        "trace setting ([<mode>,]<setting>=<value>, repeatable): global rate=N (trace one "
        "request in N, default 1000), level=OFF|TIMESTAMPS|TENSORS (default OFF; repeatable), "
        "count=N (traces to take, default -1: no limit), mode=triton|opentelemetry (default "
        "triton); opentelemetry,url=<host:port> of an OTLP/gRPC receiver (default "
        "localhost:4317), opentelemetry,resource=<key>=<value> (repeatable), "
        "opentelemetry,bsp_max_queue_size|bsp_schedule_delay|bsp_max_export_batch_size=N; "
        "triton,file=<path> (Triton's JSON trace file), triton,log-frequency=N "
        "(docs/protocol.md#tracing)",
        action="append",
        type=setting,
        default=[],
        metavar="[MODE,]SETTING=VALUE",
    ),
    # -- response cache ----------------------------------------------------------------------
    _impl(
        "--cache-config",
        CACHE,
        "response cache: local,size=<bytes> (an LRU in server memory shared by the models "
        "whose config enables response_cache; only the 'local' cache exists, and one cache)",
        action="append",
        type=setting,
        metavar="CACHE,SETTING=VALUE",
    ),
    _ignored(
        "--cache-directory",
        CACHE,
        "where cache libraries live",
        "the one cache (local) is built in; no cache library is loaded",
        metavar="DIR",
    ),
    # -- rate limiter ------------------------------------------------------------------------
    _impl(
        "--rate-limit",
        RATE_LIMIT,
        "off (default): run a request as soon as a model instance is free; "
        "execution_count: share instances by configured resources and priority",
        type=lower("off", "execution_count"),
        default="off",
        metavar="{off,execution_count}",
        rule=Rule(
            REFUSED,
            "there is no rate limiter, and running without it would let every instance of "
            "every model execute at once, which is what a user who sets it wants to prevent "
            "(e.g. models sharing one GPU's memory); bound concurrency with instance_group "
            "counts, or drop the flag",
            values="execution_count",
            applies=lambda v: v == "execution_count",
        ),
    ),
    _ignored(
        "--rate-limit-resource",
        RATE_LIMIT,
        "resource available to the rate limiter (<name>:<count>[:<device>], repeatable)",
        WHY_RATE_LIMIT,
        action="append",
        metavar="NAME:COUNT[:DEVICE]",
    ),
    # -- memory and devices ------------------------------------------------------------------
    _ignored(
        "--pinned-memory-pool-byte-size",
        MEMORY,
        "pinned host memory pool",
        WHY_POOLS,
        type=integer,
        metavar="BYTES",
    ),
    _ignored(
        "--cuda-memory-pool-byte-size",
        MEMORY,
        "CUDA memory pool per GPU (<gpu>:<bytes>, repeatable)",
        WHY_POOLS,
        action="append",
        metavar="GPU:BYTES",
    ),
    _ignored(
        "--cuda-virtual-address-size",
        MEMORY,
        "virtual address space per GPU for growable implicit state (<gpu>:<bytes>)",
        "growable implicit state (sequence_batching.state use_growable_memory) is not "
        "supported: states live in host memory, so nothing reserves GPU address space",
        action="append",
        metavar="GPU:BYTES",
    ),
    _ignored(
        "--min-supported-compute-capability",
        MEMORY,
        "do not use GPUs below this CUDA compute capability",
        "every GPU that ONNX Runtime's CUDA provider accepts is used; hide a GPU with "
        "CUDA_VISIBLE_DEVICES instead",
        type=number,
        metavar="X.Y",
    ),
    _ignored(
        "--buffer-manager-thread-count",
        MEMORY,
        "threads for tensor copies",
        "tensor copies run on the request's own thread; there are no copy threads to size",
        type=integer,
        metavar="N",
    ),
    _ignored(
        "--host-policy",
        MEMORY,
        "NUMA/CPU-core policy (<policy>,<setting>=<value>, repeatable)",
        "models are not pinned to NUMA nodes or CPU cores; use numactl, taskset or the "
        "container's CPU set",
        action="append",
        type=setting,
        metavar="POLICY,SETTING=VALUE",
    ),
    _ignored(
        "--model-load-gpu-limit",
        MEMORY,
        "refuse loads above this fraction of GPU memory (<gpu>:<fraction>, repeatable)",
        "loads are not checked against GPU memory use beforehand; a load that runs out of "
        "memory fails with ONNX Runtime's error",
        action="append",
        metavar="GPU:FRACTION",
    ),
    # -- shared memory -----------------------------------------------------------------------
    _impl(
        "--allow-client-shm",
        SHM,
        "let clients register system shared memory regions (POSIX shm objects in /dev/shm) "
        "and send or receive tensors through them; false: the register/unregister RPCs "
        "answer UNIMPLEMENTED (tritonserver's default: false). CUDA regions are refused. "
        "When true, any client that reaches the gRPC or HTTP port can read and write every shm "
        "object the server's user can open (docs/limits.md#shared-memory)",
        **_bool_flag(False),
    ),
    _ours(
        "--client-shm-max-bytes",
        SHM,
        "total byte_size of the client shared memory regions mapped at once (registered, or "
        "unregistered and still in use); a registration past it gets RESOURCE_EXHAUSTED "
        "(default: 64 GiB)",
        type=byte_count,
        default=DEFAULT_CLIENT_SHM_MAX_BYTES,
        metavar="BYTES",
    ),
    _ours(
        "--client-shm-key-prefix",
        SHM,
        "register only shared memory objects whose name starts with PREFIX (a leading '/' "
        "does not count); others get INVALID_ARGUMENT before anything is opened "
        "(default: any object the server's user can open)",
        type=shm_prefix,
        default=None,
        metavar="PREFIX",
    ),
    # -- backends and repository agents ------------------------------------------------------
    _ignored(
        "--backend-directory",
        BACKEND,
        "where backend libraries live",
        "ONNX Runtime is built in; no backend libraries are loaded",
        metavar="DIR",
    ),
    _impl(
        "--backend-config",
        BACKEND,
        "backend setting ([<backend>,]<setting>=<value>, repeatable): "
        "default-max-batch-size=N (globally or for onnxruntime) is implemented; ONNX "
        "Runtime's thread settings and other backends' settings are accepted and ignored",
        action="append",
        default=[],
        metavar="[BACKEND,]SETTING=VALUE",
    ),
    _ignored(
        "--repoagent-directory",
        BACKEND,
        "where repository agent libraries live",
        "no repository agent libraries are loaded",
        metavar="DIR",
    ),
    # -- deprecated by tritonserver ----------------------------------------------------------
    _impl(
        "--strict-model-config",
        DEPRECATED,
        "true: like --disable-auto-complete-config (tritonserver deprecates it)",
        **_bool_flag(False),
    ),
    _impl(
        "--response-cache-byte-size",
        DEPRECATED,
        "response cache size, like --cache-config=local,size=N (not both)",
        type=integer,
        default=None,
        metavar="BYTES",
    ),
    _impl(
        "--trace-file",
        DEPRECATED,
        "trace output file (now --trace-config triton,file=PATH)",
        default=None,
        metavar="PATH",
    ),
    _impl(
        "--trace-level",
        DEPRECATED,
        "OFF, TIMESTAMPS or TENSORS, repeatable (now --trace-config level=LEVEL)",
        action="append",
        type=lower("OFF", "TIMESTAMPS", "TENSORS", "false", "true", "on", "min", "max"),
        default=[],
        metavar="LEVEL",
    ),
    _impl(
        "--trace-rate",
        DEPRECATED,
        "trace one request in N (now --trace-config rate=N)",
        type=integer,
        default=None,
        metavar="N",
    ),
    _impl(
        "--trace-count",
        DEPRECATED,
        "number of traces to take, -1 for no limit (now --trace-config count=N)",
        type=integer,
        default=None,
        metavar="N",
    ),
    _impl(
        "--trace-log-frequency",
        DEPRECATED,
        "traces per indexed trace file (now --trace-config triton,log-frequency=N)",
        type=integer,
        default=None,
        metavar="N",
    ),
)

GROUPS = (
    SERVER,
    LOGGING,
    REPOSITORY,
    HTTP,
    GRPC,
    SAGEMAKER,
    VERTEX,
    METRICS,
    TRACING,
    CACHE,
    RATE_LIMIT,
    MEMORY,
    SHM,
    BACKEND,
    DEPRECATED,
)

BY_NAME: dict[str, Flag] = {n: f for f in FLAGS for n in f.names}

# onnxruntime settings Triton's ONNX Runtime backend takes that change only its threading.
ORT_THREAD_SETTINGS = ("enable-global-threadpool", "intra_op_thread_count", "inter_op_thread_count")


# -- applying the rules ---------------------------------------------------------------------


def shown(flag: Flag, value: Any) -> str:
    """`--x=value` as the user gave it (each value of a repeatable flag)."""
    values = value if isinstance(value, list) else [value]
    return ", ".join(f"{flag.name}={_default(v)}" for v in values)


def review(ns: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The first refusal (one line), and the start-up warnings: one line per reason, naming
    every flag it covers (KServe's `--http-port=8080 --allow-http=true` is one line)."""
    refusal = None
    ignored: dict[str, list[str]] = {}
    for flag in FLAGS:
        rule = flag.rule
        if rule is None:
            continue
        value = getattr(ns, flag.dest)
        if not rule.applies(value):
            continue
        if rule.action == REFUSED:
            refusal = refusal or f"{shown(flag, value)} is not supported: {rule.why}"
        else:
            ignored.setdefault(rule.why, []).append(shown(flag, value))
    warnings = [f"ignoring {', '.join(names)}: {why}" for why, names in ignored.items()]
    return refusal, warnings


# -- docs -----------------------------------------------------------------------------------

DOC_BEGIN = "<!-- flags table: written by scripts/flags_doc.py from server/tributary/flags.py -->"
DOC_END = "<!-- end of flags table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def markdown() -> str:
    """The flags table of docs/flags.md, one section per group."""
    out = [DOC_BEGIN, ""]
    for group in GROUPS:
        flags = [f for f in FLAGS if f.group == group]
        out += [f"### {group}", "", "| flag | what it does | Tributary |"]
        out += ["| --- | --- | --- |"]
        for f in flags:
            names = " ".join(f"`{n}`" for n in f.names)
            out.append(f"| {names} | {_cell(f.help)} | {_cell(f.verdict())} |")
        out.append("")
    out.append(DOC_END)
    return "\n".join(out) + "\n"
