"""The synchronous client: one gRPC channel, numpy in and numpy out.

Every unary RPC goes through `Client._call` (blocking) or `Client._call_future` (a
concurrent.futures.Future on grpc's own `.future()`), the two places where timeouts, headers,
retries and error mapping happen, so no public method can forget one of them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from . import _codec
from ._errors import InferenceServerError
from ._options import (
    DEFAULT_KEEPALIVE,
    DEFAULT_RETRY,
    INT32_MAX,
    Headers,
    KeepAlive,
    Metadata,
    RetryPolicy,
    TLSConfig,
    channel_options,
    check_timeout,
    deprecated_alias,
    merge_metadata,
    normalize_metadata,
)
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import model_config_pb2
from ._types import (
    InferResult,
    ModelIndex,
    ModelMetadata,
    ParamValue,
    ServerMetadata,
    StreamResult,
)

T = TypeVar("T")


class CallFuture(Future[T]):
    """A concurrent.futures.Future for one SDK call (retries included).

    `result()` returns what the blocking method would, or raises its InferenceServerError.
    `cancel()` also cancels the RPC in flight, so the server stops waiting on it, and wakes
    `concurrent.futures.wait` / `as_completed` callers, like an executor's future does.

    States only ever move forward, each under the Future's own lock: PENDING to FINISHED
    (`_settle`, once: `set_result`/`set_exception` refuse a future that is already cancelled
    or finished, and `_settle` then drops the late outcome) or PENDING to CANCELLED (`cancel`).
    So an outcome that arrives while `cancel()` runs is dropped, never delivered, and the
    done-callbacks run exactly once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._rpc: grpc.Future[Any] | None = None
        self._cancel_lock = threading.Lock()
        self._waiters_told = False

    def cancel(self) -> bool:
        if not super().cancel():  # PENDING -> CANCELLED, or already cancelled
            return False
        # Future.cancel() alone leaves wait()/as_completed() waiting forever: only
        # set_running_or_notify_cancel() moves CANCELLED to CANCELLED_AND_NOTIFIED and tells
        # them (executors call it for their futures; nobody else does for ours). It may run
        # once only (a second call raises), so concurrent cancel()s elect one caller to do it.
        with self._cancel_lock:
            first, self._waiters_told = not self._waiters_told, True
        if first:
            self.set_running_or_notify_cancel()  # returns False: "was cancelled"
        rpc = self._rpc
        if rpc is not None:
            rpc.cancel()
        return True

    def _settle(self, value: T | None = None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)  # type: ignore[arg-type]
        except InvalidStateError:
            pass  # cancelled meanwhile: the caller no longer wants the outcome


