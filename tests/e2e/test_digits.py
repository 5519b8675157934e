"""The digits classifier through the server equals scikit-learn on the whole dataset.

The reference is scikit-learn itself, not a stored answer: a LogisticRegression carrying the
parameters of the served model (read from its LinearClassifier node) predicts the whole
load_digits set. Refitting with build_models.train_digits() would cost ~15 s of CPU per run;
that the committed model *is* that recipe's fit is the unit tests' job
(tests/unit/test_models.py). Also Triton's `classification` output with labels.
"""

from __future__ import annotations

import queue

import build_models
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from e2e_support import MODEL_REPOSITORY
from onnx import helper
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

LABELS = (MODEL_REPOSITORY / "digits" / "labels.txt").read_text().splitlines()
BATCHES = [64, 1, 37, 64, 5, 63, 64, 2]  # cycled over the dataset: sizes up to max_batch_size


@pytest.fixture(scope="module")
def trained() -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
    model = onnx.load(str(MODEL_REPOSITORY / "digits" / "1" / "model.onnx"))
    (node,) = [n for n in model.graph.node if n.op_type == "LinearClassifier"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["post_transform"] == b"SOFTMAX"
    clf = LogisticRegression()
    clf.classes_ = np.array(attrs["classlabels_ints"])
    clf.coef_ = np.array(attrs["coefficients"], dtype=np.float64).reshape(len(clf.classes_), -1)
    clf.intercept_ = np.array(attrs["intercepts"], dtype=np.float64)
    clf.n_features_in_ = clf.coef_.shape[1]
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    assert (clf.predict(x) == y).mean() > 0.95  # it is the trained classifier, not noise
    return clf, x, y


def chunks(n: int):
    start, i = 0, 0
    while start < n:
        size = BATCHES[i % len(BATCHES)]
        yield start, min(start + size, n)
        start, i = start + size, i + 1


def pixels(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_predictions_equal_scikit_learn_on_the_whole_dataset(client, trained) -> None:
    clf, x, _ = trained
    labels = np.empty(len(x), dtype=np.int64)
    probabilities = np.empty((len(x), 10), dtype=np.float32)
    spans = list(chunks(len(x)))
    assert max(hi - lo for lo, hi in spans) == 64
    for lo, hi in spans:
        result = client.infer("digits", [pixels(x[lo:hi])])
        label = result.as_numpy("label")
        assert label.shape == (hi - lo, 1)  # dims [1], model-side reshape [] hidden
        labels[lo:hi] = label[:, 0]
        probabilities[lo:hi] = result.as_numpy("probabilities")
    np.testing.assert_array_equal(labels, clf.predict(x))
    np.testing.assert_allclose(probabilities, clf.predict_proba(x), atol=1e-5)


def test_concurrent_requests_batch_and_still_match(client, trained) -> None:
    """async_infer keeps many requests in flight, so dynamic batching merges them."""
    clf, x, _ = trained
    done: queue.Queue = queue.Queue()
    spans = list(chunks(len(x)))
    for lo, hi in spans:
        client.async_infer(
            "digits",
            [pixels(x[lo:hi])],
            callback=lambda result, error, lo=lo, hi=hi: done.put((lo, hi, result, error)),
            outputs=[grpcclient.InferRequestedOutput("label")],
        )
    labels = np.full(len(x), -1, dtype=np.int64)
    for _ in spans:
        lo, hi, result, error = done.get(timeout=60)
        assert error is None, error
        assert [o.name for o in result.get_response().outputs] == ["label"]
        labels[lo:hi] = result.as_numpy("label")[:, 0]
    np.testing.assert_array_equal(labels, clf.predict(x))


def test_classification_top_k_with_labels(client, trained) -> None:
    clf, x, _ = trained
    batch = x[100:140]
    outputs = [
        grpcclient.InferRequestedOutput("probabilities", class_count=3),
        grpcclient.InferRequestedOutput("label"),
    ]
    result = client.infer("digits", [pixels(batch)], outputs=outputs)
    out = result.get_output("probabilities")
    assert out.datatype == "BYTES"
    assert list(out.shape) == [len(batch), 3]
    classes = result.as_numpy("probabilities")
    predicted = clf.predict(batch)
    proba = clf.predict_proba(batch)
    np.testing.assert_array_equal(result.as_numpy("label")[:, 0], predicted)
    for row, pred, p in zip(classes, predicted, proba, strict=True):
        parts = [entry.decode().split(":") for entry in row]
        assert all(len(part) == 3 for part in parts)
        values = [float(v) for v, _, _ in parts]
        indices = [int(i) for _, i, _ in parts]
        assert values == sorted(values, reverse=True)
        assert indices[0] == pred
        assert parts[0][2] == LABELS[pred] == build_models.DIGIT_NAMES[pred]
        assert all(label == LABELS[i] for (_, _, label), i in zip(parts, indices, strict=True))
        assert indices == list(np.argsort(-p, kind="stable")[:3])
        np.testing.assert_allclose(values, p[indices], atol=2e-6)
        assert all(len(v.split(".")[1]) == 6 for v, _, _ in parts)  # std::to_string style


def test_classification_count_larger_than_classes(client, trained) -> None:
    _, x, _ = trained
    outputs = [grpcclient.InferRequestedOutput("probabilities", class_count=50)]
    result = client.infer("digits", [pixels(x[:2])], outputs=outputs)
    assert result.as_numpy("probabilities").shape == (2, 10)
