"""Composition root: build repository, models, gRPC and HTTP servers, health, reflection,
metrics.

Start-up order: bind the gRPC, HTTP and metrics ports first, so a port that is taken fails in
one line before any model loads; then load the start-up models (every model, or in explicit
mode only the --load-model ones); only then start serving gRPC and HTTP, so a client (or
Kubernetes) that gets an answer can also infer. Shutdown order: health NOT_SERVING, end open
streams, stop accepting on both front ends, let in-flight and queued requests finish within
--exit-timeout-secs, unload.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import health_pb2 as _health_in_pool  # noqa: F401 - registers it
from tributary_client._proto._pool import POOL

from .backends.onnxruntime import cpu_count, gpu_count
from .dataplane import DataPlane, ServerState, server_ready
from .errors import InferenceError
from .http import HttpServer
from .logs import LogControl, RequestLog, configure
from .model import build_loader
from .options import ServerOptions
from .poll import RepositoryPoller
from .repository import ModelRepository
from .rpcs import Front, HealthService, register
from .scheduler.cache import ResponseCache
from .servicer import InferenceServicer
from .tracing import SHUTDOWN_TIMEOUT_S, Tracer

log = logging.getLogger("tributary")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_COMPRESSION_LEVELS = {"low": 1, "medium": 2, "high": 3}


def configure_logging(options: ServerOptions) -> LogControl:
    return configure(
        verbose=options.log_verbose,
        info=options.log_info,
        warning=options.log_warning,
        error=options.log_error,
        fmt=options.log_format,
        file=options.log_file,
    )


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_descriptors() -> None:
    """Reflection serves from our private pool; add the reflection protos to it, and
    grpc.reflection.v1 (grpcurl 1.9+ and Postman ask for it first). grpcio-reflection ships
    only v1alpha; v1 is the same file under another package, so it is derived from it.
    grpc.health.v1 is already there: the SDK's own health stubs live in that pool (importing
    them above registered them), and adding grpcio-health-checking's copy would clash."""
    try:
        POOL.FindFileByName(reflection_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    v1 = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    v1.name = "grpc/reflection/v1/reflection.proto"
    try:
        POOL.FindFileByName(v1.name)
        return
    except KeyError:
        pass
    old, new = v1.package, "grpc.reflection.v1"
    v1.package = new
    for message in v1.message_type:
        for f in message.field:
            if f.type_name.startswith(f".{old}."):
                f.type_name = f".{new}." + f.type_name[len(old) + 2 :]
    for service in v1.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    POOL.AddSerializedFile(v1.SerializeToString())


def _grpc_options(o: ServerOptions) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", o.grpc_max_message_bytes),
        ("grpc.max_receive_message_length", o.grpc_max_message_bytes),
        ("grpc.so_reuseport", int(o.reuse_grpc_port)),
        ("grpc.keepalive_time_ms", o.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", o.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(o.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", o.grpc_http2_max_pings_without_data),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            o.grpc_http2_min_recv_ping_interval_without_data_ms,
        ),
        ("grpc.http2.max_ping_strikes", o.grpc_http2_max_ping_strikes),
    ]
    if o.grpc_max_connection_age_ms is not None:
        opts.append(("grpc.max_connection_age_ms", o.grpc_max_connection_age_ms))
    if o.grpc_max_connection_age_grace_ms is not None:
        opts.append(("grpc.max_connection_age_grace_ms", o.grpc_max_connection_age_grace_ms))
    level = _COMPRESSION_LEVELS.get(o.grpc_infer_response_compression_level)
    if level:
        opts.append(("grpc.default_compression_level", level))
    return opts


def _credentials(o: ServerOptions) -> grpc.ServerCredentials:
    key = o.grpc_server_key.read_bytes()  # type: ignore[union-attr]
    cert = o.grpc_server_cert.read_bytes()  # type: ignore[union-attr]
    root = o.grpc_root_cert.read_bytes() if o.grpc_root_cert else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=root, require_client_auth=o.grpc_use_ssl_mutual
    )


