"""tributary.wire against protobuf itself: the split must mean exactly what protobuf reads."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tributary import wire
from tributary.errors import InvalidArgument
from tributary_client._proto import grpc_service_pb2 as pb

names = st.text(max_size=20)
payloads = st.lists(st.binary(max_size=2048), max_size=4)


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    for i, data in enumerate(draw(payloads)):
        r.inputs.add(name=f"in{i}", datatype="UINT8", shape=[len(data)])
        r.raw_input_contents.append(data)
    for key in draw(st.lists(names, max_size=3)):
        r.parameters[key].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    if draw(st.booleans()):  # big enough to take the zero-copy walk
        r.raw_input_contents.append(draw(st.binary(min_size=1, max_size=8)) * 70_000)
        r.inputs.add(name="big", datatype="UINT8", shape=[len(r.raw_input_contents[-1])])
    return r


@settings(max_examples=150, deadline=None, derandomize=True)
@given(requests(), st.booleans())
def test_split_matches_protobuf(request: pb.ModelInferRequest, shuffle: bool) -> None:
    data = request.SerializeToString(deterministic=True)
    if shuffle:  # raw fields first: field order on the wire is free
        head = pb.ModelInferRequest()
        head.CopyFrom(request)
        del head.raw_input_contents[:]
        tail = pb.ModelInferRequest(raw_input_contents=request.raw_input_contents)
        data = tail.SerializeToString() + head.SerializeToString()
    parsed, raws = wire.split_request(data)
    assert [bytes(r) for r in raws] == list(request.raw_input_contents)
    parsed_copy = pb.ModelInferRequest()
    parsed_copy.CopyFrom(parsed)
    del parsed_copy.raw_input_contents[:]
    expected = pb.ModelInferRequest()
    expected.CopyFrom(request)
    del expected.raw_input_contents[:]
    assert parsed_copy == expected


def test_large_payloads_are_views_not_copies() -> None:
    big = bytes(range(256)) * 1024
    r = pb.ModelInferRequest(model_name="m", raw_input_contents=[big, b"x"])
    data = r.SerializeToString()
    parsed, raws = wire.split_request(data)
    assert isinstance(raws[0], memoryview) and raws[0].obj is data
    assert bytes(raws[0]) == big and bytes(raws[1]) == b"x"
    assert len(parsed.raw_input_contents) == 0 and parsed.model_name == "m"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",  # truncated varint
        b"\x0a\x05ab",  # length past the end
        b"\x08" + b"\xff" * 11,  # over-long varint
        b"\x00\x01",  # field number 0
        b"\x3a\xff\xff\xff\xff\x0f" + b"\0" * 70_000,  # raw field claiming 4 GiB
        b"\x0d\x01\x02" + b"\0" * 0,  # fixed32 past the end
    ],
)
def test_malformed_is_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="^unable to parse the request"):
        wire.split_request(data)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=256), st.sampled_from([0, 70_000]))
def test_random_bytes_either_parse_or_are_invalid_argument(prefix: bytes, pad: int) -> None:
    # garbage, or garbage followed by a large raw field (so the walk runs over the garbage)
    data = prefix + b"\x3a" + wire._varint_bytes(pad) + b"\0" * pad if pad else prefix
    try:
        wire.split_request(data)
    except InvalidArgument:
        pass


@pytest.mark.parametrize("field", [b"\x3a\x00", b"\x2a\x00", b"\x32\x00", b"\x0a\x00"])
def test_field_bombs_are_refused_before_protobuf(field: bytes) -> None:
    """65,536 tiny fields (raw, inputs, outputs, names): protobuf would build an object per
    field (17-110x the message in memory, with the GIL held); refused by the walk instead."""
    data = field * 65_536 + b"\x0a\x01m"
    with pytest.raises(InvalidArgument, match="more than 4096 top-level fields"):
        wire.split_request(data)


def test_a_large_head_is_refused() -> None:
    request = pb.ModelInferRequest(model_name="m", id="x" * (wire.MAX_HEAD_BYTES + 1))
    with pytest.raises(InvalidArgument, match="besides raw_input_contents"):
        wire.split_request(request.SerializeToString())


def test_small_requests_with_many_fields_still_parse() -> None:
    """Below SCAN_FROM_BYTES protobuf parses whole: at most 64 KiB of fields, no bomb."""
    data = b"\x3a\x00" * 1000 + b"\x0a\x01m"
    parsed, raws = wire.split_request(data)
    assert parsed.model_name == "m" and len(raws) == 1000


def test_over_long_tags_are_refused_on_both_paths() -> None:
    tag = b"\xba\x80\x80\x80\x80\x00"  # field 7, wire type 2, in 6 bytes
    for pad in (10, 70_000):
        with pytest.raises(InvalidArgument):
            wire.split_request(tag + wire._varint_bytes(pad) + b"\0" * pad)


@pytest.mark.parametrize("n", [3, 100_000], ids=["small-protobuf", "large-joined"])
def test_response_assembly_parses_back(n: int) -> None:
    import numpy as np

    def head() -> pb.ModelInferResponse:
        h = pb.ModelInferResponse(model_name="m", id="7")
        h.outputs.add(name="o", datatype="FP32", shape=[n])
        return h

    arr = np.arange(n, dtype=np.float32)
    flags = np.array([True, False])
    reply = pb.ModelInferResponse.FromString(wire.infer_response_bytes(head(), [arr, b"zz", flags]))
    assert reply.id == "7" and reply.outputs[0].shape == [n]
    assert list(reply.raw_output_contents) == [arr.tobytes(), b"zz", b"\x01\x00"]
    stream = pb.ModelStreamInferResponse.FromString(wire.stream_response_bytes(head(), [arr]))
    assert stream.infer_response.raw_output_contents[0] == arr.tobytes()
    assert stream.error_message == ""
