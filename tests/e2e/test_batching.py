"""Dynamic batching end to end: 64 concurrent clients against `mlp`, each gets its own rows.

Also checks that ModelStatistics and the Prometheus endpoint agree with each other and with
what was sent: both read the same stats object, so any drift is a bug.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

THREADS = 64
REQUESTS_PER_THREAD = 4


@pytest.fixture(scope="module")
def mlp_server(server_factory, tmp_path_factory):
    import build_models as bm

    repo = tmp_path_factory.mktemp("mlp-repo")
    bm.build_mlp(repo)
    # one instance and a long window, so batches must form even on a quiet machine
    cfg = repo / "mlp" / "config.pbtxt"
    text = cfg.read_text()
    text = re.sub(
        r"max_queue_delay_microseconds:\s*\d+", "max_queue_delay_microseconds: 20000", text
    )
    cfg.write_text(text + "\ninstance_group [ { kind: KIND_CPU, count: 1 } ]\n")
    return server_factory(repo), repo


def _reference(repo: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["OUTPUT0"], {"INPUT0": x})[0]


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in metrics")


def test_concurrent_clients_get_their_own_rows(mlp_server):
    server, repo = mlp_server
    rng = np.random.default_rng(7)
    # distinct inputs; some requests carry 2 or 3 rows so row counting matters
    rows = [[int(rng.integers(1, 4)) for _ in range(REQUESTS_PER_THREAD)] for _ in range(THREADS)]
    inputs = [[rng.standard_normal((r, 512)).astype(np.float32) for r in rs] for rs in rows]
    got: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        try:
            with grpcclient.InferenceServerClient(server.url) as c:
                start.wait()
                for k, x in enumerate(inputs[t]):
                    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    res = c.infer("mlp", [inp], request_id=f"{t}-{k}")
                    assert res.get_response().id == f"{t}-{k}"
                    got[(t, k)] = res.as_numpy("OUTPUT0")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[:3]
    assert len(got) == THREADS * REQUESTS_PER_THREAD

    everything = np.concatenate([x for xs in inputs for x in xs])
    expected = _reference(repo, everything)
    offset = 0
    for t in range(THREADS):
        for k, x in enumerate(inputs[t]):
            want = expected[offset : offset + len(x)]
            offset += len(x)
            assert got[(t, k)].shape == (len(x), 10)
            # batching may change the float summation order slightly, never whose rows
            np.testing.assert_allclose(got[(t, k)], want, rtol=1e-4, atol=1e-4)

    with grpcclient.InferenceServerClient(server.url) as c:
        stats = c.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    total_rows = sum(sum(rs) for rs in rows)
    total_requests = THREADS * REQUESTS_PER_THREAD
    inf = stats["inference_stats"]
    assert int(stats["inference_count"]) == total_rows
    assert int(inf["success"]["count"]) == total_requests
    assert int(inf["queue"]["count"]) == total_requests
    executions = int(stats["execution_count"])
    assert executions < total_requests, "64 concurrent clients on one instance never batched"
    batch_rows = sum(
        int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats["batch_stats"]
    )
    assert batch_rows == total_rows
    assert sum(int(b["compute_infer"]["count"]) for b in stats["batch_stats"]) == executions
    assert max(int(b["batch_size"]) for b in stats["batch_stats"]) > 1

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        text = r.read().decode()
    labels = {"model": "mlp", "version": "1"}
    assert _metric(text, "nv_inference_request_success", **labels) == total_requests
    assert _metric(text, "nv_inference_count", **labels) == total_rows
    assert _metric(text, "nv_inference_exec_count", **labels) == executions
    assert (
        _metric(text, "nv_inference_queue_duration_us", **labels) == int(inf["queue"]["ns"]) // 1000
    )
    assert _metric(text, "nv_inference_request_failure", reason="REJECTED", **labels) == 0
    assert _metric(text, "nv_inference_pending_request_count", **labels) == 0
    assert _metric(text, "tributary_inference_batch_size_count", **labels) == executions
    assert _metric(text, "tributary_inference_batch_size_sum", **labels) == total_rows
