"""BYTES tensors in `tributary.tensors`: raw and typed decode, encode, Triton's error texts.

Pure unit tests: no server. The decoder has a uniform-length fast path, a variable-length walk,
bulk (join/decode/split) and per-element UTF-8 decoding, and works in chunks; the chunk sizes
are shrunk here so that every path and every chunk boundary is exercised with small data.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tributary import strings, tensors
from tributary.datatypes import BY_NAME
from tributary.errors import InvalidArgument
from tributary_client._proto import grpc_service_pb2 as pb

BYTES = BY_NAME["BYTES"]
WHERE = "for inference input 'INPUT0' for model 'm'"


def ser(values: list[bytes]) -> bytes:
    """The reference serialisation: 4-byte little-endian length + payload, per element."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def decode(buf: bytes | memoryview, shape: tuple[int, ...], rid: str = "r1") -> np.ndarray:
    return tensors.raw_to_numpy(buf, BYTES, shape, "INPUT0", "m", rid)


def decode_error(buf: bytes | memoryview, shape: tuple[int, ...], rid: str = "r1") -> str:
    with pytest.raises(InvalidArgument) as info:
        decode(buf, shape, rid)
    return info.value.message


def in_slice(buf: bytes) -> memoryview:
    """`buf` as a zero-copy slice of a larger bytes object, as the request path passes it."""
    return memoryview(b"head" + buf + b"tail")[4:-4]


@pytest.fixture(params=["default", "tiny"])
def chunks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the real chunk sizes and with tiny ones (many chunks, byte caps hit)."""
    if request.param == "tiny":
        monkeypatch.setattr(strings, "CHUNK", 3)
        monkeypatch.setattr(strings, "CHUNK_BYTES", 16)
    return request.param


VALUES = {
    "empty strings": [b""] * 5,
    "one empty": [b""],
    "ascii mixed lengths": [b"abc", b"", b"z", b"hello world", b"", b"0123456789" * 3],
    "uniform lengths": [b"ab%02d" % i for i in range(20)],
    "uniform long": [bytes([65 + i]) * 300 for i in range(5)],
    "non-ascii": ["é".encode(), b"x", "日本語".encode(), b"", "🙂 ok".encode(), "ß".encode()],
    "non-ascii uniform": ["éé".encode(), "日b".encode(), b"abcd"],
    "trailing and inner NULs": [b"a\x00", b"\x00", b"\x00z", b"row0-col0\x00", b"a\x00b"],
    "uniform trailing NULs": [b"ab\x00\x00", b"\x00\x00\x00\x00", b"c\x00d\x00"],
    "separator-like bytes": [b"\xc3\xbf", b"\xff"[:0], b"\x7f\x01", "ÿ".encode()],
    "every ascii byte and non-ascii": [bytes(range(128)), "é".encode(), bytes(range(128))],
    "one big element": ["😀".encode() * 5000],
    "big and small": [b"x" * 70_000, b"y", b"", b"z" * 3],
}


@pytest.mark.parametrize("name", list(VALUES))
@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
def test_raw_round_trip(name: str, as_view: bool, chunks: str) -> None:
    values = VALUES[name]
    buf = ser(values)
    arr = decode(in_slice(buf) if as_view else buf, (1, len(values)))
    assert arr.shape == (1, len(values)) and arr.dtype == object
    flat = arr.reshape(-1).tolist()
    assert flat == [v.decode("utf-8") for v in values]
    assert all(type(s) is str for s in flat)  # ONNX Runtime string tensors take str
    assert tensors.serialize_bytes(arr) == buf


def test_many_elements_cross_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strings, "CHUNK", 7)
    monkeypatch.setattr(strings, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(1)
    words = ["a", "bc", "é", "日本", "", "xyz\x00", "🙂"]
    picks = rng.integers(0, len(words), 500).tolist()
    repeats = rng.integers(0, 9, 500).tolist()
    values = [words[i].encode() * n for i, n in zip(picks, repeats, strict=True)]
    buf = ser(values)
    arr = decode(buf, (5, 100))
    assert arr.reshape(-1).tolist() == [v.decode() for v in values]
    assert tensors.serialize_bytes(arr) == buf


def test_multi_dimensional_shape_is_row_major() -> None:
    values = [f"r{r}c{c}".encode() for r in range(2) for c in range(3)]
    arr = decode(ser(values), (2, 3))
    assert arr.tolist() == [["r0c0", "r0c1", "r0c2"], ["r1c0", "r1c1", "r1c2"]]


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)])
@pytest.mark.parametrize("as_view", [False, True])
def test_zero_elements(shape: tuple[int, ...], as_view: bool) -> None:
    arr = decode(in_slice(b"") if as_view else b"", shape)
    assert arr.shape == shape and arr.dtype == object
    assert tensors.serialize_bytes(arr) == b""


def test_zero_elements_declared_but_data_sent() -> None:
    assert decode_error(ser([b"a"]), (0,)) == (
        f"[request id: r1] expected 0 string elements {WHERE}, got 1"
    )
    assert decode_error(ser([b"a", b"b"]), (1, 0)) == (
        f"[request id: r1] expected 0 string elements {WHERE}, got more than 0"
    )
    assert decode_error(b"\x01", (0,)) == (
        f"[request id: r1] incomplete string length indicator {WHERE}, expecting 4 bytes but "
        "only 1 bytes available"
    )


def test_big_endian_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte-swapping copy used on big-endian hosts reads the same lengths here."""
    monkeypatch.setattr(strings, "_LITTLE_ENDIAN", False)
    values = [b"abc", b"", b"x" * 300, b"\x00z"]
    assert decode(ser(values), (4,)).tolist() == [v.decode() for v in values]
    assert decode_error(ser(values) + b"\x01\x00", (5,)).startswith(
        "[request id: r1] incomplete string length indicator"
    )


