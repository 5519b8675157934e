"""Ensembles end to end (docs/model-config.md#ensembles): `digits_pipeline` from
model_repository/ (digits_pre -> digits -> digits_topk) through tritonclient (sync, async,
stream), against a numpy reference; metadata, config and statistics as Triton reports them;
errors; explicit-mode loading and unloading; hostile configs.
"""

from __future__ import annotations

import json
import queue
import shutil
from pathlib import Path

import build_models
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY
from tritonclient.utils import InferenceServerException

ENSEMBLE = "digits_pipeline"
EXPLICIT = "--model-control-mode=explicit"
OUTPUTS = ("LABEL", "PROBABILITIES", "TOP_SCORES", "TOP_LABELS")


def pixels(n: int = 8, offset: int = 0) -> np.ndarray:
    """Raw 8-bit images made from the digits data set's own samples (0..16 scaled to 0..255)."""
    x = np.load(MODEL_REPOSITORY / "digits" / "expected_outputs.npz")["input"]
    return np.round(x[offset : offset + n].astype(np.float32) * 255 / 16).astype(np.uint8)


def pixel_input(raw: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("PIXELS", list(raw.shape), "UINT8")
    inp.set_data_from_numpy(raw)
    return [inp]


def reference(client: grpcclient.InferenceServerClient, raw: np.ndarray) -> dict[str, np.ndarray]:
    """numpy for the pre/post steps; the digits step is the served `digits` model, called
    directly by the client: what a user would do without the ensemble."""
    normalized = raw.astype(np.float32) * np.float32(build_models.PIXEL_SCALE)
    inp = grpcclient.InferInput("input", list(normalized.shape), "FP32")
    inp.set_data_from_numpy(normalized)
    direct = client.infer("digits", [inp])
    probs = direct.as_numpy("probabilities")
    order = np.argsort(-probs, axis=1, kind="stable")[:, : build_models.TOPK]
    return {
        "LABEL": direct.as_numpy("label"),
        "PROBABILITIES": probs,
        "TOP_SCORES": np.take_along_axis(probs, order, axis=1),
        "TOP_LABELS": order.astype(np.int64),
    }


def check(result: grpcclient.InferResult, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result.as_numpy("LABEL"), expected["LABEL"])
    np.testing.assert_array_equal(result.as_numpy("TOP_LABELS"), expected["TOP_LABELS"])
    for name in ("PROBABILITIES", "TOP_SCORES"):
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-6, atol=1e-7)


def stats(client: grpcclient.InferenceServerClient, name: str = "") -> dict[str, object]:
    reply = client.get_inference_statistics(name)
    return {m.name: m for m in reply.model_stats}


# -- inference ------------------------------------------------------------------------------------


def test_sync_infer_matches_the_steps_called_one_by_one(client) -> None:
    raw = pixels(8)
    result = client.infer(ENSEMBLE, pixel_input(raw))
    check(result, reference(client, raw))
    assert result.as_numpy("LABEL").shape == (8, 1)
    assert result.get_response().model_name == ENSEMBLE
    # and the digits labels agree with what scikit-learn predicted for these images
    expected = np.load(MODEL_REPOSITORY / "digits" / "expected_outputs.npz")["label"][:8]
    np.testing.assert_array_equal(result.as_numpy("LABEL")[:, 0], expected)


