"""Give memory back to the system after large requests (glibc's `malloc_trim`).

gRPC receives a message into many small heap chunks before it hands Python one `bytes`.
Freed, those chunks stay in glibc's heaps: a 256 MiB request left ~2 payloads of RSS behind,
and the next large request's own allocations (mmap'd, so they never reuse that space) were
counted on top of it. `malloc_trim(0)` returns free heap pages to the kernel. It walks the
heaps (a few ms), so it runs only around requests of at least `LARGE_REQUEST_BYTES`: once
when one arrives (gRPC's receive chunks are free by then) and once when its RPC is over. A
no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

LARGE_REQUEST_BYTES = 32 * 1024 * 1024


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _load_trim()


def trim_now() -> None:
    if _trim is not None:
        _trim(0)


def large_request(nbytes: int, on_done: Callable[[Callable[[], None]], object]) -> None:
    """Call with each request's size as it arrives, and a way to run something when it is
    over (a gRPC context's `add_callback`): trims now and again once the reply is gone."""
    if nbytes < LARGE_REQUEST_BYTES or _trim is None:
        return
    trim_now()
    on_done(trim_now)
