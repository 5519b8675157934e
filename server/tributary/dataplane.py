"""The request lifecycle, transport-neutral: what every front end (gRPC, HTTP/REST) calls.

A front end parses its wire format into the generated messages (`pb.ModelInferRequest` plus
the raw input tensors it split off) and maps what comes back, or the `InferenceError` raised,
onto its own wire. Everything between is here, once: resolve the model version, validate the
request against its signature (`codec.decode_request`), schedule it, encode the reply, count
statistics, write the --log-verbose line, route a request again when a reload retired the
version it resolved, and give back shared-memory leases. Nothing here imports grpc or an HTTP
library, so the lifecycle is tested in-process without sockets (tests/unit/test_dataplane.py).

See docs/architecture.md for the path of one request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from tributary_client._proto import grpc_service_pb2 as pb

from . import __version__
from .codec import DecodedRequest, decode_request, encode_response
from .constants import (
    DEFAULT_CLIENT_SHM_MAX_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_STREAM_MAX_PENDING,
)
from .control import ModelControl
from .errors import (
    Cancelled,
    InferenceError,
    Internal,
    InvalidArgument,
    Unavailable,
    Unimplemented,
)
from .logs import LogControl, RequestLog
from .repository import ModelRepository, Servable
from .scheduler import Closed
from .scheduler.cache import ModelCache
from .shm import SharedMemory
from .statistics import statistics_response
from .traceconfig import TraceConfig
from .tracing import Trace, Tracer

log = logging.getLogger("tributary.dataplane")

REROUTES = 2
"""Times a request whose version was retired under it (reload, unload) is routed again."""

EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "sequence",
    "statistics",
)
SHM_EXTENSIONS = ("system_shared_memory", "cuda_shared_memory")
"""Listed when --allow-client-shm=true, as tritonserver lists both (CUDA regions are refused
on registration with its CPU-only text, docs/protocol.md#shared-memory)."""

_refs = itertools.count(1)


def internal_error(where: str, exc: BaseException, request_id: str = "") -> Internal:
    """Log a bug once, with a reference the client is given instead of our internals."""
    ref = next(_refs)
    log.error(
        "internal error %d in %s (request id %r)",
        ref,
        where,
        request_id[:128],
        exc_info=exc,
        extra={"request_id": request_id[:128]},
    )
    return Internal(f"internal error in {where}: {type(exc).__name__} (server log reference {ref})")


@dataclass
class ServerState:
    """What health/readiness depend on besides the models; flipped by the composition root."""

    server_id: str = "tributary"
    strict_readiness: bool = True
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    model_control_mode: str = "none"
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_max_pending: int = DEFAULT_STREAM_MAX_PENDING
    allow_client_shm: bool = False
    client_shm_max_bytes: int = DEFAULT_CLIENT_SHM_MAX_BYTES
    client_shm_key_prefix: str | None = None
    exiting: bool = False
    # called after a model is loaded or unloaded at run time (health follows readiness)
    listeners: list[Callable[[], None]] = field(default_factory=list)


def server_ready(repo: ModelRepository, state: ServerState) -> bool:
    """ServerReady, health Check and Watch all answer this one question."""
    if state.exiting:
        return False
    return repo.is_ready() if state.strict_readiness else True


class InferResult(NamedTuple):
    """A successful inference: the reply's head and its raw output tensors, one per output
    in order (outputs written into client shared memory have none)."""

    response: pb.ModelInferResponse
    raws: list[bytes | memoryview]


Done = Callable[[InferResult | None, InferenceError | None], None]
"""`submit`'s completion: called exactly once with a result or an error."""


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        return "CANCELED"
    if isinstance(exc, Unavailable):
        return "REJECTED"
    if isinstance(exc, InferenceError) and exc.code.name == "INTERNAL":
        return "BACKEND"
    return "OTHER"


def _log_line(
    request_log: RequestLog,
    rpc: str,
    request: pb.ModelInferRequest,
    version: str,
    status: str,
    start: int,
) -> None:
    """The --log-verbose line of an answered request (the version it ran on, if it ran)."""
    request_log(
        rpc, request.model_name, version or request.model_version, request.id, status, start
    )


class _Call:
    """One inference request on its way through: the model it resolved, the decoded request
    and when it started (statistics count from resolve to encoded reply). With a response
    cache: its key and what the lookup cost (a miss is charged lookup + store)."""

    __slots__ = ("model", "decoded", "start", "cache", "key", "lookup_ns")

    def __init__(self, model: Servable, decoded: DecodedRequest, start: int) -> None:
        self.model, self.decoded, self.start = model, decoded, start
        self.cache: ModelCache | None = getattr(model, "cache", None)
        self.key = b""
        self.lookup_ns = 0

    def cached(self) -> dict[str, np.ndarray] | None:
        """The response cache's answer, or None (then the request runs and may be stored)."""
        cache = self.cache
        if cache is None:
            return None
        t0 = time.perf_counter_ns()
        decoded = self.decoded
        self.key = cache.key(
            decoded.item.inputs, [(o.spec.name, o.classification) for o in decoded.outputs]
        )
        hit = cache.get(self.key)
        self.lookup_ns = time.perf_counter_ns() - t0
        return hit

    def store(self, results: dict[str, np.ndarray]) -> None:
        """Offer a successful result to the cache; its miss is counted with the store time."""
        cache = self.cache
        if cache is None:
            return
        t0 = time.perf_counter_ns()
        cache.put(self.key, results)
        self.model.stats.cache_miss(miss_ns=self.lookup_ns + time.perf_counter_ns() - t0)


class DataPlane:
    """Health, metadata, repository, shared memory and inference, for any transport."""

    def __init__(
        self,
        repository: ModelRepository,
        state: ServerState,
        request_log: RequestLog | None = None,
        *,
        tracer: Tracer | None = None,
        logs: LogControl | None = None,
    ) -> None:
        self.repo = repository
        self.state = state
        self.request_log = request_log
        self.tracer = tracer if tracer is not None else Tracer(TraceConfig())
        self.logs = logs
        if logs is not None:
            logs.listeners.append(self._verbose)
        # Front ends read `tracing` to decide whether to collect trace headers at all, and
        # inference reads `_plain`: with neither tracing nor the request log on, a request
        # pays that one check (both follow TraceSetting and LogSettings at run time).
        self.tracing = self.tracer.enabled
        self._plain = request_log is None and not self.tracing
        self.control = ModelControl(
            repository, explicit=state.model_control_mode == "explicit", on_change=self._changed
        )
        self.shm = SharedMemory(
            state.allow_client_shm,
            max_bytes=state.client_shm_max_bytes,
            key_prefix=state.client_shm_key_prefix,
        )
        self._extensions = EXTENSIONS + (SHM_EXTENSIONS if state.allow_client_shm else ())

    def _changed(self) -> None:
        for listener in self.state.listeners:
            listener()

    def close(self) -> None:
        """After the models unloaded: remove file-override directories, unmap regions (those
        still in use unmap with their last user)."""
        self.control.close()
        self.shm.close()

    # ---- health and metadata ---------------------------------------------------------------
    def server_live(self) -> bool:
        return not self.state.exiting

    def server_ready(self) -> bool:
        return server_ready(self.repo, self.state)

    def model_ready(self, name: str, version: str) -> bool:
        return not self.state.exiting and self.repo.is_model_ready(name, version)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self.state.server_id, version=__version__, extensions=self._extensions
        )

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        if version:
            models = [self.repo.resolve(name, version)]
        else:
            models = self.repo.ready_versions(name) or [
                self.repo.resolve(name, "")  # raises "has no available versions"
            ]
        sig = models[-1].signature
        batch = [-1] if sig.max_batch_size > 0 else []
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name,
            versions=[str(m.version) for m in models],
            platform=sig.platform,
            inputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.inputs
            ],
            outputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.outputs
            ],
        )

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        model = self.repo.resolve(name, version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        return statistics_response(self.repo, name, version)

    # ---- repository --------------------------------------------------------------------------
    def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise Unimplemented("'repository_name' specification is not supported")
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.repo.index(ready_only=request.ready)
            ]
        )

    def load(self, request: pb.RepositoryModelLoadRequest) -> None:
        self.control.load(request)

    def unload(self, request: pb.RepositoryModelUnloadRequest) -> None:
        self.control.unload(request)

    # ---- settings ------------------------------------------------------------------------------
    def trace_settings(
        self, model: str, update: Mapping[str, list[str] | None] | None
    ) -> dict[str, list[str]]:
        """TraceSetting (docs/protocol.md#tracing): read, or update then read, the global
        settings ("") or a ready model's; the next request sees the change."""
        if model and not self.repo.is_model_ready(model):
            raise InvalidArgument(f"Request for unknown model : {model}")
        settings = self.tracer.settings(model, update)
        self._refresh()
        return settings

    def log_settings(
        self, update: Mapping[str, bool | int | str] | None
    ) -> dict[str, bool | int | str]:
        """LogSettings (docs/protocol.md#log-settings): read, or update then read."""
        if self.logs is None:
            raise Unimplemented("LogSettings is not available: logging was not configured")
        return self.logs.update(update)

    def _verbose(self, level: int) -> None:
        """The verbose level changed (LogSettings): the request log follows, live."""
        if level >= 1 and self.request_log is None:
            self.request_log = RequestLog()
        elif level < 1:
            self.request_log = None
        self._refresh()

    def _refresh(self) -> None:
        self.tracing = self.tracer.enabled
        self._plain = self.request_log is None and not self.tracing

    # ---- inference -----------------------------------------------------------------------------
    def infer(
        self,
        request: pb.ModelInferRequest,
        raws: Sequence[bytes | memoryview] | None,
        *,
        is_active: Callable[[], bool] | None = None,
        carrier: Mapping[str, str] | None = None,
        rpc: str = "ModelInfer",
    ) -> InferResult:
        """Run one request on the caller's thread; raises an `InferenceError` on failure."""
        if self._plain:
            return self._infer(request, raws, is_active, None)
        request_log, tracer = self.request_log, self.tracer
        trace = (
            tracer.start(request.model_name, request.id, carrier, rpc, request)
            if tracer.enabled
            else None
        )
        start = time.perf_counter_ns()
        status, version = "INTERNAL", ""
        result: InferResult | None = None
        error: BaseException | None = None
        try:
            result = self._infer(request, raws, is_active, trace)
            status, version = "OK", result.response.model_version
            return result
        except BaseException as exc:
            error = exc
            if isinstance(exc, InferenceError):
                status = exc.code.name
            raise
        finally:
            if request_log is not None:
                _log_line(request_log, rpc, request, version, status, start)
            if trace is not None:
                tracer.finish(
                    trace, error=error, response=result.response if result is not None else None
                )

    def submit(
        self,
        request: pb.ModelInferRequest,
        raws: Sequence[bytes | memoryview] | None,
        done: Done,
        *,
        is_active: Callable[[], bool] | None = None,
        carrier: Mapping[str, str] | None = None,
        rpc: str = "ModelStreamInfer",
    ) -> None:
        """The same lifecycle without blocking: `done` is called exactly once, on whichever
        thread completes the request (possibly this one, before `submit` returns)."""
        if self._plain:
            self._start(request, raws, done, is_active, 0, None)
            return
        if self.request_log is not None:
            done = self._logged(done, request, rpc)
        trace = None
        if self.tracer.enabled:
            trace = self.tracer.start(request.model_name, request.id, carrier, rpc, request)
            if trace is not None:
                done = self._traced(done, trace)
        self._start(request, raws, done, is_active, 0, trace)

    def _traced(self, done: Done, trace: Trace) -> Done:
        tracer = self.tracer

        def traced(result: InferResult | None, error: InferenceError | None) -> None:
            try:
                done(result, error)
            finally:
                response = result.response if result is not None else None
                tracer.finish(trace, error=error, response=response)

        return traced

    def refused(self, rpc: str, error: InferenceError) -> None:
        """A request the front end could not parse into a message: logged like the rest."""
        if self.request_log is not None:
            self.request_log(rpc, "", "", "", error.code.name, time.perf_counter_ns())

    def _logged(self, done: Done, request: pb.ModelInferRequest, rpc: str) -> Done:
        request_log, start = self.request_log, time.perf_counter_ns()
        assert request_log is not None

        def logged(result: InferResult | None, error: InferenceError | None) -> None:
            try:
                done(result, error)
            finally:
                status = "OK" if error is None else error.code.name
                version = result.response.model_version if result is not None else ""
                _log_line(request_log, rpc, request, version, status, start)

        return logged

    def _infer(
        self,
        request: pb.ModelInferRequest,
        raws: Sequence[bytes | memoryview] | None,
        is_active: Callable[[], bool] | None,
        trace: Trace | None,
    ) -> InferResult:
        for attempt in range(REROUTES + 1):
            call = self._begin(request, raws, is_active, trace)
            try:
                hit = call.cached()
                if hit is not None:
                    return self._finish(request, call, hit, cache_hit=True)
                try:
                    results = call.model.scheduler.infer(call.decoded.item)
                except Closed as exc:
                    if attempt < REROUTES and not self.state.exiting:
                        continue  # a reload retired the version it resolved: resolve again
                    self._failed(call, exc)
                    raise
                except BaseException as exc:
                    self._failed(call, exc)
                    raise
                call.store(results)
                return self._finish(request, call, results)
            finally:
                call.decoded.release()  # outputs in shared memory are written by now
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _start(
        self,
        request: pb.ModelInferRequest,
        raws: Sequence[bytes | memoryview] | None,
        done: Done,
        is_active: Callable[[], bool] | None,
        attempt: int,
        trace: Trace | None,
    ) -> None:
        try:
            call = self._begin(request, raws, is_active, trace)
        except InferenceError as exc:
            done(None, exc)
            return
        except Exception as exc:
            done(None, internal_error("ModelInfer", exc, request.id))
            return
        try:
            hit = call.cached()
            result = self._finish(request, call, hit, cache_hit=True) if hit is not None else None
        except InferenceError as exc:
            call.decoded.release()
            done(None, exc)
            return
        except Exception as exc:
            call.decoded.release()
            done(None, internal_error("ModelInfer", exc, request.id))
            return
        if result is not None:
            call.decoded.release()
            done(result, None)
            return

        answered = False

        def completed(results: object, error: InferenceError | None) -> None:
            # `done` is called once, outside every try: were it inside, a `done` that raised
            # (a front end whose loop closed) would be called again with an internal error.
            nonlocal answered
            answered = True
            result: InferResult | None = None
            try:
                if isinstance(error, Closed) and attempt < REROUTES and not self.state.exiting:
                    # A reload retired the version it resolved: resolve again.
                    self._start(request, raws, done, is_active, attempt + 1, trace)
                    return
                if error is not None:
                    self._failed(call, error)
                else:
                    call.store(results)  # type: ignore[arg-type]
                    result = self._finish(request, call, results)
            except InferenceError as exc:
                error = exc
            except Exception as exc:
                error = internal_error("ModelInfer", exc, request.id)
            finally:
                call.decoded.release()
            done(result, error)

        try:
            call.model.scheduler.submit(call.decoded.item, completed)
        except Exception as exc:  # submit reports refusals through `completed`; this is a bug
            call.decoded.release()
            if answered:  # `completed` ran (a refusal) and `done` itself raised: not again
                raise
            done(None, internal_error("ModelInfer", exc, request.id))

    def _begin(
        self,
        request: pb.ModelInferRequest,
        raws: Sequence[bytes | memoryview] | None,
        is_active: Callable[[], bool] | None,
        trace: Trace | None,
    ) -> _Call:
        """Resolve the model and validate the request (a failure here counts as OTHER)."""
        start = time.perf_counter_ns()
        if self.state.exiting:
            raise Unavailable("Server exiting")
        model = self.repo.resolve(request.model_name, request.model_version)
        if trace is not None:
            trace.version = str(model.version)
        try:
            decoded = decode_request(
                request,
                model.signature,
                max_tensor_bytes=self.state.max_tensor_bytes,
                is_active=is_active,
                raw=raws,
                shm=self.shm,
            )
        except BaseException as exc:
            model.stats.request_failure(
                total_ns=time.perf_counter_ns() - start, reason=_failure_reason(exc)
            )
            raise
        if trace is not None:
            trace.item = decoded.item
        return _Call(model, decoded, start)

    @staticmethod
    def _failed(call: _Call, exc: BaseException) -> None:
        reason = call.decoded.item.failure_reason or _failure_reason(exc)
        call.model.stats.request_failure(
            total_ns=time.perf_counter_ns() - call.start, reason=reason
        )

    def _finish(
        self,
        request: pb.ModelInferRequest,
        call: _Call,
        results: object,
        *,
        cache_hit: bool = False,
    ) -> InferResult:
        """Encode the response and record the request's statistics."""
        model, decoded = call.model, call.decoded
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(model.version), id=request.id
        )
        try:
            raws = encode_response(response, decoded, results, model.name)  # type: ignore[arg-type]
        except BaseException as exc:
            self._failed(call, exc)
            raise
        item = decoded.item
        if cache_hit:
            model.stats.request_cache_hit(
                total_ns=time.perf_counter_ns() - call.start,
                hit_ns=call.lookup_ns,
                now_ms=time.time_ns() // 1_000_000,
            )
            return InferResult(response, raws)
        model.stats.request_success(
            total_ns=time.perf_counter_ns() - call.start,
            queue_ns=item.queue_ns,
            compute_input_ns=item.compute_input_ns,
            compute_infer_ns=item.compute_infer_ns,
            compute_output_ns=item.compute_output_ns,
            rows=item.rows,
            now_ms=time.time_ns() // 1_000_000,
        )
        return InferResult(response, raws)
