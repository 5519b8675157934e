"""--grpc-restricted-protocol: each category refuses calls without its header and serves calls
with it; other categories are unaffected (docs/protocol.md#restricted-protocols).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

FLAG = "--grpc-restricted-protocol"
GROUP_A = ("health", "metadata", "inference")
GROUP_B = (
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
HEADERS_A = {"triton-grpc-protocol-ka": "va"}
HEADERS_B = {"triton-grpc-protocol-kb": "vb"}


def refused_text(key: str) -> str:
    return f"This protocol is restricted, expecting header 'triton-grpc-protocol-{key}'"


def simple_inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
        inputs.append(tensor)
    return inputs


def stream_infer(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None) -> Any:
    """One streamed request; returns the result, or raises the stream's error."""
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(lambda result, error: results.put(error or result), headers=headers)
    try:
        client.async_stream_infer("simple", simple_inputs())
        got = results.get(timeout=30)
    finally:
        client.stop_stream()
    if isinstance(got, Exception):
        raise got
    return got


def health_check(url: str, headers: dict[str, str] | None) -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        metadata = tuple(headers.items()) if headers else None
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata).status


def health_watch(url: str, headers: dict[str, str] | None) -> int:
    """The first status a grpc.health.v1 Watch stream sends (the restriction covers it too)."""
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        metadata = tuple(headers.items()) if headers else None
        stream = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata)
        try:
            return next(iter(stream)).status
        finally:
            stream.cancel()


# One call per category that must succeed (or fail for a reason other than the restriction).
CALLS: dict[str, Callable[[grpcclient.InferenceServerClient, str, Any], Any]] = {
    "health": lambda c, url, h: (
        c.is_server_live(headers=h),
        c.is_server_ready(headers=h),
        c.is_model_ready("simple", headers=h),
        health_check(url, h),
        health_watch(url, h),
    ),
    "metadata": lambda c, url, h: (
        c.get_server_metadata(headers=h),
        c.get_model_metadata("simple", headers=h),
    ),
    "inference": lambda c, url, h: (
        c.infer("simple", simple_inputs(), headers=h),
        stream_infer(c, h),
    ),
    "shared-memory": lambda c, url, h: c.get_system_shared_memory_status(headers=h),
    "model-config": lambda c, url, h: c.get_model_config("simple", headers=h),
    "model-repository": lambda c, url, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, url, h: c.get_inference_statistics("simple", headers=h),
    "trace": lambda c, url, h: c.get_trace_settings(headers=h),
    "logging": lambda c, url, h: c.get_log_settings(headers=h),
}


def not_restricted(call: Callable[[], Any]) -> None:
    """The call passes the restriction: it succeeds, or fails for its own reason (a method we
    do not implement answers UNIMPLEMENTED)."""
    try:
        call()
    except InferenceServerException as exc:
        assert "This protocol is restricted" not in (exc.message() or ""), exc.message()
        assert exc.status() != "StatusCode.UNAVAILABLE", exc.message()


def restricted(call: Callable[[], Any], key: str) -> None:
    with pytest.raises((InferenceServerException, grpc.RpcError)) as info:
        call()
    exc = info.value
    if isinstance(exc, grpc.RpcError):
        assert exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert exc.details() == refused_text(key)  # type: ignore[attr-defined]
    else:
        assert exc.status() == "StatusCode.UNAVAILABLE", exc.message()
        assert refused_text(key) in (exc.message() or ""), exc.message()


@pytest.fixture(scope="module")
def two_groups(server_factory):
    server = server_factory(
        MODEL_REPOSITORY,
        f"{FLAG}={','.join(GROUP_A)}:ka=va",
        f"{FLAG}={','.join(GROUP_B)}:kb=vb",
    )
    with grpcclient.InferenceServerClient(server.url) as client:
        yield server, client


@pytest.mark.parametrize("category", list(CALLS))
def test_each_category_needs_its_header(two_groups, category: str) -> None:
    server, client = two_groups
    key, good, other = (
        ("ka", HEADERS_A, HEADERS_B) if category in GROUP_A else ("kb", HEADERS_B, HEADERS_A)
    )
    call = CALLS[category]
    restricted(lambda: call(client, server.url, None), key)
    restricted(lambda: call(client, server.url, other), key)  # another group's header
    wrong = {name: value + "x" for name, value in good.items()}
    restricted(lambda: call(client, server.url, wrong), key)  # the right key, a wrong value
    not_restricted(lambda: call(client, server.url, {**good, "unrelated": "1"}))


def test_only_the_restricted_category_is_affected(server_factory) -> None:
    server = server_factory(MODEL_REPOSITORY, f"{FLAG}=model-repository:admin=s3cret")
    with grpcclient.InferenceServerClient(server.url) as client:
        for category, call in CALLS.items():
            if category == "model-repository":
                restricted(lambda call=call: call(client, server.url, None), "admin")
                not_restricted(
                    lambda call=call: call(
                        client, server.url, {"triton-grpc-protocol-admin": "s3cret"}
                    )
                )
            else:
                not_restricted(lambda call=call: call(client, server.url, None))
        assert health_check(server.url, None) == health_pb2.HealthCheckResponse.SERVING
