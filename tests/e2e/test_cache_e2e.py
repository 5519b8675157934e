"""The response cache end to end (docs/model-config.md#response-cache): a server started with
--cache-config local,size=N and models whose config enables response_cache, driven by
tritonclient (sync, async, stream): hits answer without running the model and show in
ModelStatistics and Prometheus; keys tell requests apart; errors are not cached; entries of a
reloaded version are gone; outputs in client shared memory are written on a hit; sequence
models refuse the cache at load; without --cache-config nothing is cached.
"""

from __future__ import annotations

import os
import queue
import urllib.request
from pathlib import Path

import build_models
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

CACHE = "--cache-config=local,size=1048576"
EXPLICIT = "--model-control-mode=explicit"
ON = "response_cache { enable: true }\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "models"
    build_models.build_simple(root, "cached", config=build_models.simple_config("cached") + ON)
    build_models.build_simple(root, "uncached")
    graph = build_models.identity_graph("FP32", ("N", "D"))
    identity_config = (
        'name: "big"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n' + ON
    )
    build_models.write_model(root, "big", graph, identity_config)
    strict = helper.make_graph(
        [helper.make_node("Reshape", ["INPUT0", "shape"], ["OUTPUT0"])],
        "strict4",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["D"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [4])],
        initializer=[numpy_helper.from_array(np.array([4], np.int64), "shape")],
    )
    strict_config = (
        'name: "strict4"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n' + ON
    )
    build_models.write_model(root, "strict4", build_models.make_model(strict), strict_config)
    return root


@pytest.fixture(scope="module")
def cached_server(server_factory, repo):
    return server_factory(repo, CACHE, "--allow-client-shm=true")


