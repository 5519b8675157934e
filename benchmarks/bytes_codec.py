"""BYTES tensor codec: the vectorised `tributary.tensors` against the per-element original.

In-process, no server: it times the functions the request path calls for raw BYTES inputs
(`raw_to_numpy` -> `_bytes_from_raw`) and outputs (`serialize_bytes`), on
- decode and encode of 1M and 10M short elements, uniform (all 8 bytes) and variable (0-16
  bytes) length, old vs new, with the ratio;
- a 100 MiB buffer of 0-length elements declared as shape [1,1] (the error path), old vs new;
- how long a concurrent thread that does a tiny numpy op every 1 ms is stalled at most (its
  largest gap between ticks) while a big tensor decodes: the server is threaded and shares the
  GIL, so this is what a small request waiting behind a big one sees.

Every new result is checked against the old one. The old implementation is a verbatim copy of
the functions from before the change (git history of server/tributary/tensors.py).

Usage: python benchmarks/bytes_codec.py [--sizes 1000000,10000000] [--stall-elements 3000000]
                                        [--skip-old-10m]
The old decode of 10M elements takes tens of seconds per case on a small machine;
--skip-old-10m times only the new code at that size.
"""

from __future__ import annotations

import argparse
import math
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from tributary import strings, tensors
from tributary.datatypes import BY_NAME
from tributary.errors import InvalidArgument

BYTES = BY_NAME["BYTES"]

# --- the old implementation, verbatim (module helpers it used are imported above) ------------

_LEN = struct.Struct("<I")


def _prefix(request_id: str) -> str:
    return f"[request id: {request_id or '<id_unknown>'}] "


def old_bytes_from_raw(
    buf: bytes, shape: tuple[int, ...], tensor: str, model: str, request_id: str
) -> np.ndarray:
    count = math.prod(shape)
    if count * _LEN.size > len(buf):  # refused before allocating `count` slots
        raise old_bytes_error(buf, count, tensor, model, request_id)
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    pos = 0
    for i in range(count):
        if pos + 4 > len(buf):
            raise old_bytes_error(buf, count, tensor, model, request_id)
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise old_bytes_error(buf, count, tensor, model, request_id)
        out[i] = old_utf8(view[pos : pos + n], tensor, model, request_id)
        pos += n
    if pos != len(buf):
        raise old_bytes_error(buf, count, tensor, model, request_id)
    return out.reshape(shape)


def old_bytes_error(
    buf: bytes, count: int, tensor: str, model: str, request_id: str
) -> InvalidArgument:
    where = f"for inference input '{tensor}' for model '{model}'"
    pos = got = 0
    while pos < len(buf):
        if len(buf) - pos < _LEN.size:
            return InvalidArgument(
                f"{_prefix(request_id)}incomplete string length indicator {where}, expecting 4 "
                f"bytes but only {len(buf) - pos} bytes available"
            )
        (n,) = _LEN.unpack_from(buf, pos)
        pos += _LEN.size
        if pos + n > len(buf):
            return InvalidArgument(
                f"{_prefix(request_id)}incomplete string data {where}, expecting string of "
                f"length {n} but only {len(buf) - pos} bytes available"
            )
        pos += n
        got += 1
    return InvalidArgument(
        f"{_prefix(request_id)}expected {count} string elements {where}, got {got}"
    )


def old_utf8(data: bytes | memoryview, tensor: str, model: str, request_id: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{_prefix(request_id)}input '{tensor}' for model '{model}' holds a BYTES element "
            f"that is not valid UTF-8 ({exc.reason} at byte {exc.start}); ONNX Runtime string "
            "tensors carry text only"
        ) from None


def old_serialize_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


# --- the two sides ----------------------------------------------------------------------------


