"""Sequence batching end to end through tritonclient: the call patterns of Triton's sequence
example clients (sync, stream, asyncio stream) against `simple_sequence` and
`simple_dyna_sequence`, the stateful models (`accumulator`, `gru_cell`) against numpy, Triton's
error texts, idle release, bounds and unload while sequences are open."""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import build_models as bm
import grpc
import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from e2e_support import MODEL_REPOSITORY, triton_error, wait_for
from onnx import numpy_helper

VALUES = [11, 7, 5, 3, 2, 0, 1]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _inputs(value: int, module: Any = grpcclient) -> list[Any]:
    data = np.full((1, 1), value, dtype=np.int32)
    inp = module.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(data)
    return [inp]


def _out(result: Any) -> int:
    return int(result.as_numpy("OUTPUT")[0, 0])


def _seq_kwargs(seq_id: int | str, i: int, n: int) -> dict[str, Any]:
    return {"sequence_id": seq_id, "sequence_start": i == 0, "sequence_end": i == n - 1}


def _expected_simple(values: list[int]) -> list[int]:
    """simple_sequence: OUTPUT = INPUT + START (READY is 1 for every real request)."""
    return [v + (1 if i == 0 else 0) for i, v in enumerate(values)]


# ------------------------------------------------------------------- the example clients' shapes


def test_sync_sequences_interleave_ids_of_both_kinds(client):
    seqs = {
        1000: [0] + VALUES,
        1001: [100] + [-v for v in VALUES],
        str(uuid.uuid4()): [20] + VALUES,
    }
    got: dict[int | str, list[int]] = {k: [] for k in seqs}
    n = len(VALUES) + 1
    for i in range(n):  # one request of each sequence in turn: all three are open together
        for sid, values in seqs.items():
            result = client.infer("simple_sequence", _inputs(values[i]), **_seq_kwargs(sid, i, n))
            got[sid].append(_out(result))
    assert got == {sid: _expected_simple(v) for sid, v in seqs.items()}


def test_stream_sequences_answer_each_request_in_order(server):
    results: queue.Queue[Any] = queue.Queue()
    seqs = {2000: [0] + VALUES, 2001: [100] + [-v for v in VALUES], "s-2002": [20] + VALUES}
    n = len(VALUES) + 1
    with grpcclient.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: results.put(error or result))
        for sid, values in seqs.items():  # all requests pipelined, as the example does
            for i, v in enumerate(values):
                c.async_stream_infer(
                    "simple_sequence",
                    _inputs(v),
                    request_id=f"{sid}_{i}",
                    **_seq_kwargs(sid, i, n),
                )
        got: dict[str, list[tuple[int, int]]] = {str(k): [] for k in seqs}
        for _ in range(n * len(seqs)):
            item = results.get(timeout=30)
            assert not isinstance(item, Exception), item
            sid, idx = item.get_response().id.rsplit("_", 1)
            got[sid].append((int(idx), _out(item)))
        c.stop_stream()
    for sid, values in seqs.items():
        order = [idx for idx, _ in got[str(sid)]]
        assert order == list(range(n))  # one sequence's responses come back in order
        assert [out for _, out in got[str(sid)]] == _expected_simple(values)


def test_asyncio_stream_sequence(server):
    n = len(VALUES) + 1

    async def run() -> list[int]:
        async with aioclient.InferenceServerClient(server.url) as c:

            async def requests():
                for i, v in enumerate([0] + VALUES):
                    yield {
                        "model_name": "simple_sequence",
                        "inputs": _inputs(v, aioclient),
                        "request_id": str(i),
                        **_seq_kwargs(3000, i, n),
                    }

            out: list[int] = []
            async for result, error in c.stream_infer(requests()):
                assert error is None, error
                out.append(_out(result))
                if len(out) == n:
                    break
            return out

    assert asyncio.run(run()) == _expected_simple([0] + VALUES)


def test_dyna_sequence_adds_the_correlation_id_at_end(client):
    n = len(VALUES) + 1
    got = [
        _out(client.infer("simple_dyna_sequence", _inputs(v), **_seq_kwargs(4242, i, n)))
        for i, v in enumerate([0] + VALUES)
    ]
    expected = [v + (i == 0) + (4242 if i == n - 1 else 0) for i, v in enumerate([0] + VALUES)]
    assert got == expected
    msg = triton_error(
        INVALID,
        client.infer,
        "simple_dyna_sequence",
        _inputs(1),
        sequence_id="4243",
        sequence_start=True,
    )
    assert (
        "sequence batching control 'CORRID' data-type is 'BYTES', but model "
        "'simple_dyna_sequence' expects 'UINT64'" in msg
    )