class Client:
    """Blocking client for a KServe v2 / Triton-compatible gRPC server.

    `url` is "host:port". `timeout` (seconds) is the default limit for each call, retries
    included; a call's own `timeout=` replaces it. `headers` are gRPC metadata sent with every
    call (a call's own `headers=` add to them, replacing same-named ones). `wait_for_ready`
    makes calls wait for the channel to connect instead of failing fast with UNAVAILABLE, for
    callers that start with the server. `metadata` is the deprecated old name of `headers`.
    """

    def __init__(
        self,
        url: str,
        *,
        tls: TLSConfig | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        max_message_bytes: int = INT32_MAX,
        keepalive: KeepAlive = DEFAULT_KEEPALIVE,
        headers: Headers | None = None,
        wait_for_ready: bool = False,
        compression: grpc.Compression | None = None,
        channel_args: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        metadata: Headers | None = None,
    ) -> None:
        headers = deprecated_alias("headers", "metadata", headers, metadata)
        options = channel_options(
            max_message_bytes=max_message_bytes, keepalive=keepalive, tls=tls, extra=channel_args
        )
        channel: grpc.Channel
        if tls is not None:
            channel = grpc.secure_channel(url, tls.credentials(), options, compression)
        else:
            channel = grpc.insecure_channel(url, options, compression)
        self._raw_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.url = url
        self._timeout = check_timeout(timeout)
        self._retry = retry
        self._headers = normalize_metadata(headers)
        self._wait_for_ready = wait_for_ready
        self._input_types = _codec.InputTypes()

    # -- plumbing ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        sleep = self._retry.sleep if self._retry is not None else None
        (sleep or time.sleep)(seconds)

    def _end(self, timeout: float | None) -> float | None:
        """The monotonic time a call must end by (None: never), from a call's `timeout=`
        or the client's default. Computed once per public call and shared by every RPC it
        makes (cast=True's metadata fetch, retries), so the call as a whole keeps to it."""
        budget = check_timeout(timeout) if timeout is not None else self._timeout
        return None if budget is None else time.monotonic() + budget

    def _retry_delay(
        self, attempt: int, error: InferenceServerError, *, infer: bool, end: float | None
    ) -> float | None:
        if self._retry is None:
            return None
        left = None if end is None else end - time.monotonic()
        return self._retry.delay_before_retry(attempt, error.code, infer=infer, time_left=left)

    def _call(
        self,
        rpc: str,
        request: Any,
        *,
        infer: bool = False,
        retryable: bool = True,
        end: float | None,
        headers: Headers | None = None,
    ) -> Any:
        """One RPC with retries. `infer` = not idempotent: retried on UNAVAILABLE only.
        `retryable=False` (model load/unload): never retried, since those change what the
        server runs and their UNAVAILABLE ("model control is off") is permanent."""
        method = getattr(self._stub, rpc)
        metadata = merge_metadata(self._headers, headers)
        attempt = 1
        while True:
            try:
                return method(
                    request,
                    timeout=None if end is None else max(0.0, end - time.monotonic()),
                    metadata=metadata,
                    wait_for_ready=self._wait_for_ready,
                )
            except grpc.RpcError as exc:
                error = InferenceServerError.from_rpc_error(exc)
                delay = self._retry_delay(attempt, error, infer=infer, end=end)
                if delay is None or not retryable:
                    raise error from exc
            self._sleep(delay)
            attempt += 1

    def _call_future(
        self,
        rpc: str,
        request: Any,
        decode: Callable[[Any], T],
        *,
        infer: bool = False,
        end: float | None,
        headers: Headers | None = None,
    ) -> CallFuture[T]:
        """`_call` without blocking: grpc's `.future()` carries the call, and its done-callback
        (on grpc's thread) settles our future or starts the next attempt. No thread per call;
        a retry waits on a timer thread, or runs `RetryPolicy.sleep` on the callback thread."""
        method = getattr(self._stub, rpc)
        metadata = merge_metadata(self._headers, headers)
        future: CallFuture[T] = CallFuture()

        def start(attempt: int) -> None:
            if future.done():
                return
            rpc_future = method.future(
                request,
                timeout=None if end is None else max(0.0, end - time.monotonic()),
                metadata=metadata,
                wait_for_ready=self._wait_for_ready,
            )
            future._rpc = rpc_future
            if future.cancelled():  # cancel() ran before _rpc was set
                rpc_future.cancel()
                return
            rpc_future.add_done_callback(lambda done: finished(done, attempt))

        def finished(done: Any, attempt: int) -> None:
            if future.done():
                return
            try:
                response = done.result()
            except grpc.FutureCancelledError:
                future._settle(error=InferenceServerError(grpc.StatusCode.CANCELLED, "cancelled"))
                return
            except grpc.RpcError as exc:
                error = InferenceServerError.from_rpc_error(exc)
                error.__cause__ = exc
                delay = self._retry_delay(attempt, error, infer=infer, end=end)
                if delay is None:
                    future._settle(error=error)
                elif self._retry is not None and self._retry.sleep is not None:
                    self._retry.sleep(delay)
                    start(attempt + 1)
                else:
                    timer = threading.Timer(delay, start, (attempt + 1,))
                    timer.daemon = True
                    timer.start()
                return
            try:
                value = decode(response)
            except Exception as exc:  # noqa: BLE001 - a decode error belongs to the future
                future._settle(error=exc)
                return
            future._settle(value)

        start(1)
        return future

    def close(self) -> None:
        """Close the channel; in-flight calls and open streams are cancelled."""
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- health and metadata -------------------------------------------------------------
    # Every method takes `headers=` (extra gRPC metadata for this call) and `timeout=`
    # (seconds for this call, retries included; None = the client's default).

    def is_live(self, *, headers: Headers | None = None, timeout: float | None = None) -> bool:
        response = self._call(
            "ServerLive", pb.ServerLiveRequest(), headers=headers, end=self._end(timeout)
        )
        return bool(response.live)

    def is_ready(self, *, headers: Headers | None = None, timeout: float | None = None) -> bool:
        request = pb.ServerReadyRequest()
        return bool(
            self._call("ServerReady", request, headers=headers, end=self._end(timeout)).ready
        )

    def is_model_ready(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(
            self._call("ModelReady", request, headers=headers, end=self._end(timeout)).ready
        )

    def server_metadata(
        self, *, headers: Headers | None = None, timeout: float | None = None
    ) -> ServerMetadata:
        request = pb.ServerMetadataRequest()
        response = self._call("ServerMetadata", request, headers=headers, end=self._end(timeout))
        return _codec.server_metadata(response)

    def model_metadata(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=name, version=version)
        response = self._call("ModelMetadata", request, headers=headers, end=self._end(timeout))
        return _codec.model_metadata(response)

    def model_config(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> model_config_pb2.ModelConfig:
        request = pb.ModelConfigRequest(name=name, version=version)
        response = self._call("ModelConfig", request, headers=headers, end=self._end(timeout))
        config: model_config_pb2.ModelConfig = response.config
        return config

    def statistics(
        self,
        name: str = "",
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> list[pb.ModelStatistics]:
        """ModelStatistics messages (all models when `name` is ""): their depth is the point."""
        request = pb.ModelStatisticsRequest(name=name, version=version)
        response = self._call("ModelStatistics", request, headers=headers, end=self._end(timeout))
        return list(response.model_stats)

    # -- model repository ------------------------------------------------------------------

    def repository_index(
        self,
        *,
        ready_only: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> list[ModelIndex]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        response = self._call("RepositoryIndex", request, headers=headers, end=self._end(timeout))
        return _codec.repository_index(response)

    def load_model(
        self,
        name: str,
        *,
        config: str | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load, or reload, a model (the server must run in explicit model-control mode).

        `config` (model config as JSON text or a JSON-able mapping) replaces the model's
        config.pbtxt for this load; `files` maps paths in the model directory to their
        contents, for servers that support them (Triton does; Tributary refuses them).
        Returns when the server has finished loading; a failed load raises.
        """
        request = _codec.load_request(name, config=config, files=files)
        self._input_types.forget(name)
        try:
            self._call(
                "RepositoryModelLoad",
                request,
                retryable=False,
                headers=headers,
                end=self._end(timeout),
            )
        finally:
            self._input_types.forget(name)

    def unload_model(
        self,
        name: str,
        *,
        unload_dependents: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> None:
        """Unload every version of a model; returns once the server has unloaded it."""
        request = _codec.unload_request(name, unload_dependents=unload_dependents)
        try:
            self._call(
                "RepositoryModelUnload",
                request,
                retryable=False,
                headers=headers,
                end=self._end(timeout),
            )
        finally:
            self._input_types.forget(name)

    # -- inference -----------------------------------------------------------------------

    def _inputs_for(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, Any],
        cast: bool,
        headers: Headers | None,
        end: float | None,
    ) -> Mapping[str, Any]:
        """`inputs`, cast to the model's datatypes when asked; ModelMetadata is fetched once
        per (model, version) and kept until this client loads or unloads that model. The
        fetch counts against the inference call's own deadline `end`."""
        if not cast:
            return inputs
        datatypes = self._input_types.get(model, version)
        if datatypes is None:
            request = pb.ModelMetadataRequest(name=model, version=version)
            response = self._call("ModelMetadata", request, headers=headers, end=end)
            meta = _codec.model_metadata(response)
            datatypes = self._input_types.remember(model, version, meta)
        return _codec.cast_inputs(inputs, datatypes, model)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
        priority: int | None = None,
        timeout_us: int | None = None,
        classification: Mapping[str, int] | None = None,
        cast: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> InferResult:
        """Run one inference.

        Each input's datatype comes from its numpy dtype (object/str/bytes arrays are BYTES);
        a mismatch with the model is the server's INVALID_ARGUMENT, unless `cast=True`
        converts inputs to the model's datatypes first (int -> int only when every value fits,
        int/float -> float unless a value overflows to inf; see docs/sdk.md).
        `outputs` None means all of the model's outputs. `classification` maps an output to
        its top-k count. `timeout_us` is the server-side queue timeout; `timeout` (seconds) is
        the client-side limit for the whole call, retries included (`deadline` is its
        deprecated old name).
        """
        timeout = deprecated_alias("timeout", "deadline", timeout, deadline)
        end = self._end(timeout)  # one deadline for the metadata fetch and the inference
        inputs = self._inputs_for(model, version, inputs, cast, headers, end)
        request = _codec.build_request(
            model,
            inputs,
            version=version,
            request_id=request_id,
            outputs=outputs,
            parameters=parameters,
            priority=priority,
            timeout_us=timeout_us,
            classification=classification,
        )
        response = self._call("ModelInfer", request, infer=True, headers=headers, end=end)
        return _codec.decode_response(response)

    def infer_async(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        parameters: Mapping[str, ParamValue] | None = None,
        priority: int | None = None,
        timeout_us: int | None = None,
        classification: Mapping[str, int] | None = None,
        cast: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> CallFuture[InferResult]:
        """`infer` without waiting: returns a concurrent.futures.Future of the InferResult.

        For many requests in flight from plain threads-free code; use `add_done_callback` for
        a callback, `concurrent.futures.wait`/`as_completed` to gather. The request is built
        (and with `cast=True` the model's metadata fetched, once) before this returns; errors
        in the arguments raise here, server errors come out of `result()`.
        """
        end = self._end(timeout)  # one deadline for the metadata fetch and the inference
        inputs = self._inputs_for(model, version, inputs, cast, headers, end)
        request = _codec.build_request(
            model,
            inputs,
            version=version,
            request_id=request_id,
            outputs=outputs,
            parameters=parameters,
            priority=priority,
            timeout_us=timeout_us,
            classification=classification,
        )
        return self._call_future(
            "ModelInfer",
            request,
            _codec.decode_response,
            infer=True,
            headers=headers,
            end=end,
        )

    def stream(
        self,
        model: str,
        *,
        version: str = "",
        timeout: float | None = None,
        headers: Headers | None = None,
    ) -> InferStream:
        """Open a ModelStreamInfer stream to one model; see InferStream.

        `timeout` bounds the whole stream (not each request); streams are never retried.
        """
        metadata = merge_metadata(self._headers, headers)
        return InferStream(self._stub, model, version, metadata, check_timeout(timeout))


class InferStream(Iterator[StreamResult]):
    """A bidirectional inference stream: `send()` requests, iterate `StreamResult`s in order.

    Sending and receiving are independent, so a producer thread may send while another
    iterates. `close()` says "no more requests"; iteration then ends after the last answer.
    Leaving the `with` block cancels the stream: answers not yet read are dropped.
    A broken stream (cancelled, deadline, server gone) raises InferenceServerError.
    """

    def __init__(
        self,
        stub: pb_grpc.GRPCInferenceServiceStub,
        model: str,
        version: str,
        metadata: Metadata,
        timeout: float | None,
    ) -> None:
        self.model = model
        self.version = version
        self._requests: queue.SimpleQueue[pb.ModelInferRequest | None] = queue.SimpleQueue()
        self._closed = False
        self._call = stub.ModelStreamInfer(self._outgoing(), metadata=metadata, timeout=timeout)

    def _outgoing(self) -> Iterator[pb.ModelInferRequest]:
        # Runs on grpc's sender thread; None is the half-close sentinel from close().
        while (request := self._requests.get()) is not None:
            yield request

    def send(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        request_id: str = "",
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
        priority: int | None = None,
        timeout_us: int | None = None,
        classification: Mapping[str, int] | None = None,
    ) -> None:
        """Queue one request; give each a distinct `request_id` to match answers to it."""
        if self._closed:
            raise RuntimeError("send() on a closed stream")
        self._requests.put(
            _codec.build_request(
                self.model,
                inputs,
                version=self.version,
                request_id=request_id,
                outputs=outputs,
                parameters=parameters,
                priority=priority,
                timeout_us=timeout_us,
                classification=classification,
            )
        )

    def close(self) -> None:
        """Stop sending; answers to requests already sent still arrive."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)

    def cancel(self) -> None:
        """Abort the stream now, dropping answers not yet received."""
        self.close()
        self._call.cancel()

    def __next__(self) -> StreamResult:
        try:
            response = next(self._call)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc_error(exc) from exc
        return _codec.decode_stream_response(response)

    def __enter__(self) -> InferStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
