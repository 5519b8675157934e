"""Queue policy through a real server: a full queue answers UNAVAILABLE at once, and the
rejections are counted as REJECTED failures in both ModelStatistics and /metrics."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

CLIENTS = 32
WIDTH = 2048  # one 2048x2048 Gemm per row: milliseconds of work, so the instance stays busy


def _slow_model(repo):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["INPUT0", "W"], ["OUTPUT0"])],
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [None, WIDTH])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    (repo / "slow" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "slow" / "1" / "model.onnx"))
    (repo / "slow" / "config.pbtxt").write_text(
        f"""name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 1
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
dynamic_batching {{ default_queue_policy {{ max_queue_size: 1 }} }}
"""
    )


@pytest.fixture(scope="module")
def slow_server(server_factory, tmp_path_factory):
    repo = tmp_path_factory.mktemp("slow-repo")
    _slow_model(repo)
    return server_factory(repo)


def test_full_queue_rejects_at_once_and_counts(slow_server):
    x = np.ones((1, WIDTH), dtype=np.float32)
    ok: list[int] = []
    rejected: list[str] = []
    other: list[BaseException] = []
    start = threading.Barrier(CLIENTS)

    def call(i: int) -> None:
        with grpcclient.InferenceServerClient(slow_server.url) as c:
            inp = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
            inp.set_data_from_numpy(x)
            start.wait()
            try:
                c.infer("slow", [inp])
                ok.append(i)
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE":
                    rejected.append(exc.message())
                else:
                    other.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not other, other[:3]
    assert len(ok) + len(rejected) == CLIENTS
    # one running + one queued at a time, 32 arriving together: most must be refused
    assert ok and rejected
    assert all(m.endswith("Exceeds maximum queue size") for m in rejected), rejected[:3]

    with grpcclient.InferenceServerClient(slow_server.url) as c:
        stats = c.get_inference_statistics("slow", as_json=True)["model_stats"][0]
    inf = stats["inference_stats"]
    assert int(inf["success"]["count"]) == len(ok)
    assert int(inf["fail"]["count"]) == len(rejected)
    url = f"http://127.0.0.1:{slow_server.metrics_port}/metrics"
    text = urllib.request.urlopen(url).read().decode()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("nv_inference_request_failure{") and 'reason="REJECTED"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) == len(rejected)