@dataclass
class Server:
    """A running Tributary: what `run` and in-process embedders hold on to."""

    options: ServerOptions
    repository: ModelRepository
    state: ServerState
    grpc_server: grpc.Server
    health: health.HealthServicer
    grpc_port: int
    metrics: Any = None
    front: Front | None = None
    http: HttpServer | None = None
    poller: RepositoryPoller | None = None
    _health_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh_health(self) -> None:
        """Set grpc.health.v1 from readiness; called at start, on load/unload and on shutdown.

        Serialised so that two concurrent loads cannot leave a stale status behind (one reads
        readiness, the other reads and sets, then the first sets its older answer).
        """
        with self._health_lock:
            ready = server_ready(self.repository, self.state)
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", INFERENCE_SERVICE):
                self.health.set(service, status)

    def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work, finish in-flight within the timeout, unload."""
        deadline = time.monotonic() + self.options.exit_timeout_secs
        self.state.exiting = True
        if self.poller is not None:
            # A load in progress may outlive this wait: the repository closes what it builds
            # after close(), so nothing new serves past shutdown.
            self.poller.stop(timeout=POLLER_STOP_WAIT_S)
        self.refresh_health()
        log.info(
            "shutting down: waiting up to %.0fs for in-flight requests",
            self.options.exit_timeout_secs,
        )
        if self.front is not None:
            self.front.end_streams()  # open streams end once their in-flight work answers
        http_drain = None
        if self.http is not None:  # drains beside gRPC, within the same timeout
            http_drain = threading.Thread(target=self.http.stop, name="http-stop")
            http_drain.start()
        self.grpc_server.stop(grace=self.options.exit_timeout_secs).wait()
        if http_drain is not None:
            http_drain.join()
        if self.front is not None:
            self.front.shutdown()
        self.repository.close(max(0.0, deadline - time.monotonic()))
        if self.front is not None:
            self.front.servicer.dp.close()  # file-override directories, shm regions
            # The last spans go out within what is left of the exit timeout (at least a
            # second, at most the tracer's own bound), before the exit watchdog fires.
            left = deadline - time.monotonic() + EXIT_GRACE_S / 2
            self.front.servicer.dp.tracer.shutdown(max(1.0, min(SHUTDOWN_TIMEOUT_S, left)))
        if self.metrics is not None:
            self.metrics.stop()
        log.info("stopped")


POLLER_STOP_WAIT_S = 2.0
"""At shutdown, how long to wait for a poll-mode load in progress before draining anyway."""


def startup_models(options: ServerOptions) -> list[str] | None:
    """Which models to load before opening the port; None means every model in the repository.

    Explicit mode loads only the --load-model names (none at all without the flag), as
    tritonserver does; everything else is left for RepositoryModelLoad.
    """
    if options.model_control_mode != "explicit" or options.load_models == ["*"]:
        return None
    return list(options.load_models)


def start(options: ServerOptions, logs: LogControl | None = None) -> Server | None:
    """Bind the ports, load models, then serve. None when start-up must fail (a port cannot
    be bound, said in one line before any model loads; or models failed to load)."""
    started = time.monotonic()
    gpus = gpu_count()
    log.info("tributary starting: %d GPU(s), %d CPU(s) available", gpus, cpu_count())
    cache = ResponseCache(options.cache_bytes) if options.cache_bytes > 0 else None
    if cache is not None:
        log.info("response cache: local, %d bytes", options.cache_bytes)
    repositories: list[ModelRepository] = []  # ensembles resolve steps in the one built below
    try:
        repository = ModelRepository(
            options.model_repositories,
            build_loader(
                gpus,
                max_tensor_bytes=options.max_tensor_bytes,
                cache=cache,
                repository=lambda: repositories[0],
            ),
            auto_complete=options.auto_complete_config,
            default_max_batch_size=options.default_max_batch_size,
            gpu_count=gpus,
            config_name=options.model_config_name,
            load_threads=options.model_load_thread_count,
            load_retries=options.model_load_retry_count,
        )
    except InferenceError as exc:
        log.error("cannot start: %s", exc)
        return None
    repositories.append(repository)
    state = ServerState(
        server_id=options.server_id,
        strict_readiness=options.strict_readiness,
        max_tensor_bytes=options.max_tensor_bytes,
        model_control_mode=options.model_control_mode,
        max_streams=options.grpc_max_streams,
        stream_max_pending=options.grpc_stream_max_pending,
        allow_client_shm=options.allow_client_shm,
        client_shm_max_bytes=options.client_shm_max_bytes,
        client_shm_key_prefix=options.client_shm_key_prefix,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=options.grpc_worker_threads, thread_name_prefix="grpc"
        ),
        options=_grpc_options(options),
        compression=(
            grpc.Compression.Gzip
            if options.grpc_infer_response_compression_level != "none"
            else None
        ),
    )
    request_log = RequestLog() if options.log_verbose >= 1 else None
    tracer = Tracer(options.trace)
    dataplane = DataPlane(repository, state, request_log=request_log, tracer=tracer, logs=logs)
    servicer = InferenceServicer(dataplane)
    health_servicer = HealthService()
    _register_descriptors()
    front = register(
        server,
        servicer,
        health_servicer,
        reflected=(
            (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
            if options.allow_grpc_reflection
            else ()
        ),
        max_streams=options.grpc_max_streams,
        request_log=dataplane,  # looked up per call: LogSettings switches it live
        restricted=options.grpc_restricted_protocols,
    )
    # Bound now, served only once the start-up models are loaded (Triton's order): a port
    # that is taken fails here, in one line, without loading anything.
    port = _bind(server, options)
    http = None
    if port and options.allow_http:
        http = HttpServer(
            dataplane,
            address=options.http_address,
            port=options.http_port,
            threads=options.http_thread_count,
            max_input_size=options.http_max_input_size,
            max_connections=options.http_max_connections,
            reuse_port=options.reuse_http_port,
            drain_timeout=options.exit_timeout_secs,
            restricted=options.http_restricted_apis,
        )
        try:
            http.bind()
        except OSError as exc:
            log.error(
                "could not bind HTTP port %s:%d: %s",
                options.http_address,
                options.http_port,
                exc.strerror or exc,
            )
            port = 0
    metrics = None
    if port and options.allow_metrics:
        from .metrics import MetricsServer

        metrics = MetricsServer(repository, options, gpus)
        try:
            metrics.start()
        except OSError as exc:
            log.error(
                "could not bind metrics port %s:%d: %s",
                options.metrics_address,
                options.metrics_port,
                exc.strerror or exc,
            )
            port = 0
    if not port:
        if http is not None:
            http.stop()
        front.shutdown()
        return None

    poller = None
    if options.model_control_mode == "poll":

        def changed() -> None:
            for listener in state.listeners:
                listener()

        poller = RepositoryPoller(repository, options.repository_poll_secs, on_change=changed)
        try:
            poller.baseline()  # before loading: an edit made meanwhile is seen by the first poll
        except Exception:
            log.exception("poll: first scan of the model repository failed")

    # Each failure was logged once, with its reason, where it happened (ModelRepository.load).
    failures = repository.load_models(startup_models(options))
    if failures and options.exit_on_error:
        log.error(
            "failed to load all models: %s (--exit-on-error=true)", ", ".join(sorted(failures))
        )
        if metrics is not None:
            metrics.stop()
        if http is not None:
            http.stop()
        front.shutdown()
        repository.close(0)
        return None

    running = Server(
        options,
        repository,
        state,
        server,
        health_servicer,
        port,
        metrics=metrics,
        front=front,
        http=http,
        poller=poller,
    )
    state.listeners.append(running.refresh_health)  # run-time load/unload moves readiness
    server.start()
    if http is not None:
        http.start()
    running.refresh_health()
    if poller is not None:
        poller.start()
    log.info(
        "Started GRPCInferenceService at %s:%d (%d model(s) ready) in %.2fs",
        options.grpc_address,
        port,
        len(repository.servables()),
        time.monotonic() - started,
    )
    if http is not None:
        log.info("Started HTTPService at %s:%d", options.http_address, http.port)
    if running.metrics is not None:
        log.info("Started Metrics Service at %s:%d", options.metrics_address, running.metrics.port)
    try:
        _announce(running)
    except OSError as exc:  # checked by the parser, but the disk has its say
        log.error("could not write --port-file %s: %s", options.port_file, exc)
        running.stop()
        return None
    return running


def _bind(server: grpc.Server, options: ServerOptions) -> int:
    """The bound gRPC port, or 0 after logging one line (grpcio raises RuntimeError for a
    port in use rather than returning 0, so both are handled)."""
    address = f"{options.grpc_address}:{options.grpc_port}"
    try:
        if options.grpc_use_ssl:
            port = server.add_secure_port(address, _credentials(options))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("could not bind gRPC port %s: %s", address, exc)
        return 0
    if not port:
        log.error("could not bind gRPC port %s", address)
    return port


def _announce(server: Server) -> None:
    if server.options.port_file is None:
        return
    info = {
        "grpc_port": server.grpc_port,
        "http_port": server.http.port if server.http is not None else None,
        "metrics_port": server.metrics.port if server.metrics is not None else None,
        "pid": os.getpid(),
    }
    text = json.dumps(info)
    if str(server.options.port_file) == "-":
        print(text, flush=True)
    else:
        tmp = server.options.port_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(server.options.port_file)


def run(options: ServerOptions) -> int:
    try:
        logs = configure_logging(options)
    except OSError as exc:  # --log-file: checked by the parser, but the disk has its say
        sys.stderr.write(f"tributary: error: cannot open --log-file: {exc}\n")
        return 1
    for warning in options.warnings:
        logging.getLogger("tributary.flags").warning("%s", warning)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = start(options, logs)
    if server is None:
        return 1
    # Timed: a signal that the kernel hands to another thread (gRPC's, ONNX Runtime's, the
    # poller) does not interrupt a lock wait here, so the handler would only run at the next
    # bytecode of this thread; waking each second bounds that.
    while not stop.wait(1.0):
        pass
    _exit_watchdog(options.exit_timeout_secs)
    server.stop()
    return 0


EXIT_GRACE_S = 2.0
"""Beyond --exit-timeout-secs, time for unloading and flushing the log before exit is forced."""


def _exit_watchdog(timeout_s: float) -> None:
    """--exit-timeout-secs bounds the whole shutdown, as in tritonserver: the drain gives up
    on in-flight work at the deadline, but a thread still inside ONNX Runtime would then hold
    the interpreter's exit (it joins every worker) until the run finished, seconds or minutes
    later. A daemon timer that outlives that join ends the process with status 1, after one
    log line that says so."""

    def force_exit() -> None:
        log.error(
            "exit timeout of %.0fs expired with inference still running; exiting now",
            timeout_s,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    timer = threading.Timer(timeout_s + EXIT_GRACE_S, force_exit)
    timer.daemon = True
    timer.start()