def test_string_dyna_sequence_accumulates_and_adds_the_string_id_at_end(server):
    """The --dyna pattern of the stream example: a string CORRID, a running sum kept as
    implicit state, the ID's number added on the END request."""
    results: queue.Queue[Any] = queue.Queue()
    values = [20] + [-v for v in VALUES]
    n = len(values)
    with grpcclient.InferenceServerClient(server.url) as c:
        c.start_stream(callback=lambda result, error: results.put(error or result))
        for i, v in enumerate(values):
            c.async_stream_infer(
                "simple_string_dyna_sequence", _inputs(v), **_seq_kwargs("1002", i, n)
            )
        got = []
        for _ in range(n):
            item = results.get(timeout=30)
            assert not isinstance(item, Exception), item
            got.append(_out(item))
        c.stop_stream()
    expected = np.cumsum(values)
    expected[-1] += 1002
    assert got == expected.tolist()


def test_oldest_strategy_batches_concurrent_sequences(server, client):
    before = client.get_inference_statistics("simple_dyna_sequence").model_stats[0]
    sequences = 16
    errors: list[BaseException] = []
    outputs: dict[int, list[int]] = {}

    def run(sid: int) -> None:
        try:
            with grpcclient.InferenceServerClient(server.url) as c:
                outputs[sid] = [
                    _out(c.infer("simple_dyna_sequence", _inputs(v), **_seq_kwargs(sid, i, 3)))
                    for i, v in enumerate([5, 6, 7])
                ]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(5000 + k,)) for k in range(sequences)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert outputs == {5000 + k: [6, 6, 7 + 5000 + k] for k in range(sequences)}
    after = client.get_inference_statistics("simple_dyna_sequence").model_stats[0]
    requests = after.inference_stats.success.count - before.inference_stats.success.count
    executions = after.execution_count - before.execution_count
    assert requests == 3 * sequences
    assert executions < requests  # rows of several sequences ran together


# ------------------------------------------------------------------- implicit state


def test_accumulator_keeps_state_per_sequence_under_concurrency(server):
    rng = np.random.default_rng(3)
    data = {sid: rng.integers(-1000, 1000, size=12).tolist() for sid in range(1, 25)}
    data[2**63] = [1, 2, 3]  # the int64 parameter is read as uint64: any 64-bit id works
    data[-5] = [4, 5, 6]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(sid: int, values: list[int]) -> None:
        try:
            with grpcclient.InferenceServerClient(server.url) as c:
                n = len(values)
                ids = sid if sid < 2**63 else sid - 2**64  # sent as int64_param
                got[sid] = [
                    _out(c.infer("accumulator", _inputs(v), **_seq_kwargs(ids, i, n)))
                    for i, v in enumerate(values)
                ]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in data.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == {sid: np.cumsum(v).tolist() for sid, v in data.items()}


