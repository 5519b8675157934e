"""The SDK features tritonclient / KServe client users look for, end to end: per-call headers
and timeouts (checked where they arrive: a recording gRPC proxy in front of a real server),
futures from sync code, explicit casts to the model's datatypes, and model load / unload.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, as_completed, wait
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from sdk_support import CountingInterceptor, RecordingProxy, refused_url, simple_inputs
from sklearn.datasets import load_digits

from tributary_client import (
    AsyncClient,
    CallFuture,
    Client,
    InferenceServerError,
    RetryPolicy,
    _codec,
)
from tributary_client._proto import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"
DIGITS = load_digits()  # float64 images, what users of the digits model actually have


@pytest.fixture(scope="module")
def proxy(server) -> Iterator[RecordingProxy]:
    recorder = RecordingProxy(server.url)
    yield recorder
    recorder.close()


@pytest.fixture
def dead_url() -> Iterator[str]:
    with refused_url() as url:
        yield url


# -- headers and timeouts ---------------------------------------------------------------------


def test_headers_on_every_sync_call_merge_over_client_defaults(proxy: RecordingProxy) -> None:
    defaults = {"Authorization": "Bearer abc", "x-tenant": "default"}
    with Client(proxy.url, headers=defaults, timeout=30) as client:
        calls = {
            "ServerLive": lambda h: client.is_live(headers=h),
            "ServerReady": lambda h: client.is_ready(headers=h),
            "ModelReady": lambda h: client.is_model_ready("simple", headers=h),
            "ServerMetadata": lambda h: client.server_metadata(headers=h),
            "ModelMetadata": lambda h: client.model_metadata("simple", headers=h),
            "ModelConfig": lambda h: client.model_config("simple", headers=h),
            "ModelStatistics": lambda h: client.statistics("simple", headers=h),
            "RepositoryIndex": lambda h: client.repository_index(headers=h),
            "ModelInfer": lambda h: client.infer("simple", simple_inputs(), headers=h),
        }
        for method, call in calls.items():
            call({"X-Tenant": "per-call", "x-call": method})
            seen = proxy.last(method).headers
            assert seen["authorization"] == "Bearer abc", method
            assert (seen["x-tenant"], seen["x-call"]) == ("per-call", method)

        future = client.infer_async("simple", simple_inputs(), headers={"x-call": "future"})
        assert future.result(timeout=30)["OUTPUT0"].shape == (1, 16)
        seen = proxy.last("ModelInfer").headers
        assert (seen["x-call"], seen["x-tenant"]) == ("future", "default")

        with client.stream("simple", headers={"trace-bin": b"\x00\xff"}) as stream:
            stream.send(simple_inputs(), request_id="s")
            stream.close()
            assert [a.id for a in stream] == ["s"]
        seen = proxy.last("ModelStreamInfer").headers
        assert (seen["trace-bin"], seen["authorization"]) == (b"\x00\xff", "Bearer abc")

        # model control travels with headers too (this server refuses it: polling mode)
        with pytest.raises(InferenceServerError) as info:
            client.load_model("simple", headers={"x-call": "load"})
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert proxy.last("RepositoryModelLoad").headers["x-call"] == "load"
        with pytest.raises(InferenceServerError):
            client.unload_model("simple", headers={"x-call": "unload"})
        assert proxy.last("RepositoryModelUnload").headers["x-call"] == "unload"
    assert [s.method for s in proxy.seen].count("RepositoryModelLoad") == 1  # never retried


def test_headers_on_asyncio_calls(proxy: RecordingProxy) -> None:
    async def scenario() -> None:
        async with AsyncClient(proxy.url, headers={"x-tenant": "aio"}, timeout=30) as client:
            assert await client.is_ready(headers={"x-call": "ready"})
            result = await client.infer("simple", simple_inputs(), headers={"x-call": "infer"})
            assert result["OUTPUT0"].shape == (1, 16)
            index = await client.repository_index(headers={"x-call": "index"})
            assert "simple" in {m.name for m in index}
            answers = [
                a async for a in client.stream("simple", [simple_inputs()], headers={"x-s": "1"})
            ]
            assert len(answers) == 1 and answers[0].ok

    asyncio.run(scenario())
    for method, call in (("ServerReady", "ready"), ("ModelInfer", "infer")):
        seen = proxy.last(method).headers
        assert (seen["x-tenant"], seen["x-call"]) == ("aio", call)
    assert proxy.last("RepositoryIndex").headers["x-call"] == "index"
    assert proxy.last("ModelStreamInfer").headers["x-s"] == "1"


def test_header_values_are_checked_before_sending(proxy: RecordingProxy) -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        Client(proxy.url, headers={"trace-bin": "text"})
    with Client(proxy.url) as client:
        with pytest.raises(TypeError, match="needs a str value"):
            client.is_live(headers={"x-raw": b"\x00"})


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"x y": "v"}, r"header name 'x y' is not valid gRPC metadata"),
        ({"caf\u00e9": "v"}, "is not valid gRPC metadata"),
        ({"\u212a": "v"}, "is not valid gRPC metadata"),  # KELVIN SIGN: lower() is ASCII "k"
        ({":authority": "evil"}, "is not valid gRPC metadata"),
        ({"x-a\n": "v"}, "is not valid gRPC metadata"),
        ({"grpc-timeout": "1S"}, "names starting with 'grpc-' are reserved"),
        ({"Grpc-Trace": "t"}, "names starting with 'grpc-' are reserved"),
        ({"authorization": "Bearer abc\nx-evil: 1"}, r"its value has '\\n' at index 10"),
        ({"x-tenant": "caf\u00e9"}, "its value has '\u00e9' at index 3"),
        ({"x-tenant": "a\tb"}, "printable ASCII"),
    ],
)
def test_invalid_header_names_and_values_raise_before_sending(
    proxy: RecordingProxy, headers: dict[str, str], match: str
) -> None:
    """grpc itself only notices at call time, and fails the call with INTERNAL."""
    before = len(proxy.seen)
    with pytest.raises(ValueError, match=match):
        Client(proxy.url, headers=headers)
    with Client(proxy.url, timeout=30) as client:
        with pytest.raises(ValueError, match=match):
            client.is_live(headers=headers)
        with pytest.raises(ValueError, match=match):
            client.infer("simple", simple_inputs(), headers=headers)
        with pytest.raises(ValueError, match=match):
            client.infer_async("simple", simple_inputs(), headers=headers)
        with pytest.raises(ValueError, match=match):
            client.infer("digits", {"input": DIGITS.data[:1]}, cast=True, headers=headers)
        with pytest.raises(ValueError, match=match):
            client.stream("simple", headers=headers)

    async def scenario() -> None:
        with pytest.raises(ValueError, match=match):
            AsyncClient(proxy.url, headers=headers)
        async with AsyncClient(proxy.url, timeout=30) as client:
            with pytest.raises(ValueError, match=match):
                await client.is_ready(headers=headers)
            with pytest.raises(ValueError, match=match):
                await client.infer("simple", simple_inputs(), headers=headers)

    asyncio.run(scenario())
    assert len(proxy.seen) == before  # nothing reached the wire


def test_valid_header_edge_cases_arrive_as_sent(proxy: RecordingProxy) -> None:
    headers = {"X-Ok_.9": " printable ~ ASCII ", "empty": "", "raw-bin": b"\x00\n\xff"}
    with Client(proxy.url, headers=headers, timeout=30) as client:
        client.is_live()
    seen = proxy.last("ServerLive").headers
    assert seen["x-ok_.9"] == " printable ~ ASCII " and seen["raw-bin"] == b"\x00\n\xff"
    with pytest.raises(ValueError) as info:
        Client(proxy.url, headers={"authorization": "Bearer secret-token\n"})
    assert "secret-token" not in str(info.value)  # tokens stay out of logs


def test_timeout_is_the_deadline_the_server_sees(proxy: RecordingProxy) -> None:
    with Client(proxy.url, timeout=30) as client:
        client.is_live()
        default = proxy.last("ServerLive").time_remaining
        client.infer("simple", simple_inputs(), timeout=5)
        own = proxy.last("ModelInfer").time_remaining
        with pytest.warns(DeprecationWarning, match="deadline= is deprecated"):
            client.infer("simple", simple_inputs(), deadline=7)
        old_name = proxy.last("ModelInfer").time_remaining
        with pytest.raises(TypeError, match="timeout= only"):
            client.infer("simple", simple_inputs(), timeout=5, deadline=7)
    with Client(proxy.url) as unlimited:
        unlimited.is_live()
        none = proxy.last("ServerLive").time_remaining
    # the grpc-timeout header rounds up a little, hence the half-second headroom
    assert default is not None and 25 < default <= 30.5
    assert own is not None and 3 < own <= 5.5
    assert old_name is not None and 5.5 < old_name <= 7.5
    assert none is None or none > 1e6  # grpc reports "no deadline" as None or effectively ∞
    with pytest.warns(DeprecationWarning, match="metadata= is deprecated"):
        Client(proxy.url, metadata={"x": "y"}).close()


@pytest.mark.parametrize("bad", [-1, -0.5, 0, float("nan"), float("inf"), 1e300])
def test_impossible_timeouts_raise_before_anything_is_sent(
    proxy: RecordingProxy, bad: float
) -> None:
    """grpc would turn each into a call that fails at once (or, NaN, never times out)."""
    before = len(proxy.seen)
    match = r"timeout must be > 0 and at most 1e\+09 seconds \(None: no limit\)"
    with pytest.raises(ValueError, match=match):
        Client(proxy.url, timeout=bad)
    with Client(proxy.url, timeout=30) as client:
        with pytest.raises(ValueError, match=match):
            client.is_live(timeout=bad)
        with pytest.raises(ValueError, match=match):
            client.infer("simple", simple_inputs(), timeout=bad)
        with pytest.raises(ValueError, match=match):
            client.infer_async("simple", simple_inputs(), timeout=bad)
        with pytest.raises(ValueError, match=match):
            client.infer("digits", {"input": DIGITS.data[:1]}, cast=True, timeout=bad)
        with pytest.raises(ValueError, match=match):
            client.stream("simple", timeout=bad)
        with pytest.raises(ValueError, match=match), pytest.warns(DeprecationWarning):
            client.infer("simple", simple_inputs(), deadline=bad)

    async def scenario() -> None:
        with pytest.raises(ValueError, match=match):
            AsyncClient(proxy.url, timeout=bad)
        async with AsyncClient(proxy.url, timeout=30) as client:
            with pytest.raises(ValueError, match=match):
                await client.is_ready(timeout=bad)
            with pytest.raises(ValueError, match=match):
                await client.infer("simple", simple_inputs(), timeout=bad)
            with pytest.raises(ValueError, match=match):
                async for _ in client.stream("simple", [simple_inputs()], timeout=bad):
                    pass

    asyncio.run(scenario())
    assert len(proxy.seen) == before  # nothing reached the wire


def test_timeout_must_be_a_number() -> None:
    for bad in ("5", True):
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None"):
            Client("localhost:1", timeout=bad)  # type: ignore[arg-type]
    with Client("localhost:1", timeout=np.float32(2.5)) as client:  # type: ignore[arg-type]
        assert client._timeout == 2.5


def test_cast_metadata_fetch_shares_the_calls_timeout(proxy: RecordingProxy) -> None:
    """With cast=True and nothing cached, the ModelMetadata fetch and the inference share one
    deadline: a slow metadata answer leaves the inference only what is left of `timeout`."""
    images = {"input": DIGITS.data[:1]}
    proxy.delays["ModelMetadata"] = 1.0
    try:
        with Client(proxy.url, timeout=4) as client:
            client.infer("digits", images, cast=True)
            first = proxy.last("ModelInfer").time_remaining
            client.infer("digits", images, cast=True)  # metadata cached: the whole 4 s again
            cached = proxy.last("ModelInfer").time_remaining
        with Client(proxy.url, timeout=30) as client:
            client.infer_async("digits", images, cast=True, timeout=4).result(30)
            future = proxy.last("ModelInfer").time_remaining

        async def scenario() -> None:
            async with AsyncClient(proxy.url) as client:
                await client.infer("digits", images, cast=True, timeout=4)

        asyncio.run(scenario())
        aio = proxy.last("ModelInfer").time_remaining
        with Client(proxy.url, retry=None) as client:  # 1 s of metadata + 1 s of inference
            proxy.delays["ModelInfer"] = 1.0
            with pytest.raises(InferenceServerError) as info:
                client.infer("digits", images, cast=True, timeout=1.5)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        proxy.delays.clear()
    # the grpc-timeout header rounds up a little, hence the half-second headroom
    for remaining in (first, future, aio):
        assert remaining is not None and 2 < remaining <= 3.5
    assert cached is not None and 3.5 < cached <= 4.5


# -- futures ------------------------------------------------------------------------------


def test_infer_async_runs_many_calls_without_a_thread_each(server) -> None:
    with Client(server.url, timeout=30) as client:
        client.is_ready()  # connect first: the channel's own threads are not ours to count
        threads_before = threading.active_count()
        futures = {
            client.infer_async("simple", simple_inputs(offset=i), request_id=str(i)): i
            for i in range(64)
        }
        threads_in_flight = threading.active_count()
        called: list[CallFuture] = []
        for future in futures:
            future.add_done_callback(called.append)
        for future in as_completed(futures, timeout=60):
            i = futures[future]
            result = future.result()
            assert result.id == str(i)
            np.testing.assert_array_equal(result["OUTPUT0"], simple_inputs(offset=i)["INPUT0"] + 3)
    assert threads_in_flight - threads_before <= 2  # 64 calls in flight, no thread per call
    assert sorted(id(f) for f in called) == sorted(id(f) for f in futures)


def test_infer_async_errors_retries_and_deadline(server, dead_url: str) -> None:
    with Client(server.url, timeout=30) as client:
        failed = client.infer_async("no_such_model", simple_inputs())
        error = failed.exception(timeout=30)
        assert isinstance(error, InferenceServerError)
        assert error.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InferenceServerError, match="unknown model"):
            failed.result()
        with pytest.raises(ValueError, match="priority"):  # argument errors raise at once
            client.infer_async("simple", simple_inputs(), priority=-1)

    sleeps: list[float] = []
    counter = CountingInterceptor()
    policy = RetryPolicy(sleep=sleeps.append)
    with Client(dead_url, retry=policy, interceptors=[counter]) as client:
        error = client.infer_async("simple", simple_inputs()).exception(timeout=30)
    assert isinstance(error, InferenceServerError) and error.code == grpc.StatusCode.UNAVAILABLE
    assert counter.calls == ["ModelInfer"] * 3 and sleeps == [0.05, 0.1]

    counter.calls.clear()  # the real backoff: a timer, not the caller's thread
    quick = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
    with Client(dead_url, retry=quick, interceptors=[counter]) as client:
        started = time.monotonic()
        future = client.infer_async("simple", simple_inputs())
        assert time.monotonic() - started < 1.0
        assert future.exception(timeout=30).code == grpc.StatusCode.UNAVAILABLE
    assert counter.calls == ["ModelInfer"] * 3

    with Client(dead_url, wait_for_ready=True, timeout=0.3) as client:
        late = client.infer_async("simple", simple_inputs())
        assert late.exception(timeout=30).code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancelling_a_future_cancels_the_rpc(dead_url: str) -> None:
    with Client(dead_url, wait_for_ready=True) as client:  # waits for a server that never comes
        future = client.infer_async("simple", simple_inputs())
        assert not future.done()
        assert future.cancel()
        assert future.cancelled()
        rpc = future._rpc
        assert rpc is not None and rpc.cancelled()


def test_a_cancelled_future_wakes_wait_and_as_completed(dead_url: str) -> None:
    """Future.cancel() alone never tells wait()/as_completed(): they only hear of futures
    that an executor notified, so gathering a cancelled CallFuture used to hang."""
    with Client(dead_url, wait_for_ready=True) as client:  # calls wait for a server forever
        waiting = client.infer_async("simple", simple_inputs())
        later = client.infer_async("simple", simple_inputs())
        threading.Timer(0.2, later.cancel).start()
        started = time.monotonic()
        assert list(as_completed([later], timeout=20)) == [later]  # cancelled while waiting
        assert time.monotonic() - started < 10
        assert waiting.cancel() and waiting.cancel()  # twice (and from two places) is fine
        done, not_done = wait([waiting, later], timeout=20)
        assert done == {waiting, later} and not not_done


class _FakeRpc:
    """Stands in for grpc's call future, so a test decides when, and how, it completes."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[object], None]] = []
        self.was_cancelled = False

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.callbacks.append(callback)

    def cancel(self) -> bool:
        self.was_cancelled = True
        return True


