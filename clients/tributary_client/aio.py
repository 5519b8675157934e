"""The asyncio client: `Client`'s methods as coroutines over a grpc.aio channel.

Message building, decoding, retry decisions and errors are shared with the sync client
(`_codec`, `_options`, `_errors`); only waiting differs. Create it inside a running event loop:
grpc.aio channels bind to the loop they are first used on.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
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
    StreamRequest,
    StreamResult,
)

StreamItem = StreamRequest | Mapping[str, np.ndarray]


class AsyncClient:
    """asyncio twin of `tributary_client.Client`; same arguments, same semantics.

    `interceptors` takes grpc.aio client interceptors. `RetryPolicy.sleep` may be a plain
    function or a coroutine function; by default asyncio.sleep is used.
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
        extra: dict[str, Any] = {"interceptors": list(interceptors) or None}
        if tls is not None:
            self._channel = grpc.aio.secure_channel(
                url, tls.credentials(), options, compression, **extra
            )
        else:
            self._channel = grpc.aio.insecure_channel(url, options, compression, **extra)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.url = url
        self._timeout = timeout
        self._retry = retry
        self._metadata = normalize_metadata(metadata)
        self._wait_for_ready = wait_for_ready

    # -- plumbing ------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        sleep = self._retry.sleep if self._retry is not None else None
        outcome = (sleep or asyncio.sleep)(seconds)
        if inspect.isawaitable(outcome):
            await outcome

    async def _call(
        self, rpc: str, request: Any, *, infer: bool = False, deadline: float | None = None
    ) -> Any:
        method = getattr(self._stub, rpc)
        budget = deadline if deadline is not None else self._timeout
        end = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            try:
                return await method(
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
            await self._sleep(delay)
            attempt += 1

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- health and metadata -------------------------------------------------------------

    async def is_live(self) -> bool:
        return (await self._call("ServerLive", pb.ServerLiveRequest())).live

    async def is_ready(self) -> bool:
        return (await self._call("ServerReady", pb.ServerReadyRequest())).ready

    async def is_model_ready(self, name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return (await self._call("ModelReady", request)).ready

    async def server_metadata(self) -> ServerMetadata:
        response = await self._call("ServerMetadata", pb.ServerMetadataRequest())
        return _codec.server_metadata(response)

    async def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=name, version=version)
        return _codec.model_metadata(await self._call("ModelMetadata", request))

    async def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        request = pb.ModelConfigRequest(name=name, version=version)
        return (await self._call("ModelConfig", request)).config

    async def statistics(self, name: str = "", version: str = "") -> list[pb.ModelStatistics]:
        request = pb.ModelStatisticsRequest(name=name, version=version)
        return list((await self._call("ModelStatistics", request)).model_stats)

    async def repository_index(self, *, ready_only: bool = False) -> list[ModelIndex]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        return _codec.repository_index(await self._call("RepositoryIndex", request))

    # -- inference -----------------------------------------------------------------------

    async def infer(
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
        """See `Client.infer`."""
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
        response = await self._call("ModelInfer", request, infer=True, deadline=deadline)
        return _codec.decode_response(response)

    async def stream(
        self,
        model: str,
        requests: AsyncIterable[StreamItem] | Iterable[StreamItem],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """Stream `requests` (StreamRequest, or a bare inputs mapping) to one model.

        Yields one StreamResult per answer, in request order for non-decoupled models; a bad
        request yields an error result and the stream goes on. Leaving the loop early
        cancels the stream. A broken stream raises InferenceServerError.
        """

        def message(item: StreamItem) -> pb.ModelInferRequest:
            spec = item if isinstance(item, StreamRequest) else StreamRequest(inputs=item)
            return _codec.build_request(
                model,
                spec.inputs,
                version=version,
                request_id=spec.request_id,
                outputs=spec.outputs,
                parameters=spec.parameters,
                priority=spec.priority,
                timeout_us=spec.timeout_us,
                classification=spec.classification,
            )

        async def outgoing() -> AsyncIterator[pb.ModelInferRequest]:
            if isinstance(requests, AsyncIterable):
                async for item in requests:
                    yield message(item)
            else:
                for item in requests:
                    yield message(item)

        call = self._stub.ModelStreamInfer(outgoing(), metadata=self._metadata, timeout=timeout)
        try:
            async for response in call:
                yield _codec.decode_stream_response(response)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc_error(exc) from exc
        finally:
            call.cancel()