def test_async_infer(client) -> None:
    raw = pixels(4, offset=20)
    done: queue.Queue = queue.Queue()
    client.async_infer(ENSEMBLE, pixel_input(raw), lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    assert error is None
    check(result, reference(client, raw))


def test_stream_infer_many_requests(server) -> None:
    results: queue.Queue = queue.Queue()
    raws = [pixels(1 + i % 3, offset=i) for i in range(12)]
    with grpcclient.InferenceServerClient(server.url) as c:
        c.start_stream(lambda result, error: results.put((result, error)))
        for i, raw in enumerate(raws):
            c.async_stream_infer(ENSEMBLE, pixel_input(raw), request_id=str(i))
        got = {}
        for _ in raws:
            r, e = results.get(timeout=60)
            assert e is None, e
            got[r.get_response().id] = r
        c.stop_stream()
        for i, raw in enumerate(raws):
            check(got[str(i)], reference(c, raw))


def test_requested_subset_of_outputs_and_classification(client) -> None:
    raw = pixels(2)
    outputs = [
        grpcclient.InferRequestedOutput("TOP_LABELS"),
        grpcclient.InferRequestedOutput("PROBABILITIES", class_count=2),
    ]
    result = client.infer(ENSEMBLE, pixel_input(raw), outputs=outputs)
    names = [o.name for o in result.get_response().outputs]
    assert names == ["TOP_LABELS", "PROBABILITIES"]
    ref = reference(client, raw)
    np.testing.assert_array_equal(result.as_numpy("TOP_LABELS"), ref["TOP_LABELS"])
    top = result.as_numpy("PROBABILITIES")  # "score:index" strings, best first
    assert [int(s.decode().split(":")[1]) for s in top[0]] == list(ref["TOP_LABELS"][0][:2])


# -- metadata, config, statistics ---------------------------------------------------------------


def test_metadata_and_config(client) -> None:
    meta = client.get_model_metadata(ENSEMBLE)
    assert meta.platform == "ensemble" and meta.versions == ["1"]
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("PIXELS", "UINT8", [-1, 64])
    ]
    assert [o.name for o in meta.outputs] == list(OUTPUTS)
    config = client.get_model_config(ENSEMBLE).config
    assert config.platform == "ensemble" and config.max_batch_size == 64
    assert [s.model_name for s in config.ensemble_scheduling.step] == [
        "digits_pre",
        "digits",
        "digits_topk",
    ]
    assert [s.model_version for s in config.ensemble_scheduling.step] == [-1, -1, -1]
    assert not config.instance_group  # an ensemble has no instances
    assert client.is_model_ready(ENSEMBLE)


def test_statistics_count_the_ensemble_and_each_composing_model(client) -> None:
    names = (ENSEMBLE, "digits_pre", "digits", "digits_topk")
    before = stats(client)
    for i in range(3):
        client.infer(ENSEMBLE, pixel_input(pixels(2, offset=i)))
    after = stats(client)  # ModelStatistics(""), as perf_analyzer reads for ensembles
    for name in names:
        b, a = before[name].inference_stats, after[name].inference_stats
        assert a.success.count - b.success.count == 3, name
        assert a.queue.count - b.queue.count == 3, name
        assert after[name].inference_count - before[name].inference_count == 6, name
    ens_b, ens_a = before[ENSEMBLE], after[ENSEMBLE]
    # the ensemble's own entry has no compute: that is its composing models'
    assert ens_a.inference_stats.compute_infer.ns == ens_b.inference_stats.compute_infer.ns == 0
    assert ens_a.execution_count == 0
    digits_b, digits_a = before["digits"], after["digits"]
    assert digits_a.inference_stats.compute_infer.ns > digits_b.inference_stats.compute_infer.ns
    assert digits_a.execution_count > digits_b.execution_count
    assert ens_a.inference_stats.success.ns - ens_b.inference_stats.success.ns > 0


# -- errors ---------------------------------------------------------------------------------------