def old_decode(buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return old_bytes_from_raw(buf, shape, "INPUT0", "bench", "")


def new_decode(buf: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return tensors.raw_to_numpy(buf, BYTES, shape, "INPUT0", "bench", "")


# --- data -------------------------------------------------------------------------------------


def make_buffer(count: int, lo: int, hi: int, seed: int = 0) -> bytes:
    """`count` ASCII elements of random length lo..hi, serialised (built with numpy: fast)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, count)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
    out = np.empty(int(lengths.sum()) + 4 * count, dtype=np.uint8)
    starts = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1] + 4, out=starts[1:])
    keep = np.ones(len(out), dtype=bool)
    heads = lengths.astype("<u4").view(np.uint8).reshape(count, 4)
    for j in range(4):
        out[starts + j] = heads[:, j]
        keep[starts + j] = False
    out[keep] = alphabet[rng.integers(0, len(alphabet), int(keep.sum()))]
    return out.tobytes()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def ratio(old: float | None, new: float) -> str:
    return f"{old / new:8.1f}x" if old is not None else "        -"


def secs(value: float | None) -> str:
    return f"{value:8.3f}" if value is not None else "       -"


# --- the benchmarks ---------------------------------------------------------------------------


def codec(sizes: list[int], skip_old_above: int | None) -> None:
    print("decode / encode (seconds, old/new ratio)")
    print(f"{'case':28s} {'old':>8s} {'new':>8s} {'ratio':>9s}")
    for count in sizes:
        for label, lo, hi in (("uniform 8 B", 8, 8), ("variable 0-16 B", 0, 16)):
            buf = make_buffer(count, lo, hi)
            shape = (1, count)
            run_old = skip_old_above is None or count <= skip_old_above
            t_new, arr = timed(lambda buf=buf, shape=shape: new_decode(buf, shape))
            t_old = None
            if run_old:
                t_old, ref = timed(lambda buf=buf, shape=shape: old_decode(buf, shape))
                assert ref.tolist() == arr.tolist(), "decode differs from the old one"  # type: ignore[union-attr]
                del ref
            name = f"decode {count:>8d} {label}"
            print(f"{name:28s} {secs(t_old)} {secs(t_new)} {ratio(t_old, t_new)}")
            t_new, out = timed(lambda arr=arr: tensors.serialize_bytes(arr))
            assert out == buf, "encode does not round-trip"
            t_old = None
            if run_old:
                t_old, ref = timed(lambda arr=arr: old_serialize_bytes(arr))
                assert ref == out, "encode differs from the old one"
            name = f"encode {count:>8d} {label}"
            print(f"{name:28s} {secs(t_old)} {secs(t_new)} {ratio(t_old, t_new)}")
            del arr, out, buf


def error_case() -> None:
    buf = b"\0" * (100 * 2**20)  # 26M zero-length elements, declared as one
    print("\n100 MiB of 0-length elements declared as [1,1] (error path)")
    results = {}
    for name, fn in (("old", old_decode), ("new", new_decode)):
        t0 = time.perf_counter()
        try:
            fn(buf, (1, 1))
        except InvalidArgument as exc:
            results[name] = (time.perf_counter() - t0, exc.message)
        else:
            raise AssertionError("accepted a wrong element count")
    for name, (seconds, message) in results.items():
        print(f"  {name}: {seconds:8.3f} s  {message}")
    print(f"  ratio: {results['old'][0] / results['new'][0]:.0f}x")


def stall(count: int) -> None:
    """Largest gap seen by a thread that wakes every 1 ms for a tiny numpy op."""
    print(f"\nconcurrent 1 ms ticker during a decode of {count} elements")
    small = np.arange(16, dtype=np.float32)
    no_yield = "new, no GIL yields"
    for label, lo, hi in (("variable 0-16 B", 0, 16), ("uniform 8 B", 8, 8)):
        buf = make_buffer(count, lo, hi)
        for name, fn in (("old", old_decode), ("new", new_decode), (no_yield, new_decode)):
            stop = threading.Event()
            gaps: list[float] = []

            def ticker(stop: threading.Event = stop, gaps: list[float] = gaps) -> None:
                last = time.perf_counter()
                while not stop.is_set():
                    time.sleep(0.001)
                    float((small * 2.0).sum())  # the "small request"
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            saved = strings.yield_gil
            if name == no_yield:
                strings.yield_gil = lambda: None  # type: ignore[assignment]
            thread = threading.Thread(target=ticker)
            thread.start()
            try:
                time.sleep(0.05)  # the ticker is running before the decode starts
                seconds, result = timed(lambda fn=fn, buf=buf: fn(buf, (1, count)))
            finally:
                strings.yield_gil = saved  # type: ignore[assignment]
                stop.set()
                thread.join()
            del result  # freeing millions of str objects holds the GIL too: not while ticking
            worst = max(gaps) * 1000
            p99 = float(np.percentile(gaps, 99)) * 1000
            print(
                f"  {label:16s} {name:19s} decode {seconds:7.3f} s; ticker max gap "
                f"{worst:7.1f} ms, p99 {p99:5.1f} ms, {len(gaps)} ticks"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--stall-elements", type=int, default=3_000_000)
    parser.add_argument(
        "--skip-old-10m", action="store_true", help="time only the new code above 1M elements"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    codec(sizes, 1_000_000 if args.skip_old_10m else None)
    error_case()
    stall(args.stall_elements)


if __name__ == "__main__":
    main()
