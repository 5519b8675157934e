"""BYTES tensors: the length-prefixed wire form <-> numpy object arrays of `str`.

BYTES elements travel as a 4-byte little-endian length + payload. ONNX Runtime's string
tensors take Python `str`, so they are decoded from UTF-8 here, once. This is the one place
where request work grows with the number of elements rather than tensors, so it is
vectorised, chunked (the GIL is given up between chunks) and, on the error path, bounded by
the element count the request declares. Split from `tensors` to keep both small; callers use
`tensors.raw_to_numpy` / `tensors.typed_to_numpy` and `serialize_bytes`.
"""

from __future__ import annotations

import math
import struct
import sys
import time

import numpy as np

from .errors import InvalidArgument

_LEN = struct.Struct("<I")


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# --- BYTES: raw buffers -----------------------------------------------------------------------
#
# Why the BYTES codec looks like this (measured on 2 slow cores; see benchmarks/bytes_codec.py):
# - The only inherently sequential part of decoding is finding where each element starts (each
#   offset depends on the previous length). When every element has the same length, which one
#   strided numpy comparison of all the length prefixes proves, there is no walk at all.
#   Otherwise a tight Python loop reads each prefix as one C-level index into a zero-copy
#   uint32 cast of the buffer (~0.1 us per element; struct calls, numpy scalars, a per-byte
#   "next element" table and a vectorised pointer-jumping walk were all measured slower).
# - Python `str` objects are then made in bulk, never one decode call per element: the
#   payloads of a chunk are gathered with numpy into one buffer with a separator byte that
#   occurs in no payload between them, decoded once (latin-1 when all ASCII, else UTF-8) and
#   `str.split` cuts it into elements in C. Because the separator is ASCII it can neither hide
#   inside nor complete a multi-byte sequence, so the joined buffer decodes iff every element
#   is valid UTF-8 by itself; only then (or when no byte value is free) are elements decoded
#   one by one, which also finds the first bad one for the error text.
# - The work is done in chunks with `time.sleep(0)` between them: the server is threaded and
#   shares the GIL, so a big tensor must not stall small concurrent requests for seconds.
# - Errors cost what the request declares: the walk stops after `count + 1` elements.

CHUNK = 1 << 14  # elements per chunk between GIL yields (~2 ms of work per chunk)
CHUNK_BYTES = 1 << 20  # soft cap on the bytes one decode chunk copies at once
_LITTLE_ENDIAN = sys.byteorder == "little"


def _byte_view(buf: bytes | memoryview) -> memoryview:
    mv = memoryview(buf)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def yield_gil() -> None:
    """Let other threads (other requests) run between chunks of a large tensor."""
    time.sleep(0)


