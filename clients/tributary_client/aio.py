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
    Headers,
    KeepAlive,
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
    StreamRequest,
    StreamResult,
)

StreamItem = StreamRequest | Mapping[str, np.ndarray]


class AsyncClient:
    """asyncio twin of `tributary_client.Client`; same arguments, same semantics.

    `interceptors` takes grpc.aio client interceptors. `RetryPolicy.sleep` may be a plain
    function or a coroutine function; by default asyncio.sleep is used. For concurrency,
    gather coroutines (there is no `infer_async`: `infer` already is one).
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
        chosen = list(interceptors) or None
        if tls is not None:
            self._channel = grpc.aio.secure_channel(
                url, tls.credentials(), options, compression, interceptors=chosen
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                url, options, compression, interceptors=chosen
            )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.url = url
        self._timeout = check_timeout(timeout)
        self._retry = retry
        self._headers = normalize_metadata(headers)
        self._wait_for_ready = wait_for_ready
        self._input_types = _codec.InputTypes()

    # -- plumbing ------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        sleep = self._retry.sleep if self._retry is not None else None
        outcome = (sleep or asyncio.sleep)(seconds)
        if inspect.isawaitable(outcome):
            await outcome

    def _end(self, timeout: float | None) -> float | None:
        """See `Client._end`: one deadline per public call, shared by all its RPCs."""
        budget = check_timeout(timeout) if timeout is not None else self._timeout
        return None if budget is None else time.monotonic() + budget

    async def _call(
        self,
        rpc: str,
        request: Any,
        *,
        infer: bool = False,
        retryable: bool = True,
        end: float | None,
        headers: Headers | None = None,
    ) -> Any:
        method = getattr(self._stub, rpc)
        metadata = merge_metadata(self._headers, headers)
        attempt = 1
        while True:
            try:
                return await method(
                    request,
                    timeout=None if end is None else max(0.0, end - time.monotonic()),
                    metadata=metadata,
                    wait_for_ready=self._wait_for_ready,
                )
            except grpc.RpcError as exc:
                error = InferenceServerError.from_rpc_error(exc)
                delay = None
                if self._retry is not None and retryable:
                    left = None if end is None else end - time.monotonic()
                    delay = self._retry.delay_before_retry(
                        attempt, error.code, infer=infer, time_left=left
                    )
                if delay is None:
                    raise error from exc
            await self._sleep(delay)
            attempt += 1

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- health and metadata (each takes headers= and timeout=, as in Client) --------------

    async def is_live(
        self, *, headers: Headers | None = None, timeout: float | None = None
    ) -> bool:
        request = pb.ServerLiveRequest()
        return bool(
            (await self._call("ServerLive", request, headers=headers, end=self._end(timeout))).live
        )

    async def is_ready(
        self, *, headers: Headers | None = None, timeout: float | None = None
    ) -> bool:
        request = pb.ServerReadyRequest()
        response = await self._call("ServerReady", request, headers=headers, end=self._end(timeout))
        return bool(response.ready)

    async def is_model_ready(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        response = await self._call("ModelReady", request, headers=headers, end=self._end(timeout))
        return bool(response.ready)

    async def server_metadata(
        self, *, headers: Headers | None = None, timeout: float | None = None
    ) -> ServerMetadata:
        request = pb.ServerMetadataRequest()
        response = await self._call(
            "ServerMetadata", request, headers=headers, end=self._end(timeout)
        )
        return _codec.server_metadata(response)

    async def model_metadata(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=name, version=version)
        response = await self._call(
            "ModelMetadata", request, headers=headers, end=self._end(timeout)
        )
        return _codec.model_metadata(response)

    async def model_config(
        self,
        name: str,
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> model_config_pb2.ModelConfig:
        request = pb.ModelConfigRequest(name=name, version=version)
        response = await self._call("ModelConfig", request, headers=headers, end=self._end(timeout))
        config: model_config_pb2.ModelConfig = response.config
        return config

    async def statistics(
        self,
        name: str = "",
        version: str = "",
        *,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> list[pb.ModelStatistics]:
        request = pb.ModelStatisticsRequest(name=name, version=version)
        response = await self._call(
            "ModelStatistics", request, headers=headers, end=self._end(timeout)
        )
        return list(response.model_stats)

    # -- model repository ------------------------------------------------------------------

    async def repository_index(
        self,
        *,
        ready_only: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> list[ModelIndex]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        response = await self._call(
            "RepositoryIndex", request, headers=headers, end=self._end(timeout)
        )
        return _codec.repository_index(response)

    async def load_model(
        self,
        name: str,
        *,
        config: str | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> None:
        """See `Client.load_model`."""
        request = _codec.load_request(name, config=config, files=files)
        self._input_types.forget(name)
        try:
            await self._call(
                "RepositoryModelLoad",
                request,
                retryable=False,
                headers=headers,
                end=self._end(timeout),
            )
        finally:
            self._input_types.forget(name)

    async def unload_model(
        self,
        name: str,
        *,
        unload_dependents: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
    ) -> None:
        """See `Client.unload_model`."""
        request = _codec.unload_request(name, unload_dependents=unload_dependents)
        try:
            await self._call(
                "RepositoryModelUnload",
                request,
                retryable=False,
                headers=headers,
                end=self._end(timeout),
            )
        finally:
            self._input_types.forget(name)

    # -- inference -----------------------------------------------------------------------

    async def _inputs_for(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, Any],
        cast: bool,
        headers: Headers | None,
        end: float | None,
    ) -> Mapping[str, Any]:
        if not cast:
            return inputs
        datatypes = self._input_types.get(model, version)
        if datatypes is None:
            request = pb.ModelMetadataRequest(name=model, version=version)
            response = await self._call("ModelMetadata", request, headers=headers, end=end)
            meta = _codec.model_metadata(response)
            datatypes = self._input_types.remember(model, version, meta)
        return _codec.cast_inputs(inputs, datatypes, model)

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
        cast: bool = False,
        headers: Headers | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> InferResult:
        """See `Client.infer`."""
        timeout = deprecated_alias("timeout", "deadline", timeout, deadline)
        end = self._end(timeout)  # one deadline for the metadata fetch and the inference
        inputs = await self._inputs_for(model, version, inputs, cast, headers, end)
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
        response = await self._call("ModelInfer", request, infer=True, headers=headers, end=end)
        return _codec.decode_response(response)

    async def stream(
        self,
        model: str,
        requests: AsyncIterable[StreamItem] | Iterable[StreamItem],
        *,
        version: str = "",
        timeout: float | None = None,
        headers: Headers | None = None,
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

        metadata = merge_metadata(self._headers, headers)
        timeout = check_timeout(timeout)
        call = self._stub.ModelStreamInfer(outgoing(), metadata=metadata, timeout=timeout)
        try:
            async for response in call:
                yield _codec.decode_stream_response(response)
        except grpc.RpcError as exc:
            raise InferenceServerError.from_rpc_error(exc) from exc
        finally:
            call.cancel()