# --- malformed buffers: Triton's texts -------------------------------------------------------


def test_truncated_length_prefix(chunks: str) -> None:
    data = ser([b"abc"]) + b"\x05\x00"
    assert decode_error(data, (1, 2), "") == (
        f"[request id: <id_unknown>] incomplete string length indicator {WHERE}, expecting 4 "
        "bytes but only 2 bytes available"
    )


@pytest.mark.parametrize("values", [[b"a", b"b"], [b"aaaa", b"bbbb"]])
def test_too_few_elements(values: list[bytes], chunks: str) -> None:
    # a buffer too short for 3 length prefixes, and one that is long enough
    assert decode_error(ser(values), (1, 3), "rid-7") == (
        f"[request id: rid-7] expected 3 string elements {WHERE}, got 2"
    )


def test_one_more_element_than_declared_is_counted(chunks: str) -> None:
    assert decode_error(ser([b"a", b"b", b"c"]), (1, 2)) == (
        f"[request id: r1] expected 2 string elements {WHERE}, got 3"
    )


def test_many_more_elements_than_declared(chunks: str) -> None:
    """The walk stops after count + 1 elements: the exact number is not reported."""
    assert decode_error(ser([b"ab"] * 4), (1, 2)) == (
        f"[request id: r1] expected 2 string elements {WHERE}, got more than 2"
    )
    # ... even when what follows would be malformed
    assert decode_error(ser([b"a", b"bb", b"c"]) + b"\x09", (2,)) == (
        f"[request id: r1] expected 2 string elements {WHERE}, got more than 2"
    )


def test_length_larger_than_buffer(chunks: str) -> None:
    data = struct.pack("<I", 100) + b"short"
    assert decode_error(data, (1, 1)) == (
        f"[request id: r1] incomplete string data {WHERE}, expecting string of length 100 but "
        "only 5 bytes available"
    )


def test_incomplete_payload_after_valid_elements(chunks: str) -> None:
    data = ser([b"abc", b"", b"de"]) + struct.pack("<I", 9) + b"1234"
    assert decode_error(data, (1, 4)) == (
        f"[request id: r1] incomplete string data {WHERE}, expecting string of length 9 but "
        "only 4 bytes available"
    )


def test_huge_declared_count_is_refused_cheaply() -> None:
    assert decode_error(ser([b"ab"]), (1, 100_000_000)) == (
        f"[request id: r1] expected 100000000 string elements {WHERE}, got 1"
    )


def test_huge_buffer_declared_as_one_element() -> None:
    """2M zero-length elements (8 MiB) declared as [1,1]: rejected after looking at two."""
    buf = bytes(8 * 2**20)
    assert decode_error(buf, (1, 1)) == (
        f"[request id: r1] expected 1 string elements {WHERE}, got more than 1"
    )
    assert decode_error(in_slice(buf), (1, 1)).endswith("got more than 1")


def test_huge_buffer_count_is_exact_when_declared_more() -> None:
    buf = bytes(8 * 2**20)  # exactly 2_097_152 elements
    assert decode_error(buf, (1, 2_097_153)).endswith(", got 2097152")
    assert decode_error(buf, (1, 2_097_151)).endswith(", got 2097152")
    assert decode(buf, (2, 1_048_576)).shape == (2, 1_048_576)


# --- UTF-8 -----------------------------------------------------------------------------------


def utf8_error(reason: str, at: int, rid: str = "r1") -> str:
    return (
        f"[request id: {rid}] input 'INPUT0' for model 'm' holds a BYTES element that is not "
        f"valid UTF-8 ({reason} at byte {at}); ONNX Runtime string tensors carry text only"
    )