def _u32_views(mv: memoryview) -> tuple[memoryview, ...]:
    """`views[p & 3][p >> 2]` is the little-endian uint32 at byte `p`, IndexError when fewer than
    4 bytes remain there: one zero-copy cast per alignment makes reading a length prefix a single
    C-level index (the walk's whole cost) and gives the end-of-buffer check for free."""
    n = len(mv)
    views = []
    for k in range(4):
        m = max(0, (n - k) // 4)
        if m == 0:
            views.append(memoryview(b"").cast("I"))
        elif _LITTLE_ENDIAN:
            views.append(mv[k : k + 4 * m].cast("I"))
        else:  # big-endian hosts: a byte-swapped copy, native order
            words = np.frombuffer(mv, dtype="<u4", count=m, offset=k).astype(np.uint32)
            views.append(memoryview(words.tobytes()).cast("I"))
    return tuple(views)


def _walk(mv: memoryview, limit: int, starts: np.ndarray | None = None) -> tuple[int, int]:
    """Find at most `limit` complete elements from the front of `mv`.

    Returns `(found, end)`: `end` is where the last complete element ends, i.e. where the next
    one starts (an incomplete length, an incomplete payload, `len(mv)`, or more data after
    `limit` elements). Element start offsets are written to `starts[:found]` when given. Cost
    is bounded by `limit`, never by the buffer's size.
    """
    n = len(mv)
    views = _u32_views(mv)
    scratch = [0] * max(1, min(limit, CHUNK, n // 4 + 1))
    size = len(scratch)
    p = found = 0
    while found < limit:
        k = min(size, limit - found)
        i = 0
        try:
            for i in range(k):  # the hot loop: keep it this small
                scratch[i] = p
                p += 4 + views[p & 3][p >> 2]
            i = k
        except IndexError:  # fewer than 4 bytes at p: the end, or a cut-off length
            pass
        if p > n:  # the last element read claims more bytes than remain
            i -= 1
            p = scratch[i]
        if starts is not None and i:
            starts[found : found + i] = scratch[:i]
        found += i
        if i < k:
            break
        yield_gil()
    return found, p


def _uniform_length(mv: memoryview, count: int) -> int | None:
    """The common length of all `count` elements if the buffer is exactly that, else None.

    One strided numpy comparison over every length prefix replaces the walk entirely. The
    caller guarantees `count >= 1` and `len(mv) >= 4 * count`.
    """
    n = len(mv)
    (first,) = _LEN.unpack_from(mv, 0)
    stride = first + _LEN.size
    if stride * count != n:
        return None
    heads = np.ndarray((count,), dtype="<u4", buffer=mv, strides=(stride,))
    return first if bool((heads == first).all()) else None


def bytes_from_raw(
    buf: bytes | memoryview, shape: tuple[int, ...], tensor: str, model: str, request_id: str
) -> np.ndarray:
    count = element_count(shape)
    mv = _byte_view(buf)
    n = len(mv)
    if count * _LEN.size > n:  # refused before allocating `count` slots
        raise _bytes_error(mv, count, tensor, model, request_id)
    out = np.empty(count, dtype=object)
    if count == 0:
        if n:
            raise _bytes_error(mv, count, tensor, model, request_id)
        return out.reshape(shape)
    ctx = (tensor, model, request_id)
    length = _uniform_length(mv, count)
    if length == 0:
        for i0 in range(0, count, CHUNK * 16):
            if i0:
                yield_gil()
            out[i0 : i0 + CHUNK * 16] = ""
    elif length is not None:
        _decode_uniform(mv, length, out, ctx)
    else:
        # offsets fit int32 for any gRPC message (< 2 GiB): half the memory of int64
        starts = np.empty(count, dtype=np.int64 if n > np.iinfo(np.int32).max else np.int32)
        found, end = _walk(mv, count, starts)
        if found != count or end != n:
            raise _bytes_error(mv, count, tensor, model, request_id)
        _decode_variable(mv, starts, out, ctx)
    return out.reshape(shape)


def _decode_uniform(
    mv: memoryview, length: int, out: np.ndarray, ctx: tuple[str, str, str]
) -> None:
    stride = length + _LEN.size
    u8 = np.frombuffer(mv, dtype=np.uint8)
    per = max(1, min(CHUNK, CHUNK_BYTES // stride))
    count = len(out)
    for i0 in range(0, count, per):
        if i0:
            yield_gil()
        i1 = min(count, i0 + per)
        k = i1 - i0
        texts = None
        if k > 1:
            # rows are [length prefix | payload]; keep each prefix's last byte as the
            # separator slot and drop the first row's: payload0, sep, payload1, sep, ...
            rows = u8[i0 * stride : i1 * stride].reshape(k, stride)
            flat = rows[:, 3:].copy().reshape(-1)[1:]
            texts = _split_joined(flat, slice(length, None, length + 1), k)
        if texts is None:
            heads = np.arange(i0, i1, dtype=np.int64) * stride
            texts = _decode_each(mv, heads, np.full(k, length), ctx)
        out[i0:i1] = texts


def _decode_variable(
    mv: memoryview, starts: np.ndarray, out: np.ndarray, ctx: tuple[str, str, str]
) -> None:
    n = len(mv)
    u8 = np.frombuffer(mv, dtype=np.uint8)
    count = len(out)
    i0 = 0
    while i0 < count:
        if i0:
            yield_gil()
        s0 = int(starts[i0])
        window = starts[i0 : i0 + CHUNK]  # search a chunk's worth only: O(chunk), not O(count)
        i1 = i0 + max(1, int(np.searchsorted(window, s0 + CHUNK_BYTES, side="right")))
        k = i1 - i0
        e = int(starts[i1]) if i1 < count else n
        rel = starts[i0:i1].astype(np.int64) - s0
        texts = None
        if k > 1:
            # drop the first 3 bytes of every prefix (and all 4 of the first): the 4th stays as
            # the separator slot between consecutive payloads
            keep = np.ones(e - s0, dtype=bool)
            keep[rel] = False
            keep[rel + 1] = False
            keep[rel + 2] = False
            keep[3] = False
            flat = u8[s0:e][keep]
            seps = rel[1:] - 3 * np.arange(1, k, dtype=np.int64) - 1
            texts = _split_joined(flat, seps, k)
        if texts is None:
            ends = np.append(rel[1:], e - s0)
            texts = _decode_each(mv, rel + s0, ends - rel - _LEN.size, ctx)
        out[i0:i1] = texts
        i0 = i1


def _free_ascii(u8: np.ndarray) -> int | None:
    """An ASCII byte value that does not occur in `u8`, if any (one pass, no temporaries)."""
    present = np.zeros(256, dtype=bool)
    present[u8] = True
    free = np.flatnonzero(~present[:0x80])
    return int(free[0]) if free.size else None


def _split_joined(flat: np.ndarray, seps: slice | np.ndarray, k: int) -> list[str] | None:
    """Decode `k` payloads laid out in `flat` (a writable copy) with one separator slot, `seps`,
    between consecutive ones. None when some element is not valid UTF-8 or no separator byte is
    free: the caller then decodes one by one (and raises the exact error)."""
    if int(flat.max()) < 0x80:  # separator slots hold a length's top byte: always < 0x80
        flat[seps] = 0xFF  # cannot occur in ASCII; latin-1 == UTF-8 for ASCII
        parts = str(flat.data, "latin-1").split("\xff")
        return parts if len(parts) == k else None
    flat[seps] = 0x80  # not ASCII, so the slots can't make a candidate separator look used
    sep = _free_ascii(flat)
    if sep is None:
        return None
    flat[seps] = sep
    try:
        text = str(flat.data, "utf-8")
    except UnicodeDecodeError:
        return None
    parts = text.split(chr(sep))
    return parts if len(parts) == k else None


def _decode_each(
    mv: memoryview, heads: np.ndarray, lengths: np.ndarray, ctx: tuple[str, str, str]
) -> list[str]:
    """One decode per element: the fallback, and where the first invalid element is named."""
    texts = []
    for head, size in zip(heads.tolist(), lengths.tolist(), strict=True):
        a = head + _LEN.size
        texts.append(_utf8(mv[a : a + size], *ctx))
    return texts


def _bytes_error(
    buf: bytes | memoryview, count: int, tensor: str, model: str, request_id: str
) -> InvalidArgument:
    """Triton's error for a BYTES buffer that does not hold exactly `count` elements.

    Walks the buffer like Triton's core does, but never past `count + 1` elements, so a
    request declaring one element and sending 100 MiB of them costs next to nothing:
    - an incomplete length or payload among the first `count + 1` elements is reported where
      it occurs (Triton's texts);
    - too few elements: "expected N string elements ..., got M" with the number found;
    - too many: "got N+1" when the buffer holds exactly N+1 elements (Triton's text), else
      "got more than N": the walk stopped there, so the exact number is not known (and what
      follows may not even be well formed).
    """
    mv = _byte_view(buf)
    n = len(mv)
    where = f"for inference input '{tensor}' for model '{model}'"
    found, end = _walk(mv, count + 1)
    if found <= count and end < n:
        if n - end < _LEN.size:
            return InvalidArgument(
                f"{_prefix(request_id)}incomplete string length indicator {where}, expecting 4 "
                f"bytes but only {n - end} bytes available"
            )
        (size,) = _LEN.unpack_from(mv, end)
        return InvalidArgument(
            f"{_prefix(request_id)}incomplete string data {where}, expecting string of "
            f"length {size} but only {n - end - _LEN.size} bytes available"
        )
    got = f"more than {count}" if found > count and end != n else str(found)
    return InvalidArgument(
        f"{_prefix(request_id)}expected {count} string elements {where}, got {got}"
    )


def _utf8(data: bytes | memoryview, tensor: str, model: str, request_id: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{_prefix(request_id)}input '{tensor}' for model '{model}' holds a BYTES element "
            f"that is not valid UTF-8 ({exc.reason} at byte {exc.start}); ONNX Runtime string "
            "tensors carry text only"
        ) from None


# --- BYTES: typed contents and encoding -------------------------------------------------------


def texts_from_items(items: list[bytes], ctx: tuple[str, str, str]) -> list[str]:
    """UTF-8 decode of typed `bytes_contents`: the same join/decode/split as raw buffers."""
    k = len(items)
    if k > 1:
        payload = b"".join(items)
        if payload.isascii():
            return str(b"\xff".join(items), "latin-1").split("\xff")
        sep = _free_ascii(np.frombuffer(payload, dtype=np.uint8))
        if sep is not None:
            try:
                parts = str(bytes([sep]).join(items), "utf-8").split(chr(sep))
            except UnicodeDecodeError:
                parts = []
            if len(parts) == k:
                return parts
    return [_utf8(item, *ctx) for item in items]


def serialize_bytes(arr: np.ndarray) -> bytes:
    """Length-prefixed serialisation of a BYTES tensor (row-major).

    Elements are `str` (sent as UTF-8), `bytes`/`np.bytes_`, or anything `bytes()` accepts.
    Per chunk of elements: one join (and one encode) for all payloads, lengths from
    `map(len)`, prefixes and payloads laid out by numpy; chunks yield the GIL in between.
    """
    flat = arr.reshape(-1)
    chunks = []
    for i0 in range(0, flat.size, CHUNK):
        if i0:
            yield_gil()
        chunks.append(_encode_chunk(flat[i0 : i0 + CHUNK].tolist()))
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _encode_chunk(items: list) -> bytes:
    k = len(items)
    payload: bytes | None = None
    try:
        text = "".join(items)
    except TypeError:  # not all str
        pass
    else:
        if text.isascii():  # O(1) in CPython: byte lengths are character lengths
            payload = text.encode("ascii")
        else:
            items = list(map(str.encode, items))  # UTF-8; per element, but all in C
    if payload is None:
        try:
            payload = b"".join(items)
        except TypeError:  # mixed str/bytes, or other objects: one by one, as bytes()
            items = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in items]
            payload = b"".join(items)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=k)
    if int(lengths.sum()) != len(payload):  # e.g. memoryviews of wider items
        items = [bytes(x) for x in items]
        payload = b"".join(items)
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=k)
    body = np.frombuffer(payload, dtype=np.uint8)
    heads = lengths.astype("<u4").view(np.uint8).reshape(k, _LEN.size)
    out = np.empty(len(payload) + _LEN.size * k, dtype=np.uint8)
    size = int(lengths[0])
    if bool((lengths == size).all()):
        rows = out.reshape(k, size + _LEN.size)
        rows[:, : _LEN.size] = heads
        rows[:, _LEN.size :] = body.reshape(k, size)
    else:
        offsets = np.zeros(k, dtype=np.int64)
        np.cumsum(lengths[:-1] + _LEN.size, out=offsets[1:])
        keep = np.ones(len(out), dtype=bool)
        for j in range(_LEN.size):
            out[offsets + j] = heads[:, j]
            keep[offsets + j] = False
        out[keep] = body
    return out.tobytes()
