"""Regression tests for the hostile-client findings: each one wedged, starved or leaked the
server before, and each asserts the behaviour a client sees now, through real clients.

1. a stream request whose validation raised a non-InferenceError hung its worker for good;
2. a huge `timeout` on a model without dynamic batching lost an instance for good;
4. idle or unread streams took every worker thread (health checks included), and SIGTERM
   waited the whole exit timeout for them;
5. undecodable requests were INTERNAL, logged a traceback each and leaked in grpcio;
and the smaller ones: names echoed into errors, extra raw_input_contents.
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from e2e_support import MODEL_REPOSITORY, output_arrays, rpc_error, simple_request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


class OpenStream:
    """A ModelStreamInfer call whose requests are fed by hand; `reply()` reads one reply."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream(
            STREAM,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self.call = call(self._feed())

    def _feed(self) -> Iterator[pb.ModelInferRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: pb.ModelInferRequest) -> None:
        self._requests.put(request)

    def reply(self) -> pb.ModelStreamInferResponse:
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def _live_within(channel: grpc.Channel, seconds: float) -> float:
    """ServerLive, a ModelInfer and a health Check must all answer within `seconds`; returns
    the slowest of the three (a starved server answers none of them)."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    request, a, b = simple_request()
    slowest = 0.0
    for call in (
        lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=seconds),
        lambda: stub.ModelInfer(request, timeout=seconds),
        lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=seconds),
    ):
        t0 = time.perf_counter()
        reply = call()
        slowest = max(slowest, time.perf_counter() - t0)
        if isinstance(reply, pb.ModelInferResponse):
            np.testing.assert_array_equal(output_arrays(reply)["OUTPUT0"], a + b)
        if isinstance(reply, health_pb2.HealthCheckResponse):
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return slowest


# -- 1. a stream request that raises outside our error family ---------------------------------


def test_stream_request_with_unparseable_version_is_answered_and_stream_stays_open(server) -> None:
    channel = grpc.insecure_channel(server.url)
    try:
        streams = [OpenStream(channel) for _ in range(4)]
        for s in streams:  # 4 streams x 40 requests: more than the old 128-thread pool
            for i in range(40):
                request, _, _ = simple_request(request_id=f"bad-{i}", version="9" * 5000)
                s.send(request)
        for s in streams:
            for i in range(40):
                reply = s.reply()
                assert reply.infer_response.id == f"bad-{i}"
                assert "failed to get model version" in reply.error_message
                assert len(reply.error_message) < 8192
        request, a, b = simple_request(request_id="good")
        streams[0].send(request)
        reply = streams[0].reply()
        assert reply.error_message == ""
        np.testing.assert_array_equal(output_arrays(reply.infer_response)["OUTPUT0"], a + b)
        for s in streams:
            s.close()
        _live_within(channel, 5)
    finally:
        channel.close()


def test_unary_unparseable_version_is_invalid_argument(stub) -> None:
    request, _, _ = simple_request(version="9" * 5000)
    details = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert "failed to get model version" in details and len(details) < 8192


# -- 2. huge timeouts on a model without dynamic batching ----------------------------------------


def test_huge_timeout_bursts_leave_the_model_serving(server, stub) -> None:
    """`simple` has no dynamic batching: concurrent requests queue for its instance."""

    def one(i: int) -> None:
        request, a, b = simple_request(batch=1 + i % 8)
        request.parameters["timeout"].int64_param = 2**62
        reply = stub.ModelInfer(request, timeout=30)
        np.testing.assert_array_equal(output_arrays(reply)["OUTPUT0"], a + b)

    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            list(pool.map(one, range(64)))
    request, a, b = simple_request()
    np.testing.assert_array_equal(
        output_arrays(stub.ModelInfer(request, timeout=10))["OUTPUT0"], a + b
    )
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        metrics = reply.read().decode()
    assert 'nv_inference_pending_request_count{model="simple",version="1"} 0' in metrics


# -- 4. streams cannot starve the server ---------------------------------------------------------


@pytest.fixture(scope="module")
def stream_server(server_factory):
    return server_factory(MODEL_REPOSITORY)


def _open_and_answer(channel: grpc.Channel, n: int) -> list[OpenStream]:
    """`n` streams, each proven served (one request answered), then left idle."""
    streams = [OpenStream(channel) for _ in range(n)]
    for i, s in enumerate(streams):
        request, _, _ = simple_request(request_id=str(i))
        s.send(request)
    for i, s in enumerate(streams):
        assert s.reply().infer_response.id == str(i)
    return streams


def test_300_idle_streams_leave_unary_and_health_answering(stream_server) -> None:
    channel = grpc.insecure_channel(stream_server.url)
    streams: list[OpenStream] = []
    try:
        streams = _open_and_answer(channel, 300)
        slowest = _live_within(grpc.insecure_channel(stream_server.url), 5)
        print(f"slowest of ServerLive/ModelInfer/Check with 300 idle streams: {slowest:.4f}s")
    finally:
        for s in streams:
            s.close()
        channel.close()


def test_stream_cap_refuses_with_resource_exhausted(server_factory) -> None:
    srv = server_factory(MODEL_REPOSITORY, "--grpc-max-streams", "3")
    channel = grpc.insecure_channel(srv.url)
    try:
        streams = _open_and_answer(channel, 3)
        extra = OpenStream(channel)
        extra.send(simple_request()[0])
        with pytest.raises(grpc.RpcError) as info:
            extra.reply()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--grpc-max-streams" in info.value.details()
        _live_within(channel, 5)
        streams.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the closed stream's slot frees as soon as the server sees the cancel
            again = OpenStream(channel)
            again.send(simple_request(request_id="again")[0])
            try:
                assert again.reply().infer_response.id == "again"
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "a closed stream never gave its slot back"
        again.close()
        for s in streams:
            s.close()
    finally:
        channel.close()


def test_stream_that_does_not_read_is_paused_not_buffered(server_factory) -> None:
    """With 4 replies pending the server stops reading that stream; the client's sends then
    block (HTTP/2 flow control). Everything still arrives, in order, once it reads."""
    srv = server_factory(MODEL_REPOSITORY, "--grpc-stream-max-pending", "4")
    channel = grpc.insecure_channel(srv.url)
    try:
        s = OpenStream(channel)
        n = 3000
        for i in range(n):
            s.send(simple_request(request_id=str(i))[0])
        _live_within(channel, 5)  # meanwhile the server serves everyone else
        for i in range(n):
            reply = s.reply()
            assert reply.error_message == "" and reply.infer_response.id == str(i)
        s.close()
    finally:
        channel.close()


def test_sigterm_with_idle_streams_exits_promptly(server_factory) -> None:
    srv = server_factory(MODEL_REPOSITORY, "--exit-timeout-secs", "30")
    channel = grpc.insecure_channel(srv.url)
    try:
        streams = _open_and_answer(channel, 20)
        t0 = time.monotonic()
        assert srv.terminate(timeout=25) == 0
        took = time.monotonic() - t0
        assert took < 10, f"exit took {took:.1f}s with 20 idle streams (exit timeout 30s)"
        for s in streams:
            with pytest.raises(grpc.RpcError) as info:
                s.reply()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def _slow_model_repository(root, matmuls: int = 150, n: int = 2048):
    """A model that computes for tens of seconds: its one input (shape [1]) is expanded to an
    n x n matrix that is multiplied by itself `matmuls` times, then summed to one number."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Expand", ["X", "shape"], ["m0"]),
        *(helper.make_node("MatMul", [f"m{i}", "m0"], [f"m{i + 1}"]) for i in range(matmuls)),
        helper.make_node("ReduceSum", [f"m{matmuls}"], ["Y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "slow" / "1").mkdir(parents=True)
    onnx.save(model, root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.pbtxt").write_text(
        "max_batch_size: 0\ninstance_group [{ kind: KIND_CPU, count: 1 }]\n"
    )
    return root


def test_exit_timeout_bounds_shutdown_even_while_a_model_computes(server_factory, tmp_path) -> None:
    """--exit-timeout-secs is a promise about the whole exit: a run still inside ONNX Runtime
    at the deadline must not hold the process (it used to, for as long as the run took)."""
    srv = server_factory(_slow_model_repository(tmp_path / "models"), "--exit-timeout-secs", "1")
    channel = grpc.insecure_channel(srv.url)
    try:
        request = pb.ModelInferRequest(model_name="slow")
        tensor = request.inputs.add(name="X", datatype="FP32", shape=[1])
        tensor.contents.fp32_contents.append(1.0)
        future = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(request, timeout=120)
        time.sleep(1.0)  # the request is now inside ONNX Runtime (a run takes tens of seconds)
        assert not future.done()
        t0 = time.monotonic()
        code = srv.terminate(timeout=60)
        took = time.monotonic() - t0
        assert took < 1 + 2 + 3, f"exit took {took:.1f}s with --exit-timeout-secs=1"
        assert code == 1  # forced: work was abandoned
        with pytest.raises(grpc.RpcError):
            future.result(timeout=10)
    finally:
        channel.close()
    assert "exit timeout of 1s expired with inference still running; exiting now" in srv.log()


# -- 5. undecodable requests ------------------------------------------------------------------


def test_undecodable_request_is_invalid_argument_without_a_traceback(server_factory) -> None:
    srv = server_factory(MODEL_REPOSITORY)
    channel = grpc.insecure_channel(srv.url)
    try:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x07"):
            with pytest.raises(grpc.RpcError) as info:
                infer(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("unable to parse the request")
        _live_within(channel, 5)
    finally:
        channel.close()
    assert "Traceback" not in srv.log()
    assert "Exception deserializing" not in srv.log()


# -- smaller findings ---------------------------------------------------------------------------


def test_huge_names_are_truncated_in_errors(stub) -> None:
    request, _, _ = simple_request()
    request.model_name = "m" * 1_000_000
    details = rpc_error(grpc.StatusCode.NOT_FOUND, stub.ModelInfer, request)
    assert "Request for unknown model" in details and "more characters" in details
    assert len(details) < 8192
    request, _, _ = simple_request()
    request.inputs[0].name = "x" * 1_000_000
    details = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert "unexpected inference input" in details and len(details) < 8192


def test_more_raw_contents_than_inputs_is_refused(stub) -> None:
    request, _, _ = simple_request()
    request.raw_input_contents.append(b"\0" * 64)
    details = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert "expected 2 raw_input_contents" in details and "got 3" in details


def test_many_threads_of_garbage_and_good_requests_keep_the_server_whole(server) -> None:
    """Garbage, bad versions and valid requests at once, unary and streamed, from 16 threads."""
    channel = grpc.insecure_channel(server.url)
    infer_raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for i in range(60):
                kind = i % 3
                if kind == 0:
                    with pytest.raises(grpc.RpcError) as info:
                        infer_raw(rng.bytes(int(rng.integers(1, 200))), timeout=10)
                    assert info.value.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.NOT_FOUND,
                    ), info.value.details()
                elif kind == 1:
                    request, _, _ = simple_request(version="1" * 6000)
                    rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
                else:
                    request, a, b = simple_request(batch=1 + i % 8)
                    out = output_arrays(stub.ModelInfer(request, timeout=10))
                    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    channel.close()
    assert not errors, errors[0]


# -- every method parses its own bytes; every long-lived call has its own threads ----------------


GARBAGE = (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x07", b"\x12\x05ab")


def test_garbage_to_any_method_is_invalid_argument_and_costs_nothing(server_factory) -> None:
    """grpcio's own deserializer answered INTERNAL, logged a traceback and kept ~19 KB for
    every undecodable request, on every method but the ones we parsed ourselves."""
    from e2e_support import rss_kib

    srv = server_factory(MODEL_REPOSITORY)
    channel = grpc.insecure_channel(srv.url)
    methods = [
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ModelMetadata",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/grpc.health.v1.Health/Check",
    ]
    try:
        calls = [channel.unary_unary(m) for m in methods]

        def burst(n: int) -> None:
            for i in range(n):
                with pytest.raises(grpc.RpcError) as info:
                    calls[i % len(calls)](GARBAGE[i % len(GARBAGE)], timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    methods[i % len(calls)],
                    info.value.details(),
                )

        burst(400)  # warm-up: allocator and gRPC caches settle
        before = rss_kib(srv.proc.pid)
        burst(3000)
        grown = rss_kib(srv.proc.pid) - before
        assert grown < 16 * 1024, f"RSS grew {grown} KiB over 3,000 undecodable requests"
        _live_within(channel, 5)
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as info:
            next(watch(b"\xff\xff", timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    assert "Traceback" not in srv.log()


class ReflectionStream:
    def __init__(self, channel: grpc.Channel) -> None:
        from grpc_reflection.v1alpha import reflection_pb2

        self.pb = reflection_pb2
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        call = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        self.call = call(iter(self.requests.get, None))

    def list_services(self) -> list[str]:
        self.requests.put(self.pb.ServerReflectionRequest(list_services=""))
        reply = next(self.call)
        return [s.name for s in reply.list_services_response.service]

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def test_idle_reflection_streams_neither_starve_nor_hold_shutdown(server_factory) -> None:
    """grpcurl keeps a reflection stream open per session; 128 idle ones took every worker
    thread, and 3 held SIGTERM for the whole exit timeout."""
    srv = server_factory(MODEL_REPOSITORY, "--exit-timeout-secs", "30")
    channel = grpc.insecure_channel(srv.url)
    try:
        open_ = []
        refused = 0
        for _ in range(140):
            s = ReflectionStream(channel)
            try:
                assert "inference.GRPCInferenceService" in s.list_services()
                open_.append(s)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                refused += 1
        assert open_ and refused, (len(open_), refused)  # a cap exists and admits some
        _live_within(channel, 5)
        t0 = time.monotonic()
        assert srv.terminate(timeout=25) == 0
        assert time.monotonic() - t0 < 10, "idle reflection streams held shutdown"
    finally:
        channel.close()


def test_empty_tensor_with_a_huge_dimension_is_invalid_argument(server_factory, tmp_path) -> None:
    """[0, 2^62] implies 0 bytes, but numpy refused the shape: INTERNAL and a traceback."""
    from e2e_support import identity_model

    identity_model(tmp_path, "id2", "FP32", [-1, -1], 0)
    srv = server_factory(tmp_path)
    channel = grpc.insecure_channel(srv.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        for shape in ([0, 2**62], [2**62, 0]):
            request = pb.ModelInferRequest(model_name="id2")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
            request.raw_input_contents.append(b"")
            details = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
            assert "tensor size limit" in details
        # a large request carrying an unknown group field still parses (protobuf's rules)
        data = np.arange(40_000, dtype=np.float32)
        request = pb.ModelInferRequest(model_name="id2")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, data.size])
        request.raw_input_contents.append(data.tobytes())
        wire = request.SerializeToString() + b"\xa3\x06\x08\x01\xa4\x06"  # group 100 {1: 1}
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        reply = pb.ModelInferResponse.FromString(infer(wire, timeout=10))
        np.testing.assert_array_equal(output_arrays(reply)["OUTPUT0"].reshape(-1), data)
    finally:
        channel.close()
    assert "Traceback" not in srv.log()


def test_non_ascii_names_cannot_turn_errors_into_resource_exhausted(stub) -> None:
    request, _, _ = simple_request()
    request.model_name = "\u2603" * 3000  # 9 header bytes each once percent-encoded
    details = rpc_error(grpc.StatusCode.NOT_FOUND, stub.ModelInfer, request)
    assert "Request for unknown model" in details
    details = rpc_error(
        grpc.StatusCode.NOT_FOUND, stub.ModelMetadata, pb.ModelMetadataRequest(name="\u2603" * 3000)
    )
    assert "Request for unknown model" in details


def test_a_shape_with_millions_of_dimensions_is_refused_cheaply(stub) -> None:
    request, _, _ = simple_request()
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1] * 2_000_000)  # 2 MB on the wire, 2 M Python ints
    details = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ModelInfer, request)
    assert "unexpected shape for input 'INPUT0'" in details
    assert "...(2000000 dimensions)]" in details and len(details) < 2048


def test_health_watch_names_are_bounded_and_watches_end_at_shutdown(server_factory) -> None:
    srv = server_factory(MODEL_REPOSITORY, "--exit-timeout-secs", "30")
    channel = grpc.insecure_channel(srv.url)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:
            next(health.Watch(health_pb2.HealthCheckRequest(service="s" * 100_000), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(20)]
        for w in watches:
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        t0 = time.monotonic()
        assert srv.terminate(timeout=25) == 0
        assert time.monotonic() - t0 < 10, "open health Watches held shutdown"
        for w in watches:  # each saw NOT_SERVING before its stream ended
            statuses = []
            with pytest.raises(grpc.RpcError):
                for reply in w:
                    statuses.append(reply.status)
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        channel.close()