@pytest.mark.parametrize(
    ("values", "reason", "at"),
    [
        ([b"ok", b"\xff"], "invalid start byte", 0),
        ([b"ok", b"ab\xffcd", b"x\xfe"], "invalid start byte", 2),
        # each element alone is invalid, though the concatenation is valid UTF-8 ("é")
        ([b"ok", b"a\xc3", b"\xa9"], "unexpected end of data", 1),
        ([b"\xa9", b"ok"], "invalid start byte", 0),
        ([b"xx", b"\xc3(", b"yy"], "invalid continuation byte", 0),
        (["é".encode(), b"\xed\xa0\x80"], "invalid continuation byte", 0),  # a surrogate
        ([b"ab", b"c\xff"], "invalid start byte", 1),  # uniform lengths
        ([bytes(range(128)), "é".encode(), b"\x80"], "invalid start byte", 0),  # no free byte
    ],
)
def test_invalid_utf8_names_the_first_bad_element(
    values: list[bytes], reason: str, at: int, chunks: str
) -> None:
    assert decode_error(ser(values), (len(values),)) == utf8_error(reason, at)


def test_structure_is_checked_before_utf8() -> None:
    """A buffer both malformed and holding invalid UTF-8 gets the structural (Triton) text."""
    assert decode_error(ser([b"\xff", b"ok"]), (3,)).endswith("got 2")


# --- typed bytes_contents --------------------------------------------------------------------


def typed(values: list[bytes], shape: tuple[int, ...], rid: str = "r1") -> np.ndarray:
    contents = pb.InferTensorContents(bytes_contents=values)
    return tensors.typed_to_numpy(contents, BYTES, shape, "INPUT0", "m", rid)


@pytest.mark.parametrize("name", list(VALUES))
def test_typed_bytes_decode(name: str, chunks: str) -> None:
    values = VALUES[name]
    arr = typed(values, (len(values), 1))
    assert arr.shape == (len(values), 1)
    assert arr.reshape(-1).tolist() == [v.decode() for v in values]
    assert all(type(s) is str for s in arr.reshape(-1))


def test_typed_bytes_invalid_utf8(chunks: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        typed([b"ok", b"fine", b"a\xc3", b"\xa9"], (4,))
    assert info.value.message == utf8_error("unexpected end of data", 1)


def test_typed_bytes_count_mismatch() -> None:
    with pytest.raises(InvalidArgument) as info:
        typed([b"a", b"b"], (1, 3), "rid-2")
    assert info.value.message == (f"[request id: rid-2] expected 3 string elements {WHERE}, got 2")


# --- encode ----------------------------------------------------------------------------------


def reference_encode(arr: np.ndarray) -> bytes:
    items = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in arr.reshape(-1)]
    return ser(items)


def objects(values: list[object], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape or (len(values),))


@pytest.mark.parametrize(
    "arr",
    [
        objects(["abc", "", "z", "hello"]),
        objects(["ab", "cd", "ef"]),
        objects(["é", "日本語", "", "🙂x", "ascii"]),
        objects(["éé", "日b", "abcd"]),
        objects([b"abc", b"", b"\x00z", b"a\x00"]),
        objects([np.bytes_(b"abc"), np.bytes_(b""), np.bytes_(b"xy")]),
        objects(["str", b"bytes", np.bytes_(b"np"), bytearray(b"ba"), "é"]),
        objects(["", ""]),
        objects([f"r{i}c{j}" for i in range(3) for j in range(4)], (3, 4)),
        np.array(["a", "bcd", "é"]),  # numpy unicode array
        np.array([b"a", b"bcd", b""]),  # numpy bytes array
        objects([]),
    ],
    ids=lambda a: repr(a.reshape(-1)[:3].tolist()),
)
def test_serialize_bytes(arr: np.ndarray, chunks: str) -> None:
    assert tensors.serialize_bytes(arr) == reference_encode(arr)


def test_serialize_bytes_of_a_view() -> None:
    arr = objects([f"v{i}" for i in range(12)], (3, 4))
    view = arr[:, 1:3]
    assert tensors.serialize_bytes(view) == reference_encode(np.ascontiguousarray(view))


def test_serialize_refuses_unencodable_str() -> None:
    with pytest.raises(UnicodeEncodeError):
        tensors.serialize_bytes(objects(["ok", "\ud800"]))


def test_serialize_bytes_of_wide_buffers_like_bytes() -> None:
    """Elements that are buffers of wider items are sent as `bytes(item)`, as before."""
    wide = memoryview(np.array([1, 2], dtype="<u2"))
    arr = objects([wide, b"ab"])
    assert tensors.serialize_bytes(arr) == ser([b"\x01\x00\x02\x00", b"ab"])