class _Done:
    """What grpc hands a done-callback: `result()` runs `outcome`, which may cancel first."""

    def __init__(self, outcome: Callable[[], object]) -> None:
        self.result = outcome


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "down"


def test_cancel_racing_the_outcome_leaves_the_future_cancelled(monkeypatch) -> None:
    """Forces each interleaving of cancel() with the call completing: between the
    done-callback's own done() check and settling the future (with an answer, with an error
    that would be retried), and between a retry's done() check and its RPC starting. The
    future must stay CANCELLED, its callbacks must run once, and no RPC may start after."""
    rpcs: list[_FakeRpc] = []
    on_start: list[Callable[[], object]] = []

    class Method:
        def future(self, request: object, **_: object) -> _FakeRpc:
            for hook in on_start:
                hook()
            rpcs.append(_FakeRpc())
            return rpcs[-1]

    with Client("localhost:1", retry=RetryPolicy(sleep=lambda _: None)) as client:
        monkeypatch.setattr(client, "_stub", type("Stub", (), {"ModelInfer": Method()})())

        def cancel_then(future: CallFuture, outcome: Callable[[], object]) -> _Done:
            def result() -> object:
                assert future.cancel()  # lands after the callback checked done()
                return outcome()

            return _Done(result)

        def fail() -> object:
            raise _Unavailable()

        for outcome in (pb.ModelInferResponse, fail):
            rpcs.clear()
            future = client.infer_async("simple", simple_inputs())
            called: list[CallFuture] = []
            future.add_done_callback(called.append)
            rpcs[0].callbacks[0](cancel_then(future, outcome))
            assert future.cancelled() and called == [future]
            assert len(rpcs) == 1  # the failure was retryable, yet nothing was retried
            with pytest.raises(CancelledError):
                future.result(timeout=0)
            assert wait([future], timeout=0).done == {future}

        rpcs.clear()  # cancelled while a retry was about to start its RPC
        future = client.infer_async("simple", simple_inputs())
        called = []
        future.add_done_callback(called.append)
        on_start.append(future.cancel)
        rpcs[0].callbacks[0](_Done(fail))
        assert len(rpcs) == 2 and rpcs[1].was_cancelled and not rpcs[1].callbacks
        assert future.cancelled() and called == [future]


