"""The example models: committed files match their builder and compute what they claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tributary import config as C
from tributary.backends.graph import read_graph

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"
SEQUENCE_MODELS = [
    "simple_sequence",
    "simple_dyna_sequence",
    "simple_string_dyna_sequence",
    "accumulator",
    "gru_cell",
]
COMMITTED = [
    "digits",
    "digits_pre",
    "digits_topk",
    "simple",
    "simple_identity",
    "simple_int8",
    "simple_string",
    *SEQUENCE_MODELS,
]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_repository_holds_the_committed_models() -> None:
    assert set(COMMITTED) <= {p.name for p in REPO.iterdir() if p.is_dir()}


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_loads_and_validates(name: str) -> None:
    d = REPO / name
    model = onnx.load(str(d / "1" / "model.onnx"))
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    config = C.normalize(C.load_config(d), d)
    assert config.platform == "onnxruntime_onnx"
    C.validate(config, read_graph(C.model_file(d, 1, config)), d)


@pytest.mark.parametrize(
    "name",
    [
        "simple",
        "simple_int8",
        "simple_string",
        "simple_identity",
        "digits_pre",
        "digits_topk",
        *SEQUENCE_MODELS,
    ],
)
def test_committed_files_are_reproducible(tmp_path: Path, bm, name: str) -> None:
    built = bm.BUILDERS[name](tmp_path)
    for rel in ("config.pbtxt", "1/model.onnx"):
        assert (built / rel).read_bytes() == (REPO / name / rel).read_bytes(), (
            f"{name}/{rel} is stale: run scripts/build_models.py"
        )


def test_simple_int32_and_int8() -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    out0, out1 = session(REPO / "simple/1/model.onnx").run(None, {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
    a8, b8 = a.astype(np.int8), b.astype(np.int8)
    out0, out1 = session(REPO / "simple_int8/1/model.onnx").run(None, {"INPUT0": a8, "INPUT1": b8})
    assert out0.dtype == np.int8
    np.testing.assert_array_equal(out0, (a + b).astype(np.int8))
    np.testing.assert_array_equal(out1, (a - b).astype(np.int8))


def test_simple_string_does_decimal_arithmetic() -> None:
    a = np.arange(16).reshape(1, 16)
    b = np.full((1, 16), 2)
    s = session(REPO / "simple_string/1/model.onnx")
    to_str = np.vectorize(str, otypes=[object])
    out0, out1 = s.run(None, {"INPUT0": to_str(a), "INPUT1": to_str(b)})
    assert out0.tolist() == to_str(a + b).tolist()
    assert out1.tolist() == to_str(a - b).tolist()
    one_two = {"INPUT0": np.full((1, 16), "1", object), "INPUT1": np.full((1, 16), "2", object)}
    assert s.run(["OUTPUT0"], one_two)[0][0, 0] == "3"


def test_simple_identity_strings() -> None:
    data = np.array([["a", "b\x00c", ""], ["\u00e9", "x" * 100, "1"]], dtype=object)
    [out] = session(REPO / "simple_identity/1/model.onnx").run(None, {"INPUT0": data})
    assert out.tolist() == data.tolist()


def test_digits_matches_what_scikit_learn_predicted_at_build_time() -> None:
    """The committed model against the predictions recorded when it was built (beside it):
    refitting with whatever scikit-learn is installed tests the environment, not us (another
    version fits weights that differ by up to 4e-3)."""
    expected = np.load(REPO / "digits" / "expected_outputs.npz")
    x = expected["input"].astype(np.float32)
    assert x.shape == (1797, 64)
    label, proba = session(REPO / "digits/1/model.onnx").run(None, {"input": x})
    assert label.dtype == np.int64 and label.shape == (len(x),)
    assert proba.dtype == np.float32 and proba.shape == (len(x), 10)
    np.testing.assert_array_equal(label, expected["label"])
    np.testing.assert_allclose(proba, expected["probabilities"], atol=1e-5)


def test_digits_expected_outputs_are_written_by_the_builder(digits_dir: Path) -> None:
    expected = np.load(digits_dir / "expected_outputs.npz")
    x = expected["input"].astype(np.float32)
    label, proba = session(digits_dir / "1/model.onnx").run(None, {"input": x})
    np.testing.assert_array_equal(label, expected["label"])
    np.testing.assert_allclose(proba, expected["probabilities"], atol=1e-5)


def test_digits_built_into_tmp_matches_scikit_learn(digits_dir: Path, digits_trained) -> None:
    clf, x, _ = digits_trained
    label, _ = session(digits_dir / "1/model.onnx").run(None, {"input": x})
    np.testing.assert_array_equal(label, clf.predict(x))
    config = C.normalize(C.load_config(digits_dir), digits_dir)
    sig = C.signature(config, digits_dir)
    assert sig.output("probabilities").labels[7] == "seven"
    assert sig.output("label").reshape == ()


def test_mlp_builder(tmp_path: Path, bm) -> None:
    d = bm.build_mlp(tmp_path)
    config = C.normalize(C.load_config(d), d)
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    C.validate(config, read_graph(C.model_file(d, 1, config)), d)
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    [y] = session(d / "1/model.onnx").run(None, {"INPUT0": x})
    assert y.shape == (3, 10) and np.isfinite(y).all() and np.abs(y).max() > 0
    # the builder is deterministic: a second build gives the same weights
    again = bm.build_mlp(tmp_path / "again")
    assert (again / "1/model.onnx").read_bytes() == (d / "1/model.onnx").read_bytes()


def test_pipeline_steps_compute_what_they_claim() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (5, 64), dtype=np.uint8)
    (pre,) = session(REPO / "digits_pre/1/model.onnx").run(None, {"pixels": raw})
    np.testing.assert_array_equal(pre, raw.astype(np.float32) * np.float32(16 / 255))
    probs = rng.random((5, 10), dtype=np.float32)
    scores, labels = session(REPO / "digits_topk/1/model.onnx").run(None, {"probabilities": probs})
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(labels, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(probs, order, axis=1))


def test_committed_ensemble_is_reproducible_and_plans(tmp_path: Path, bm) -> None:
    from tributary.ensemble import plan

    built = bm.BUILDERS["digits_pipeline"](tmp_path)
    rel = "config.pbtxt"
    assert (built / rel).read_bytes() == (REPO / "digits_pipeline" / rel).read_bytes()
    assert (REPO / "digits_pipeline" / "1").is_dir()
    d = REPO / "digits_pipeline"
    config = C.normalize(C.load_config(d), d)
    assert config.platform == "ensemble" and not config.instance_group
    assert plan(config).dependencies() == ["digits_pre", "digits", "digits_topk"]
