"""ModelInfer on raw bytes: split the tensor payloads off the wire before protobuf sees them.

Why: the servicer registers ModelInfer and ModelStreamInfer with no deserializer, so grpcio
hands us the request's bytes and we parse them here.
- Garbage costs nothing that stays. grpcio's own deserializer path keeps ~15 KB per request
  that fails to parse and logs a traceback; here a bad request is one INVALID_ARGUMENT.
- Zero-copy tensors. `raw_input_contents` (field 7) and `raw_output_contents` (field 6) are
  the only large fields. The scanner walks the *top-level* fields of the message (a handful
  per request), keeps the raw payloads as `memoryview` slices of the request bytes, and gives
  protobuf only the small remainder. Letting protobuf parse them would copy every payload
  once into its arena and once more into a Python `bytes` on access.
- Responses are assembled the same way: protobuf serialises the small head, the payloads are
  appended as length-delimited field 6 entries in one `join` (the only copy of an output).

Only requests of `SCAN_FROM_BYTES` or more are walked (smaller ones go to protobuf whole: in C
that is cheaper, and copying small payloads costs little). The walk is bounded: at most
`MAX_FIELDS` fields, each varint at most 10 bytes, each length checked against what is left;
what protobuf then parses besides the payloads is at most `MAX_HEAD_BYTES`. Nothing here
allocates in proportion to a length or a count the client claims.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from tributary_client._proto import grpc_service_pb2 as pb

from .errors import InvalidArgument

SCAN_FROM_BYTES = 64 * 1024
"""Smaller requests are parsed by protobuf whole (C, faster than any Python walk; copying
their payloads is cheap); larger ones have their payloads split off by the walk."""
MAX_FIELDS = 4096
"""Top-level fields a large request may have (a real request has a few per input, output and
parameter). More is INVALID_ARGUMENT: handing such a message to protobuf whole would build one
object per field (17-110x the message in memory, seconds with the GIL held)."""
MAX_HEAD_BYTES = 8 * 1024 * 1024
"""What protobuf may parse of one request besides the raw payloads (names, shapes,
parameters, typed contents). Typed contents are the only large legitimate part; send big
tensors in raw_input_contents."""
_RAW_INPUT_FIELD = 7
_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # ModelInferResponse.raw_output_contents
_STREAM_RESPONSE_TAG = bytes([(2 << 3) | 2])  # ModelStreamInferResponse.infer_response


class WireError(InvalidArgument):
    """The request bytes are not a ModelInferRequest."""


def _bad(detail: str) -> WireError:
    return WireError(f"unable to parse the request: {detail}")


def _varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; at most 10 bytes, never past `end`."""
    value = shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise _bad("truncated or over-long varint")


def split_request(data: bytes) -> tuple[pb.ModelInferRequest, Sequence[bytes | memoryview]]:
    """Parse a serialized ModelInferRequest; returns it with its raw_input_contents.

    For a large request the payloads come back as views of `data` and the message's own
    `raw_input_contents` is empty; for a small one (or an odd one, with very many fields)
    they are the message's own. Raises `WireError` (INVALID_ARGUMENT) for anything malformed.
    """
    if len(data) >= SCAN_FROM_BYTES:
        split = _split_large(data)
        if split is not None:
            head, raws = split
            if len(head) > MAX_HEAD_BYTES:
                raise _head_too_large(len(head))
            return _parse(head), raws
        if len(data) > MAX_HEAD_BYTES:  # groups in a large message: not worth the risk
            raise _bad("protobuf groups are not accepted in a request this large")
    request = _parse(data)
    return request, request.raw_input_contents


def _head_too_large(size: int) -> WireError:
    return _bad(
        f"the request has {size} bytes besides raw_input_contents, more than the "
        f"{MAX_HEAD_BYTES} accepted; send large tensors in raw_input_contents"
    )


def _parse(data: bytes | memoryview) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    try:
        request.ParseFromString(data)
    except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
        raise _bad(str(exc)[:200] or type(exc).__name__) from None
    return request


def _split_large(data: bytes) -> tuple[bytes | memoryview, list[memoryview]] | None:
    """(the message without field 7, field 7's payloads as views), or None when the message
    holds protobuf groups (deprecated; protobuf itself knows how to skip them)."""
    view = memoryview(data)
    end = len(data)
    raws: list[memoryview] = []
    keep: list[memoryview] = []
    span = 0  # start of the current run of fields that protobuf will parse
    pos = 0
    fields = 0
    while pos < end:
        fields += 1
        if fields > MAX_FIELDS:
            raise _bad(f"more than {MAX_FIELDS} top-level fields")
        start = pos
        tag, pos = _varint(data, pos, end)
        if pos - start > 5:  # protobuf's own limit: a tag is at most 5 bytes
            raise _bad("invalid tag")
        kind = tag & 7
        if tag >> 3 == 0:
            raise _bad("field number 0")
        if kind == 0:
            _, pos = _varint(data, pos, end)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise _bad("a length-delimited field runs past the end of the message")
            if tag >> 3 == _RAW_INPUT_FIELD:
                if span < start:
                    keep.append(view[span:start])
                raws.append(view[pos : pos + length])
                pos += length
                span = pos
                continue
            pos += length
        else:
            return None  # groups (deprecated, legal as unknown fields): protobuf knows them
        if pos > end:
            raise _bad("a fixed-size field runs past the end of the message")
    if span < end:
        keep.append(view[span:end])
    head = keep[0] if len(keep) == 1 else b"".join(keep)
    return head, raws


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def response_parts(
    head: pb.ModelInferResponse, raws: Sequence[bytes | memoryview]
) -> list[bytes | memoryview]:
    """The serialized ModelInferResponse as a list of buffers: protobuf's head (the message
    without raw outputs) followed by one length-delimited field 6 entry per payload."""
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    for raw in raws:
        n = memoryview(raw).nbytes
        parts.append(_RAW_OUTPUT_TAG)
        parts.append(_varint_bytes(n))
        parts.append(raw)
    return parts


def infer_response_bytes(head: pb.ModelInferResponse, raws: Sequence[bytes | memoryview]) -> bytes:
    """The serialized ModelInferResponse. Small replies are left to protobuf (in C, cheaper
    than assembling the parts in Python); large ones are joined without protobuf's copies."""
    if sum(memoryview(r).nbytes for r in raws) < SCAN_FROM_BYTES:
        head.raw_output_contents.extend(r if isinstance(r, bytes) else r.tobytes() for r in raws)
        return head.SerializeToString()
    return b"".join(response_parts(head, raws))


def stream_response_bytes(head: pb.ModelInferResponse, raws: Sequence[bytes | memoryview]) -> bytes:
    """ModelStreamInferResponse{infer_response: <head + raws>}, without serialising twice."""
    parts = response_parts(head, raws)
    size = sum(memoryview(p).nbytes for p in parts)
    return b"".join([_STREAM_RESPONSE_TAG, _varint_bytes(size), *parts])