# -- explicit casts -----------------------------------------------------------------------


def test_dtype_mismatch_is_the_servers_error_unless_cast_is_asked(server) -> None:
    images = DIGITS.data[:4]  # float64; the model takes FP32
    counter = CountingInterceptor()
    with Client(server.url, timeout=30, interceptors=[counter]) as client:
        with pytest.raises(InferenceServerError) as info:
            client.infer("digits", {"input": images})
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "data-type is 'FP64', but model 'digits' expects 'FP32'" in info.value.message

        result = client.infer("digits", {"input": images}, cast=True)
        np.testing.assert_array_equal(result["label"].ravel(), DIGITS.target[:4])
        sent = counter.last_request
        assert isinstance(sent, pb.ModelInferRequest) and sent.inputs[0].datatype == "FP32"
        assert len(sent.raw_input_contents[0]) == images.size * 4

        lists = client.infer("digits", {"input": images.tolist()}, cast=True)  # plain lists
        np.testing.assert_array_equal(lists["label"], result["label"])
        later = client.infer_async("digits", {"input": images[:1]}, cast=True).result(30)
        assert int(later["label"][0, 0]) == DIGITS.target[0]
        assert counter.calls.count("ModelMetadata") == 1  # cached per model and version

        with pytest.raises(TypeError, match="will not cast float64"):
            floats = {"INPUT0": np.zeros((1, 16)), "INPUT1": np.zeros((1, 16))}
            client.infer("simple", floats, cast=True)  # float -> int would truncate
        ok = client.infer(
            "simple",
            {"INPUT0": np.arange(16, dtype=np.int64)[None], "INPUT1": np.ones((1, 16), bool)},
            cast=True,
        )  # int64 -> INT32 and bool -> INT32 are same-kind casts
        np.testing.assert_array_equal(ok["OUTPUT0"], np.arange(1, 17, dtype=np.int32)[None])
        with pytest.raises(TypeError, match=r"no input 'INPUT9' \(inputs: INPUT0, INPUT1\)"):
            client.infer("simple", {"INPUT9": np.zeros((1, 16))}, cast=True)
        strings = np.array([["1"] * 16], dtype=object)
        with pytest.raises(TypeError, match="is INT32; will not cast object"):
            client.infer("simple", {"INPUT0": strings, "INPUT1": strings}, cast=True)
        assert counter.calls.count("ModelMetadata") == 2  # `simple`, once


