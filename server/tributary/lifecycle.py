"""The inference request lifecycle, once for every transport (`DataPlane` inherits it).

Resolve the model version, validate the request against its signature
(`codec.decode_request`), answer from the response cache or schedule it, encode the reply,
count statistics, write the --log-verbose line and the trace, route a request again when a
reload retired the version it resolved, and give back shared-memory leases. Two entry points:
`infer` blocks its caller; `submit` calls `done` exactly once from whichever thread completes
the request. Nothing here imports grpc or an HTTP library (tests/unit/test_dataplane.py runs
it in-process). See docs/architecture.md for the path of one request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tributary_client._proto import grpc_service_pb2 as pb

from .codec import DecodedRequest, decode_request, encode_response
from .errors import Cancelled, InferenceError, Internal, Unavailable
from .logs import RequestLog
from .repository import ModelRepository, Servable
from .scheduler import Closed
from .scheduler.cache import ModelCache
from .shm import SharedMemory
from .tracing import Trace, Tracer

if TYPE_CHECKING:
    from .dataplane import ServerState

log = logging.getLogger("tributary.dataplane")

REROUTES = 2
"""Times a request whose version was retired under it (reload, unload) is routed again."""

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


class Lifecycle:
    """The inference half of `DataPlane`: it sets these attributes, this class uses them."""

    repo: ModelRepository
    state: ServerState
    shm: SharedMemory
    tracer: Tracer
    request_log: RequestLog | None
    _plain: bool

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
        item.count_success(model.stats, time.perf_counter_ns() - call.start)
        return InferResult(response, raws)
