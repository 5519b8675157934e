"""The synchronous client: one gRPC channel, numpy in and numpy out.

Every RPC goes through `Client._call`, the one place where deadlines, metadata, retries and
error mapping happen, so no public method can forget one of them.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from . import _codec
from ._errors import InferenceServerError
from ._options import (
    DEFAULT_KEEPALIVE,
    DEFAULT_RETRY,
    INT32_MAX,
    KeepAlive,
    RetryPolicy,
    TLSConfig,
    channel_options,
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


class Client:
    """Blocking client for a KServe v2 / Triton-compatible gRPC server.

    `url` is "host:port". `timeout` (seconds) bounds each call, retries included, unless the
    call passes its own `deadline`. `wait_for_ready` makes calls wait for the channel to
    connect instead of failing fast with UNAVAILABLE, for callers that start with the server.
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
        metadata: Mapping[str, str] | None = None,
        wait_for_ready: bool = False,
        compression: grpc.Compression | None = None,
        channel_args: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ) -> None:
        options = channel_options(
            max_message_bytes=max_message_bytes, keepalive=keepalive, tls=tls, extra=channel_args
        )
        if tls is not None:
            channel = grpc.secure_channel(url, tls.credentials(), options, compression)
        else:
            channel = grpc.insecure_channel(url, options, compression)
        self._raw_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.url = url
        self._timeout = timeout
        self._retry = retry
        self._metadata = normalize_metadata(metadata)
        self._wait_for_ready = wait_for_ready

    # -- plumbing ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        sleep = self._retry.sleep if self._retry is not None else None
        (sleep or time.sleep)(seconds)

    def _call(
        self, rpc: str, request: Any, *, infer: bool = False, deadline: float | None = None
    ) -> Any:
        method = getattr(self._stub, rpc)
        budget = deadline if deadline is not None else self._timeout
        end = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            try:
                return method(
                    request,
                    timeout=None if end is None else max(0.0, end - time.monotonic()),
                    metadata=self._metadata,
                    wait_for_ready=self._wait_for_ready,
                )
            except grpc.RpcError as exc:
                error = InferenceServerError.from_rpc_error(exc)
                delay = None
                if self._retry is not None:
                    left = None if end is None else end - time.monotonic()
                    delay = self._retry.delay_before_retry(
                        attempt, error.code, infer=infer, time_left=left
                    )
                if delay is None:
                    raise error from exc
            self._sleep(delay)
            attempt += 1

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

    def is_live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def is_ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version)).ready

    def server_metadata(self) -> ServerMetadata:
        return _codec.server_metadata(self._call("ServerMetadata", pb.ServerMetadataRequest()))

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=name, version=version)
        return _codec.model_metadata(self._call("ModelMetadata", request))

    def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        return self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version)).config

    def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        """ModelStatistics messages (all models when `name` is ""): their depth is the point."""
        request = pb.ModelStatisticsRequest(name=name, version=version)
        return list(self._call("ModelStatistics", request).model_stats)

    def repository_index(self, *, ready_only: bool = False) -> list[ModelIndex]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        return _codec.repository_index(self._call("RepositoryIndex", request))

    # -- inference -----------------------------------------------------------------------

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
        deadline: float | None = None,
    ) -> InferResult:
        """Run one inference.

        Each input's datatype comes from its numpy dtype (object/str/bytes arrays are BYTES).
        `outputs` None means all of the model's outputs. `classification` maps an output to
        its top-k count. `timeout_us` is the server-side queue timeout; `deadline` (seconds)
        is the client-side limit for the whole call, retries included.
        """
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
        return _codec.decode_response(
            self._call("ModelInfer", request, infer=True, deadline=deadline)
        )

    def stream(self, model: str, *, version: str = "", timeout: float | None = None) -> InferStream:
        """Open a ModelStreamInfer stream to one model; see InferStream."""
        return InferStream(self._stub, model, version, self._metadata, timeout)


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
        metadata: tuple[tuple[str, str], ...],
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