def test_cast_refuses_integers_that_do_not_fit_and_sends_nothing(server) -> None:
    counter = CountingInterceptor()
    zeros = np.zeros((1, 16), np.int64)

    def infers() -> int:
        return counter.calls.count("ModelInfer")

    with Client(server.url, timeout=30, interceptors=[counter]) as client:
        edges = np.array([[-(2**31), 2**31 - 1] * 8], np.int64)  # int64, every value fits
        result = client.infer("simple", {"INPUT0": edges, "INPUT1": zeros}, cast=True)
        np.testing.assert_array_equal(result["OUTPUT0"], edges.astype(np.int32))
        small = np.arange(16, dtype=np.uint32)[None]  # unsigned -> signed, in range
        result = client.infer("simple", {"INPUT0": small, "INPUT1": zeros}, cast=True)
        np.testing.assert_array_equal(result["OUTPUT0"], small.astype(np.int32))
        sent = infers()

        too_big = {
            "int64 2**32 + 5": (np.full((1, 16), 2**32 + 5, np.int64), "4294967301..4294967301"),
            "int64 below": (np.full((1, 16), -(2**31) - 1, np.int64), "-2147483649..-2147483649"),
            "uint64 2**40": (np.full((1, 16), 2**40, np.uint64), "1099511627776..1099511627776"),
            "uint32 max": (np.arange(4294967280, 2**32, dtype=np.uint32)[None], "4294967280.."),
        }
        for case, (values, shown) in too_big.items():
            inputs = {"INPUT0": values, "INPUT1": zeros}
            with pytest.raises(ValueError, match=r"'INPUT0' of model 'simple' is INT32 ") as info:
                client.infer("simple", inputs, cast=True)
            assert "(-2147483648..2147483647)" in str(info.value), case
            assert f"{values.dtype} values given range over {shown}" in str(info.value), case
            with pytest.raises(ValueError, match="is INT32"):
                client.infer_async("simple", inputs, cast=True)
        assert infers() == sent  # refused before anything went on the wire

        eights = np.array([[-128, 127] * 8])  # a plain int64 array into an INT8 model
        result = client.infer("simple_int8", {"INPUT0": eights, "INPUT1": zeros}, cast=True)
        np.testing.assert_array_equal(result["OUTPUT0"], eights.astype(np.int8))
        with pytest.raises(ValueError, match=r"is INT8 \(-128..127\), but the int64 values"):
            client.infer("simple_int8", {"INPUT0": eights + 1, "INPUT1": zeros}, cast=True)

        images = DIGITS.data[:2].copy()
        images[1, 5] = 1e300  # finite in float64, inf in FP32
        sent = infers()
        with pytest.raises(ValueError, match=r"'input' of model 'digits' is FP32 .*become inf"):
            client.infer("digits", {"input": images}, cast=True)
        assert infers() == sent


