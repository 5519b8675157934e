"""model_warmup samples: what reaches the model, and the bounds a config override cannot pass
(server/tributary/model.py; docs/limits.md#warmup-files)."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from tributary import model as M
from tributary.errors import ModelLoadError
from tributary_client._proto import model_config_pb2 as mc


def sample(text: str) -> Any:
    return text_format.Parse(text, mc.ModelWarmup())


def file_sample(dtype: str, dims: str, batch: int = 3) -> Any:
    return sample(
        f'name: "s" batch_size: {batch} inputs {{ key: "INPUT0" value {{ data_type: {dtype} '
        f'dims: {dims} input_data_file: "in.bin" }} }}'
    )


def warmup_dir(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "in.bin").write_bytes(data)
    return tmp_path


def test_the_files_bytes_reach_the_model(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [3.25, 7.0]], dtype="<f4")
    d = warmup_dir(tmp_path, values.tobytes() + b"excess")  # Triton ignores the excess
    arrays = M._warmup_inputs("m", file_sample("TYPE_FP32", "[2, 2]"), 3, d)
    assert arrays["INPUT0"].shape == (3, 2, 2)
    for row in arrays["INPUT0"]:
        np.testing.assert_array_equal(row, values)
    # without batching: the one sample as it is
    arrays = M._warmup_inputs("m", file_sample("TYPE_FP32", "[2, 2]"), 0, d)
    np.testing.assert_array_equal(arrays["INPUT0"], values)


def test_bytes_files_are_decoded_element_by_element(tmp_path: Path) -> None:
    words = [b"h\xc3\xa9", b"", b"xyz"]
    d = warmup_dir(tmp_path, b"".join(struct.pack("<I", len(w)) + w for w in words))
    arrays = M._warmup_inputs("m", file_sample("TYPE_STRING", "[3]", batch=1), 1, d)
    assert arrays["INPUT0"].tolist() == [["hé", "", "xyz"]]


def test_invalid_utf8_in_a_bytes_file_fails(tmp_path: Path) -> None:
    d = warmup_dir(tmp_path, struct.pack("<I", 2) + b"\xff\xfe")
    with pytest.raises(ModelLoadError, match="not UTF-8"):
        M._warmup_inputs("m", file_sample("TYPE_STRING", "[1]", batch=1), 1, d)


def test_a_sample_is_held_to_the_tensor_limit_before_it_is_built(tmp_path: Path) -> None:
    big = sample(
        'name: "s" batch_size: 6000000 inputs { key: "INPUT0" value { data_type: TYPE_INT32 '
        "dims: [16] zero_data: true } }"
    )
    with pytest.raises(ModelLoadError, match="tensor size limit of 1000 bytes"):
        M._warmup_inputs("m", big, 6_000_000, tmp_path, max_tensor_bytes=1000)
    d = warmup_dir(tmp_path, b"\0" * 64)
    with pytest.raises(ModelLoadError, match="tensor size limit"):
        M._warmup_inputs("m", file_sample("TYPE_INT32", "[16]", 100), 100, d, 1000)


class Instance:
    name = "i0"

    def __init__(self) -> None:
        self.runs: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> None:
        self.runs.append(inputs)


def model(max_batch: int, *samples: Any) -> Any:
    config = mc.ModelConfig(name="m", max_batch_size=max_batch)
    config.model_warmup.extend(samples)
    signature = SimpleNamespace(max_batch_size=max_batch, inputs=[], outputs=[])
    return SimpleNamespace(
        name="m", version=1, config=config, signature=signature, instances=[Instance()]
    )


def zero(batch: int, count: int = 1) -> Any:
    return sample(
        f'name: "z" batch_size: {batch} count: {count} inputs {{ key: "INPUT0" value {{ '
        "data_type: TYPE_INT32 dims: [16] zero_data: true } }"
    )


def test_batch_size_is_bounded_by_max_batch_size() -> None:
    with pytest.raises(ModelLoadError, match="batch_size 9 exceeds the model's max_batch_size 8"):
        M.warm_up(model(8, zero(9)))
    m = model(8, zero(8))
    M.warm_up(m)
    assert m.instances[0].runs[0]["INPUT0"].shape == (8, 16)
    m = model(0, zero(5))  # no batching: the sample as it is
    M.warm_up(m)
    assert m.instances[0].runs[0]["INPUT0"].shape == (16,)


def test_batch_size_zero_skips_the_sample_as_triton_does() -> None:
    for max_batch in (0, 8):
        m = model(max_batch, zero(0))
        M.warm_up(m)
        assert m.instances[0].runs == []


def test_count_is_bounded() -> None:
    with pytest.raises(ModelLoadError, match="count 1001 exceeds the server's limit of 1000"):
        M.warm_up(model(8, zero(1, count=1001)))
    m = model(8, zero(1, count=3))
    M.warm_up(m)
    assert len(m.instances[0].runs) == 3
