"""Fixtures for the pure unit tests: tiny model repositories built with scripts/build_models.py."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import build_models  # noqa: E402


@pytest.fixture(scope="session")
def bm() -> ModuleType:
    """The model builders, importable from tests so repositories are made, not committed."""
    return build_models


@pytest.fixture(scope="session")
def digits_trained() -> tuple:
    """(classifier, X, y): training takes a couple of seconds, so do it once."""
    return build_models.train_digits()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory, digits_trained: tuple) -> Path:
    clf = digits_trained[0]
    out = tmp_path_factory.mktemp("digits")
    model_dir = build_models.write_model(
        out,
        "digits",
        build_models.digits_graph(clf),
        build_models.DIGITS_CONFIG.format(name="digits"),
        build_models.DIGIT_NAMES,
    )
    build_models.write_digits_expected(model_dir, clf, digits_trained[1])
    return model_dir