def test_cast_rules_value_by_value() -> None:
    """The cast function itself, for datatypes the test repository has no model for."""

    def cast(values: object, datatype: str) -> np.ndarray:
        return _codec.cast_inputs({"x": values}, {"x": datatype}, "m")["x"]

    # signed -> unsigned: allowed when every value fits, refused (never wrapped) otherwise
    assert cast(np.array([0, 255]), "UINT8").tolist() == [0, 255]
    with pytest.raises(ValueError, match=r"is UINT8 \(0..255\), but the int64 values .* -1..3"):
        cast(np.array([-1, 3]), "UINT8")
    with pytest.raises(ValueError, match=r"is INT64 .* 18446744073709551615"):
        cast(np.array([2**64 - 1], np.uint64), "INT64")
    with pytest.raises(ValueError, match=r"is UINT32 .* 4294967296"):
        cast(np.array([2**32]), "UINT32")
    assert cast(np.array([True, False]), "UINT8").dtype == np.uint8
    assert cast(np.zeros((0, 4), np.int64), "INT8").shape == (0, 4)

    # float narrowing: precision may go, magnitude may not
    with pytest.raises(ValueError, match=r"FP16 \(finite magnitudes up to 65504\).*1e\+06"):
        cast(np.array([1.0, 1e6]), "FP16")
    with pytest.raises(ValueError, match=r"FP16 .*int64 values given range over 70000"):
        cast(np.array([70000]), "FP16")
    with pytest.raises(ValueError, match="become inf"):
        cast(np.array([2.0**128]), "FP32")
    assert cast(np.array([65504.0, -65504.0]), "FP16").tolist() == [65504.0, -65504.0]
    kept = cast(np.array([np.nan, np.inf, -np.inf, 1.0]), "FP16")  # not an overflow: as given
    assert np.isnan(kept[0]) and kept[1:].tolist() == [np.inf, -np.inf, 1.0]
    assert cast(np.array([1e-10]), "FP16").tolist() == [0.0]  # underflow is precision loss
    assert cast(np.array([0.1]), "FP32")[0] == np.float32(0.1)
    assert cast(np.array([2**60 + 1]), "FP32")[0] == np.float32(2.0**60)

    with pytest.raises(TypeError, match="will not cast float64"):
        cast(np.array([1.0]), "INT32")
    with pytest.raises(TypeError, match="will not cast int64"):
        cast(np.array([1]), "BOOL")