def test_a_bad_request_names_the_ensemble(client) -> None:
    inp = grpcclient.InferInput("PIXELS", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer(ENSEMBLE, [inp])
    assert "inference input 'PIXELS' data-type is 'FP32', but model 'digits_pipeline' expects " in (
        info.value.message()
    )
    with pytest.raises(InferenceServerException) as info:
        client.infer(ENSEMBLE, pixel_input(np.zeros((65, 64), np.uint8)))
    assert "batch-size must be <= 64 for 'digits_pipeline'" in info.value.message()


IDENTITY_FP32 = """\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
"""
FIXED_FP32 = """\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""


def chain_ensemble(name: str, steps: list[str], dims: str = "-1") -> str:
    """An ensemble of identity steps: IN -> steps[0] -> t1 -> ... -> OUT."""
    body = []
    for i, model in enumerate(steps):
        src = "IN" if i == 0 else f"t{i}"
        dst = "OUT" if i == len(steps) - 1 else f"t{i + 1}"
        body.append(
            f'{{ model_name: "{model}" model_version: -1 '
            f'input_map {{ key: "INPUT0" value: "{src}" }} '
            f'output_map {{ key: "OUTPUT0" value: "{dst}" }} }}'
        )
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 8\n'
        f'input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        "ensemble_scheduling { step [ " + ", ".join(body) + " ] }\n"
    )


@pytest.fixture(scope="module")
def chain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chains") / "models"
    graph = build_models.identity_graph("FP32", ("N", "D"))
    build_models.write_model(root, "id_any", graph, IDENTITY_FP32.format(name="id_any"))
    build_models.write_model(root, "id_four", graph, FIXED_FP32.format(name="id_four"))
    for name, steps in (("any_then_four", ["id_any", "id_four"]), ("twice", ["id_any", "id_any"])):
        build_models.write_model(root, name, None, chain_ensemble(name, steps))
        (root / name / "1").mkdir()
    return root


def test_a_failing_step_names_its_model(server_factory, chain_repo) -> None:
    server = server_factory(chain_repo)
    with grpcclient.InferenceServerClient(server.url) as c:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = grpcclient.InferInput("IN", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("any_then_four", [inp]).as_numpy("OUT"), x)
        np.testing.assert_array_equal(c.infer("twice", [inp]).as_numpy("OUT"), x)
        bad = grpcclient.InferInput("IN", [2, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
        with pytest.raises(InferenceServerException) as info:
            c.infer("any_then_four", [bad])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert (
            "unexpected shape for input 'INPUT0' for model 'id_four'. Expected [-1,4], got [2,3]"
            in (info.value.message())
        )
        failed = stats(c, "id_four")["id_four"].inference_stats.fail.count
        ens = stats(c, "any_then_four")["any_then_four"].inference_stats
        assert ens.fail.count == 1 and ens.success.count == 1 and failed == 0  # refused before it


# -- loading and unloading -------------------------------------------------------------------------


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, target)
    return target


def index(c: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models if m.version}


def test_explicit_loading_an_ensemble_loads_its_composing_models(server_factory, repo_copy) -> None:
    server = server_factory(repo_copy, EXPLICIT, f"--load-model={ENSEMBLE}")
    with grpcclient.InferenceServerClient(server.url) as c:
        states = index(c)
        for name in (ENSEMBLE, "digits_pre", "digits", "digits_topk"):
            assert states[name][0] == "READY", (name, states)
        assert "simple" not in states  # only what the ensemble needs
        raw = pixels(3)
        check(c.infer(ENSEMBLE, pixel_input(raw)), reference(c, raw))

        # unloading a composing model takes the ensemble down, saying why
        c.unload_model("digits")
        assert not c.is_model_ready(ENSEMBLE)
        state, reason = index(c)[ENSEMBLE]
        assert state == "UNAVAILABLE"
        assert (
            "ensemble 'digits_pipeline' depends on 'digits' which has no loaded version" in reason
        )
        with pytest.raises(InferenceServerException) as info:
            c.infer(ENSEMBLE, pixel_input(raw))
        assert "depends on 'digits' which has no loaded version" in info.value.message()
        assert c.is_server_ready()  # unloaded on purpose: not a failure

        # loading it again brings digits back; unload_dependents takes the steps with it
        c.load_model(ENSEMBLE)
        assert c.is_model_ready("digits") and c.is_model_ready(ENSEMBLE)
        c.unload_model(ENSEMBLE, unload_dependents=True)
        states = index(c)
        for name in (ENSEMBLE, "digits_pre", "digits", "digits_topk"):
            assert states[name][0] == "UNAVAILABLE", (name, states)


def test_none_mode_loads_composing_models_first(server_factory, repo_copy) -> None:
    # one load thread: the order is the repository's, and still the ensemble comes last
    server = server_factory(repo_copy, "--model-load-thread-count=1")
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready(ENSEMBLE)
        assert f"loaded ensemble '{ENSEMBLE}'" in server.log()
        log = server.log()
        assert log.index("loaded model 'digits_topk'") < log.index(f"loaded ensemble '{ENSEMBLE}'")


def test_an_ensemble_on_a_missing_model_fails_to_load(server_factory, tmp_path) -> None:
    root = tmp_path / "models"
    build_models.write_model(root, "lonely", None, chain_ensemble("lonely", ["nowhere"]))
    (root / "lonely" / "1").mkdir()
    server = server_factory(root, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.load_model("lonely")
        assert "ensemble 'lonely' depends on 'nowhere' which has no loaded version" in (
            info.value.message()
        )


def test_hostile_configs_are_refused_at_load(server_factory, chain_repo) -> None:
    server = server_factory(chain_repo, EXPLICIT)
    with grpcclient.InferenceServerClient(server.url) as c:

        def load_with(config: dict) -> str:
            with pytest.raises(InferenceServerException) as info:
                c.load_model("twice", config=json.dumps(config))
            return info.value.message()

        def steps(n: int, cycle: bool = False) -> list[dict]:
            out = []
            for i in range(n):
                out.append(
                    {
                        "model_name": "id_any",
                        "model_version": -1,
                        "input_map": {"INPUT0": "IN" if i == 0 else f"t{i}"},
                        "output_map": {"OUTPUT0": "OUT" if i == n - 1 else f"t{i + 1}"},
                    }
                )
            if cycle:  # step 0 also needs the last step's output
                out[0]["input_map"] = {"INPUT0": "IN", "EXTRA": f"t{n}"}
                out[-1]["output_map"] = {"OUTPUT0": "OUT", "x": f"t{n}"}
            return out

        base = {
            "name": "twice",
            "platform": "ensemble",
            "max_batch_size": 8,
            "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [-1]}],
        }
        message = load_with({**base, "ensemble_scheduling": {"step": steps(10_000)}})
        assert "10000 steps; this server allows at most 256" in message
        message = load_with({**base, "ensemble_scheduling": {"step": steps(3, cycle=True)}})
        assert "output 'OUT' for ensemble 'twice' is not written" in message
        produced_twice = steps(2)
        produced_twice[1]["output_map"] = {"OUTPUT0": "t1"}
        message = load_with({**base, "ensemble_scheduling": {"step": produced_twice}})
        assert "ensemble tensor 't1' can appear in an output map only once" in message
        assert c.is_server_live()


def test_a_reload_that_would_close_a_cycle_of_ensembles_is_refused(
    server_factory, chain_repo, tmp_path
) -> None:
    """`outer` runs `twice`; reloading `twice` to run `outer` passed every load check (its
    composing model was loaded) and then every request to either ensemble ran forever inside
    itself and was never answered. Triton refuses the cycle at load; the old version stays."""
    repo = tmp_path / "models"
    shutil.copytree(chain_repo, repo)
    build_models.write_model(repo, "outer", None, ensemble_over("outer", "twice"))
    (repo / "outer" / "1").mkdir()
    server = server_factory(repo, EXPLICIT, "--load-model=outer")
    with grpcclient.InferenceServerClient(server.url) as c:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = grpcclient.InferInput("IN", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("outer", [inp]).as_numpy("OUT"), x)
        cycle = json_config(ensemble_over("twice", "outer"))
        with pytest.raises(InferenceServerException) as info:
            c.load_model("twice", config=json.dumps(cycle))
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "circular dependency between ensembles: twice -> ... -> outer -> twice" in (
            info.value.message()
        )
        result = c.infer("outer", [inp], client_timeout=20)  # the old `twice` still serves
        np.testing.assert_array_equal(result.as_numpy("OUT"), x)


def ensemble_over(name: str, model: str) -> str:
    """An ensemble of one step that runs another ensemble of the chain kind (IN -> OUT)."""
    chain = chain_ensemble(name, [model])
    return chain.replace('key: "INPUT0"', 'key: "IN"').replace('key: "OUTPUT0"', 'key: "OUT"')


def json_config(text: str) -> dict:
    """A config's text form as the JSON a load request carries."""
    from google.protobuf import json_format, text_format

    from tributary_client._proto import model_config_pb2 as mc

    return json_format.MessageToDict(
        text_format.Parse(text, mc.ModelConfig()), preserving_proto_field_name=True
    )


def test_a_grpc_worker_is_not_held_per_step(server_factory, chain_repo) -> None:
    """Many concurrent ensemble requests through a server with few gRPC workers: each request
    holds one worker while it waits, never one per step, so all complete."""
    server = server_factory(chain_repo, "--grpc-worker-threads=4")
    x = np.ones((1, 4), np.float32)
    with grpcclient.InferenceServerClient(server.url) as c:
        results: queue.Queue = queue.Queue()
        for _ in range(32):
            inp = grpcclient.InferInput("IN", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            c.async_infer("twice", [inp], lambda result, error: results.put((result, error)))
        for _ in range(32):
            r, e = results.get(timeout=60)
            assert e is None
            np.testing.assert_array_equal(r.as_numpy("OUT"), x)