def _gru_reference(model: Path, xs: np.ndarray) -> np.ndarray:
    """One GRU step per row of `xs` (ONNX's equations, gate order z, r, h), state from zero."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    w, r, b = weights["W"][0], weights["R"][0], weights["B"][0]
    hidden = r.shape[1]
    wz, wr, wh = np.split(w, 3)
    rz, rr, rh = np.split(r, 3)
    wbz, wbr, wbh, rbz, rbr, rbh = np.split(b, 6)

    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    h = np.zeros(hidden, dtype=np.float64)
    out = []
    for x in xs.astype(np.float64):
        z = sigmoid(x @ wz.T + h @ rz.T + wbz + rbz)
        rr_ = sigmoid(x @ wr.T + h @ rr.T + wbr + rbr)
        hh = np.tanh(x @ wh.T + (rr_ * h) @ rh.T + rbh + wbh)
        h = (1 - z) * hh + z * h
        out.append(h.copy())
    return np.array(out)


def test_gru_cell_matches_numpy_reference_with_server_kept_state(client):
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((6, bm.GRU_INPUT)).astype(np.float32)
    ys = []
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("X", [1, bm.GRU_INPUT], "FP32")
        inp.set_data_from_numpy(x[np.newaxis])
        result = client.infer("gru_cell", [inp], **_seq_kwargs("gru-1", i, len(xs)))
        ys.append(result.as_numpy("Y")[0])
    expected = _gru_reference(MODEL_REPOSITORY / "gru_cell" / "1" / "model.onnx", xs)
    np.testing.assert_allclose(np.array(ys), expected, rtol=1e-4, atol=1e-5)


def test_state_and_control_inputs_are_not_client_visible(client):
    meta = client.get_model_metadata("accumulator")
    assert [i.name for i in meta.inputs] == ["INPUT"]
    assert [o.name for o in meta.outputs] == ["OUTPUT"]
    meta = client.get_model_metadata("simple_dyna_sequence")
    assert [i.name for i in meta.inputs] == ["INPUT"]
    ready = grpcclient.InferInput("READY", [1, 1], "INT32")
    ready.set_data_from_numpy(np.ones((1, 1), np.int32))
    msg = triton_error(
        INVALID,
        client.infer,
        "simple_sequence",
        _inputs(1) + [ready],
        sequence_id=77,
        sequence_start=True,
    )
    assert "unexpected inference input 'READY'" in msg
    assert "sequence" in client.get_server_metadata().extensions


# ------------------------------------------------------------------- errors and hostile input


def test_tritons_errors_for_bad_sequence_requests(client):
    msg = triton_error(INVALID, client.infer, "accumulator", _inputs(1))
    assert msg.endswith(
        "inference request to model 'accumulator' must specify a non-zero or non-empty "
        "correlation ID"
    )
    msg = triton_error(INVALID, client.infer, "accumulator", _inputs(1), sequence_id=98765)
    assert (
        "inference request for sequence 98765 to model 'accumulator' must specify the START "
        "flag on the first request of the sequence" in msg
    )
    msg = triton_error(INVALID, client.infer, "accumulator", _inputs(1), sequence_id="nope")
    assert "inference request for sequence nope to model 'accumulator' must specify" in msg
    two = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    two.set_data_from_numpy(np.ones((2, 1), np.int32))
    msg = triton_error(
        INVALID, client.infer, "accumulator", [two], sequence_id=5, sequence_start=True
    )
    assert "must specify batch-size 1 due to requirements of sequence batcher" in msg
    msg = triton_error(
        INVALID,
        client.infer,
        "accumulator",
        _inputs(1),
        sequence_id="x" * 257,
        sequence_start=True,
    )
    assert "'sequence_id' parameter is longer than the server's limit of 256 bytes" in msg


def _repo(tmp_path: Path, idle_us: int, *, slots_config: str = "") -> Path:
    repo = tmp_path / "repo"
    text = bm.ACCUMULATOR_CONFIG.format(name="accumulator")
    text = text.replace(
        "max_sequence_idle_microseconds: 5000000", f"max_sequence_idle_microseconds: {idle_us}"
    )
    text = text.replace("max_batch_size: 8", "max_batch_size: 1")
    text += "instance_group [ { kind: KIND_CPU, count: 1 } ]\n" + slots_config
    bm.build_accumulator(repo, config=text)
    return repo


def test_idle_sequence_is_released_and_its_slot_goes_to_a_waiting_sequence(
    server_factory, tmp_path
):
    srv = server_factory(_repo(tmp_path, 300_000))  # one slot, 0.3 s idle
    with grpcclient.InferenceServerClient(srv.url) as c:
        assert _out(c.infer("accumulator", _inputs(5), sequence_id=1, sequence_start=True)) == 5
        waiting: queue.Queue[Any] = queue.Queue()

        def second() -> None:
            with grpcclient.InferenceServerClient(srv.url) as c2:
                try:
                    waiting.put(
                        c2.infer("accumulator", _inputs(7), sequence_id=2, sequence_start=True)
                    )
                except Exception as exc:  # noqa: BLE001
                    waiting.put(exc)

        t = threading.Thread(target=second)
        t.start()
        result = waiting.get(timeout=30)  # only answered once sequence 1 was released
        t.join()
        assert _out(result) == 7
        msg = triton_error(INVALID, c.infer, "accumulator", _inputs(1), sequence_id=1)
        assert (
            "inference request for sequence 1 to model 'accumulator' must specify the START" in msg
        )


def test_flood_of_starts_without_end_drains_through_one_slot(server_factory, tmp_path):
    """Every START without END holds the only slot until it goes idle; the rest wait in the
    (bounded) backlog and all are answered, in turn, as the idle sequences are released."""
    srv = server_factory(_repo(tmp_path, 50_000))
    results: queue.Queue[Any] = queue.Queue()
    count = 12
    with grpcclient.InferenceServerClient(srv.url) as c:
        c.start_stream(callback=lambda result, error: results.put(error or result))
        for sid in range(1, count + 1):
            c.async_stream_infer("accumulator", _inputs(sid), sequence_id=sid, sequence_start=True)
        got = sorted(_out(results.get(timeout=60)) for _ in range(count))
        c.stop_stream()
    assert got == list(range(1, count + 1))


def test_a_backlogged_client_that_gave_up_frees_its_place_and_thread(server_factory, tmp_path):
    """The only slot is held by a sequence that stays open (idle time 10 min); clients whose
    deadline passes while their START waits in the backlog are answered CANCELED on the server
    within a moment, so they neither fill the backlog nor hold a worker thread for minutes."""
    srv = server_factory(_repo(tmp_path, 600_000_000))
    with grpcclient.InferenceServerClient(srv.url) as c:
        c.infer("accumulator", _inputs(1), sequence_id=1, sequence_start=True)
        for sid in (2, 3, 4):
            msg = triton_error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                c.infer,
                "accumulator",
                _inputs(sid),
                sequence_id=sid,
                sequence_start=True,
                client_timeout=0.3,
            )
            assert "Deadline Exceeded" in msg

        def failed() -> int:
            stats = c.get_inference_statistics("accumulator").model_stats[0]
            return int(stats.inference_stats.fail.count)

        wait_for(lambda: failed() == 3, timeout=20, what="the backlogged requests to fail")
        # the open sequence is untouched and still has the slot
        out = c.infer("accumulator", _inputs(5), sequence_id=1, sequence_end=True)
        assert _out(out) == 6


def test_an_ensemble_over_a_sequence_model_passes_the_sequence_on(server_factory, tmp_path):
    """Every step gets the ensemble request's sequence ID and flags, as in Triton: the
    accumulator keeps its running sum per sequence behind the ensemble."""
    repo = _repo(tmp_path, 5_000_000)
    (repo / "acc_ens" / "1").mkdir(parents=True)
    (repo / "acc_ens" / "config.pbtxt").write_text(
        'name: "acc_ens"\nplatform: "ensemble"\nmax_batch_size: 1\n'
        'input [ { name: "IN" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "accumulator" model_version: -1 '
        'input_map { key: "INPUT" value: "IN" } output_map { key: "OUTPUT" value: "OUT" } } ] }\n'
    )
    srv = server_factory(repo)
    with grpcclient.InferenceServerClient(srv.url) as c:
        sums = []
        for i, v in enumerate([3, 4, 5]):
            inp = grpcclient.InferInput("IN", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), v, np.int32))
            result = c.infer("acc_ens", [inp], **_seq_kwargs(77, i, 3))
            sums.append(int(result.as_numpy("OUT")[0, 0]))
        assert sums == [3, 7, 12]
        inp = grpcclient.InferInput("IN", [1, 1], "INT32")
        inp.set_data_from_numpy(np.full((1, 1), 1, np.int32))
        msg = triton_error(INVALID, c.infer, "acc_ens", [inp], sequence_id=77)
        assert "sequence 77 to model 'accumulator' must specify the START flag" in msg


def test_unload_with_open_sequences_then_reload(server_factory, tmp_path):
    repo = _repo(tmp_path, 5_000_000)
    srv = server_factory(repo, "--model-control-mode=explicit", "--load-model=accumulator")
    with grpcclient.InferenceServerClient(srv.url) as c:
        c.infer("accumulator", _inputs(3), sequence_id=9, sequence_start=True)
        c.unload_model("accumulator")
        wait_for(lambda: not c.is_model_ready("accumulator"), what="unload")
        msg = triton_error(
            grpc.StatusCode.NOT_FOUND, c.infer, "accumulator", _inputs(1), sequence_id=9
        )
        assert "'accumulator' has no available versions" in msg
        c.load_model("accumulator")
        # the old version's slot is gone with it: a new START gets the only slot at once
        out = c.infer("accumulator", _inputs(4), sequence_id=10, sequence_start=True)
        assert _out(out) == 4
        msg = triton_error(INVALID, c.infer, "accumulator", _inputs(1), sequence_id=9)
        assert "must specify the START flag" in msg


def test_initial_state_from_a_data_file_inside_the_model_dir(server_factory, tmp_path):
    text = bm.ACCUMULATOR_CONFIG.format(name="accumulator").replace(
        "zero_data: true", 'data_file: "start.bin"'
    )
    repo = tmp_path / "repo"
    model = bm.build_accumulator(repo, config=text)
    (model / "initial_state").mkdir()
    (model / "initial_state" / "start.bin").write_bytes(np.array([1000], "<i4").tobytes())
    srv = server_factory(repo)
    with grpcclient.InferenceServerClient(srv.url) as c:
        outs = [
            _out(c.infer("accumulator", _inputs(v), **_seq_kwargs(1, i, 3)))
            for i, v in enumerate([1, 2, 3])
        ]
    assert outs == [1001, 1003, 1006]