def test_asyncio_cast(server) -> None:
    async def scenario() -> np.ndarray:
        async with AsyncClient(server.url, timeout=30) as client:
            result = await client.infer("digits", {"input": DIGITS.data[:3]}, cast=True)
            return result["label"].ravel()

    np.testing.assert_array_equal(asyncio.run(scenario()), DIGITS.target[:3])


# -- model control ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit_server(server_factory, tmp_path_factory: pytest.TempPathFactory):
    """An explicit model-control server over a copy of the repository, nothing loaded."""
    repo = tmp_path_factory.mktemp("sdk-control") / "models"
    shutil.copytree(MODEL_REPOSITORY, repo)
    server = server_factory(repo, "--model-control-mode=explicit")
    yield server
    assert server.terminate() == 0


def test_load_reload_with_config_and_unload(explicit_server) -> None:
    counter = CountingInterceptor()
    with Client(explicit_server.url, timeout=60, interceptors=[counter]) as client:
        before = {m.name: m for m in client.repository_index()}
        assert before["simple"].state == "" and not client.is_model_ready("simple")

        client.load_model("simple")
        assert client.is_model_ready("simple")
        assert [(m.name, m.state) for m in client.repository_index(ready_only=True)] == [
            ("simple", "READY")
        ]
        config = json_format.MessageToDict(client.model_config("simple"))
        assert config["maxBatchSize"] == 8

        config["maxBatchSize"] = 2  # a Triton-style override: the whole config, as JSON
        client.load_model("simple", config=config)
        assert client.model_config("simple").max_batch_size == 2
        with pytest.raises(InferenceServerError) as info:
            client.infer("simple", simple_inputs(batch=3))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # the new limit holds
        assert client.infer("simple", simple_inputs(batch=2))["OUTPUT0"].shape == (2, 16)

        client.load_model("digits")
        client.infer("digits", {"input": DIGITS.data[:1]}, cast=True)
        client.load_model("digits")  # a (re)load drops what cast=True knew about the model
        client.infer("digits", {"input": DIGITS.data[:1]}, cast=True)
        assert counter.calls.count("ModelMetadata") == 2

        with pytest.raises(InferenceServerError) as info:
            client.load_model("simple", config="{not json")
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "failed to load 'simple', failed to poll from model repository" in str(info.value)

        counter.calls.clear()
        with pytest.raises(InferenceServerError) as info:
            client.load_model("simple", files={"1/model.onnx": b"\x08\x07"})
        sent = counter.last_request
        assert isinstance(sent, pb.RepositoryModelLoadRequest)
        assert sent.parameters["file:1/model.onnx"].bytes_param == b"\x08\x07"
        assert info.value.code == grpc.StatusCode.INTERNAL  # Tributary does not take files
        assert counter.calls == ["RepositoryModelLoad"]  # failed loads are never retried

        client.unload_model("simple")
        assert not client.is_model_ready("simple")
        state = {m.name: m.state for m in client.repository_index()}
        assert state["simple"] == "UNAVAILABLE" and state["digits"] == "READY"
        with pytest.raises(InferenceServerError):
            client.infer("simple", simple_inputs())
        client.unload_model("digits", unload_dependents=True)
        sent = counter.last_request
        assert isinstance(sent, pb.RepositoryModelUnloadRequest)
        assert sent.parameters["unload_dependents"].bool_param is True
        assert not client.is_ready()  # nothing loaded: live but not ready


def test_asyncio_load_and_unload(explicit_server) -> None:
    async def scenario() -> tuple[bool, bool]:
        async with AsyncClient(explicit_server.url, timeout=60) as client:
            await client.load_model("simple_int8")
            loaded = await client.is_model_ready("simple_int8")
            await client.unload_model("simple_int8")
            return loaded, await client.is_model_ready("simple_int8")

    assert asyncio.run(scenario()) == (True, False)


# -- the documentation's examples run -------------------------------------------------------


def _python_block(path: Path, heading: str) -> str:
    """The first ```python block after `heading` in a Markdown file."""
    text = path.read_text()
    section = text[text.index(heading) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


@pytest.mark.parametrize(
    ("doc", "heading", "printed"),
    [
        ("README.md", "## Python SDK", "[1, 2, 3, 4]"),
        ("docs/sdk.md", "## First calls", "INPUT1 INT32 (-1, 16)"),
    ],
)
def test_documented_snippet_runs(server, capsys, doc: str, heading: str, printed: str) -> None:
    code = _python_block(ROOT / doc, heading)
    assert "localhost:8001" in code
    exec(compile(code.replace("localhost:8001", server.url), doc, "exec"), {})  # noqa: S102
    assert printed in capsys.readouterr().out.splitlines()