def simple_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [
        grpcclient.InferInput("INPUT0", list(a.shape), "INT32"),
        grpcclient.InferInput("INPUT1", list(b.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def pair(seed: int, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(-1000, 1000, (batch, 16), dtype=np.int32),
        rng.integers(-1000, 1000, (batch, 16), dtype=np.int32),
    )


def model_stats(c: grpcclient.InferenceServerClient, name: str):
    (entry,) = c.get_inference_statistics(name).model_stats
    return entry


def check(result: grpcclient.InferResult, a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url) as reply:
        return reply.read().decode()


def metric(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}",version="1"}} '
    (line,) = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return float(line[len(prefix) :])


def test_a_repeated_request_is_a_hit_in_stats_and_metrics(cached_server) -> None:
    with grpcclient.InferenceServerClient(cached_server.url) as c:
        before = model_stats(c, "cached")
        a, b = pair(1, batch=2)
        check(c.infer("cached", simple_inputs(a, b)), a, b)
        check(c.infer("cached", simple_inputs(a, b)), a, b)
        check(c.infer("cached", simple_inputs(a, b)), a, b)
        after = model_stats(c, "cached")
        s0, s1 = before.inference_stats, after.inference_stats
        assert s1.cache_miss.count - s0.cache_miss.count == 1
        assert s1.cache_hit.count - s0.cache_hit.count == 2
        assert s1.cache_hit.ns > s0.cache_hit.ns and s1.cache_miss.ns > s0.cache_miss.ns
        assert s1.success.count - s0.success.count == 3  # hits are successes
        assert s1.queue.count - s0.queue.count == 3  # and count in queue
        assert s1.compute_infer.count - s0.compute_infer.count == 1  # the model ran once
        assert after.inference_count - before.inference_count == 2  # hits are not inferences
        assert after.execution_count - before.execution_count == 1
        text = scrape(cached_server)
        assert metric(text, "nv_cache_num_hits_per_model", "cached") == s1.cache_hit.count
        assert metric(text, "nv_cache_num_misses_per_model", "cached") == s1.cache_miss.count
        assert metric(text, "nv_cache_hit_duration_per_model", "cached") == s1.cache_hit.ns // 1000
        assert 'nv_cache_num_hits_per_model{model="uncached"' not in text  # its cache is off


def test_async_and_stream_requests_hit_too(cached_server) -> None:
    a, b = pair(2)
    with grpcclient.InferenceServerClient(cached_server.url) as c:
        check(c.infer("cached", simple_inputs(a, b)), a, b)  # stored
        hits = model_stats(c, "cached").inference_stats.cache_hit.count
        done: queue.Queue = queue.Queue()
        c.async_infer(
            "cached", simple_inputs(a, b), lambda result, error: done.put((result, error))
        )
        result, error = done.get(timeout=30)
        assert error is None
        check(result, a, b)
        c.start_stream(lambda result, error: done.put((result, error)))
        for i in range(3):
            c.async_stream_infer("cached", simple_inputs(a, b), request_id=str(i))
        for _ in range(3):
            result, error = done.get(timeout=30)
            assert error is None
            check(result, a, b)
        c.stop_stream()
        assert model_stats(c, "cached").inference_stats.cache_hit.count - hits == 4


def test_the_key_tells_requests_apart(cached_server) -> None:
    with grpcclient.InferenceServerClient(cached_server.url) as c:
        misses = model_stats(c, "cached").inference_stats.cache_miss.count
        a, b = pair(3)
        check(c.infer("cached", simple_inputs(a, b)), a, b)
        check(c.infer("cached", simple_inputs(b, a)), b, a)  # inputs swapped
        a2 = a.copy()
        a2[0, 0] += 1
        check(c.infer("cached", simple_inputs(a2, b)), a2, b)  # one element differs
        only0 = c.infer(
            "cached", simple_inputs(a, b), outputs=[grpcclient.InferRequestedOutput("OUTPUT0")]
        )
        np.testing.assert_array_equal(only0.as_numpy("OUTPUT0"), a + b)
        assert only0.as_numpy("OUTPUT1") is None  # a cached reply with both is not reused
        s = model_stats(c, "cached").inference_stats
        assert s.cache_miss.count - misses == 4


def test_errors_are_not_cached(cached_server) -> None:
    """`strict4` fails in the backend unless its input has exactly 4 elements."""
    with grpcclient.InferenceServerClient(cached_server.url) as c:
        for _ in range(2):
            inp = grpcclient.InferInput("INPUT0", [3], "FP32")
            inp.set_data_from_numpy(np.ones(3, np.float32))
            with pytest.raises(InferenceServerException) as info:
                c.infer("strict4", [inp])
            assert info.value.status() == "StatusCode.INTERNAL"  # the backend's, both times
        s = model_stats(c, "strict4").inference_stats
        assert (s.fail.count, s.cache_hit.count, s.cache_miss.count) == (2, 0, 0)
        inp = grpcclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(np.ones(4, np.float32))
        for _ in range(2):
            np.testing.assert_array_equal(c.infer("strict4", [inp]).as_numpy("OUTPUT0"), 1)
        s = model_stats(c, "strict4").inference_stats
        assert (s.cache_hit.count, s.cache_miss.count) == (1, 1)


def test_an_entry_larger_than_the_cache_is_never_stored(server_factory, repo) -> None:
    server = server_factory(repo, "--cache-config=local,size=4096")
    with grpcclient.InferenceServerClient(server.url) as c:
        x = np.arange(2 * 4096, dtype=np.float32).reshape(2, 4096)  # 32 KiB output
        for _ in range(2):
            inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_array_equal(c.infer("big", [inp]).as_numpy("OUTPUT0"), x)
        s = model_stats(c, "big").inference_stats
        assert (s.cache_hit.count, s.cache_miss.count) == (0, 2)
        small = np.ones((1, 4), np.float32)
        for _ in range(2):
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(small)
            c.infer("big", [inp])
        assert model_stats(c, "big").inference_stats.cache_hit.count == 1


def test_outputs_in_client_shared_memory_are_written_on_a_hit(cached_server) -> None:
    a, b = pair(5)
    key = f"/tributary_cache_test_{os.getpid()}"
    handle = shm.create_shared_memory_region("cache_out", key, 128)
    try:
        with grpcclient.InferenceServerClient(cached_server.url) as c:
            c.register_system_shared_memory("cache_out", key, 128)
            hits = model_stats(c, "cached").inference_stats.cache_hit.count
            for _ in range(2):
                shm.set_shared_memory_region(handle, [np.zeros(32, np.int32)])
                outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
                outputs[0].set_shared_memory("cache_out", 64)
                outputs[1].set_shared_memory("cache_out", 64, offset=64)
                c.infer("cached", simple_inputs(a, b), outputs=outputs)
                got = shm.get_contents_as_numpy(handle, np.int32, [2, 16])
                np.testing.assert_array_equal(got[0], (a + b)[0])
                np.testing.assert_array_equal(got[1], (a - b)[0])
            assert model_stats(c, "cached").inference_stats.cache_hit.count - hits == 1
            c.unregister_system_shared_memory("cache_out")
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_reload_drops_the_versions_entries(server_factory, repo) -> None:
    server = server_factory(repo, CACHE, EXPLICIT, "--load-model=cached")
    a, b = pair(6)
    with grpcclient.InferenceServerClient(server.url) as c:
        c.infer("cached", simple_inputs(a, b))
        c.infer("cached", simple_inputs(a, b))
        assert model_stats(c, "cached").inference_stats.cache_hit.count == 1
        c.load_model("cached")  # a reload: a new instance of version 1
        check(c.infer("cached", simple_inputs(a, b)), a, b)
        s = model_stats(c, "cached").inference_stats
        assert (s.cache_hit.count, s.cache_miss.count) == (0, 1)  # not served from the old one


def test_without_cache_config_nothing_is_cached(server_factory, repo) -> None:
    server = server_factory(repo)
    a, b = pair(7)
    with grpcclient.InferenceServerClient(server.url) as c:
        for _ in range(2):
            check(c.infer("cached", simple_inputs(a, b)), a, b)
        s = model_stats(c, "cached").inference_stats
        assert (s.cache_hit.count, s.cache_miss.count, s.compute_infer.count) == (0, 0, 2)
    assert "enables response_cache but the server has no cache" in server.log()
    assert "nv_cache_num_hits_per_model" not in scrape(server)


def test_a_sequence_model_refuses_the_cache_at_load(server_factory, tmp_path) -> None:
    root = tmp_path / "models"
    config = build_models.simple_config("seq") + "sequence_batching { }\n" + ON
    build_models.build_simple(root, "seq", config=config)
    server = server_factory(root, CACHE, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.load_model("seq")
        assert (
            "Response Cache does not currently support model seq with sequence batching "
            "scheduler. Please disable the response cache."
        ) in info.value.message()


def test_an_ensemble_can_use_the_cache(server_factory, tmp_path) -> None:
    root = tmp_path / "models"
    for name in ("digits", "digits_pre", "digits_topk", "digits_pipeline"):
        build_models.BUILDERS[name](root)
    config = root / "digits_pipeline" / "config.pbtxt"
    config.write_text(config.read_text() + ON)
    server = server_factory(root, CACHE)
    raw = np.zeros((1, 64), np.uint8)
    with grpcclient.InferenceServerClient(server.url) as c:
        results = []
        for _ in range(2):
            inp = grpcclient.InferInput("PIXELS", [1, 64], "UINT8")
            inp.set_data_from_numpy(raw)
            results.append(c.infer("digits_pipeline", [inp]).as_numpy("TOP_LABELS"))
        np.testing.assert_array_equal(results[0], results[1])
        s = model_stats(c, "digits_pipeline").inference_stats
        assert (s.cache_hit.count, s.cache_miss.count) == (1, 1)
        assert model_stats(c, "digits").inference_stats.success.count == 1  # ran once


def noisy_model() -> object:
    """INPUT0 plus a random draw of its shape: the same request, another answer each time."""
    graph = helper.make_graph(
        [
            helper.make_node("RandomUniformLike", ["INPUT0"], ["noise"]),
            helper.make_node("Add", ["INPUT0", "noise"], ["OUTPUT0"]),
        ],
        "noisy",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", 4])],
    )
    return build_models.make_model(graph)


def test_a_model_with_random_operators_refuses_the_cache_at_load(server_factory, tmp_path):
    root = tmp_path / "models"
    config = (
        'name: "noisy"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    build_models.write_model(root, "noisy", noisy_model(), config + ON)
    build_models.write_model(
        root, "noisy_uncached", noisy_model(), config.replace("noisy", "noisy_uncached")
    )
    server = server_factory(root, CACHE, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.load_model("noisy")
        assert info.value.message().endswith(
            "Response Cache does not support model noisy: its outputs are not deterministic "
            "(operators RandomUniformLike). Please disable the response cache."
        )
        assert not c.is_model_ready("noisy")
        c.load_model("noisy_uncached")  # the same graph without the cache serves
        x = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), np.float32))
        out = c.infer("noisy_uncached", [x]).as_numpy("OUTPUT0")
        assert out.shape == (1, 4) and ((out >= 0) & (out < 1)).all()
