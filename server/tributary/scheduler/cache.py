"""The response cache (`--cache-config local,size=<bytes>`, per model `response_cache`).

One LRU store shared by every model, bounded in bytes; each model version that enables it gets
a `ModelCache` view bound to its name and version. The data plane asks the view before the
scheduler (a hit skips the queue and the model) and offers it the outputs of a successful
request afterwards. Errors are never offered, so never cached.

The key is a 128-bit BLAKE2b digest of: model name and version, every input's name, datatype,
shape and bytes (in name order, so the order a client lists inputs in does not matter), and the
requested outputs with their classification count. Input bytes are hashed in place (a numeric
array's buffer is handed to the hash as it is; BYTES elements one by one, length-prefixed), so
hashing costs one read of the request's bytes, no copy; those bytes are already bounded by
--max-tensor-bytes per input. Triton's key is a 64-bit hash; 128 bits make an accidental
collision (which would serve another request's answer) negligible.

Sizing: an entry is charged what it really holds in memory, so the configured size bounds the
process's memory and not only the payload: its output arrays' bytes, `ENTRY_OVERHEAD` (the key,
the table's slot and node, the entry record), `ARRAY_OVERHEAD` per output (the array object and
its name) and, for BYTES outputs, each element's Python object and pointer (`sys.getsizeof`
plus 8), which dominate when elements are short. An entry larger than the whole cache is not
stored. Stored arrays are private
copies (the model's outputs may be views of a batch) and read-only.

Which models may use it: not sequence models (a request's answer depends on the sequence's
earlier requests) and not decoupled ones; both are refused at load with Triton's text. Triton
does not detect non-deterministic models (a model with a random op); enabling the cache on one
is the configuration's choice, and the cache then replays the first answer.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from itertools import count
from typing import Any

import numpy as np

from ..errors import ModelLoadError

ENTRY_OVERHEAD = 640
"""Bytes charged per entry beyond its outputs: the key object, the LRU table's slot and node,
the entry record, its outputs dict and its slot in the per-version index (measured with
tracemalloc, tests/unit/test_cache.py, with room for the tables' growth)."""
ARRAY_OVERHEAD = 208
"""Bytes charged per output array beyond its data: the ndarray object and its name."""
POINTER_BYTES = 8
"""A BYTES array holds one pointer per element besides the element objects themselves."""


def refuse_unsupported(config: object) -> None:
    """Triton's load-time refusals for `response_cache { enable: true }`."""
    name = getattr(config, "name", "")
    if not getattr(config, "response_cache").enable:  # noqa: B009 - protobuf field
        return
    if config.HasField("sequence_batching"):  # type: ignore[attr-defined]
        raise ModelLoadError(
            f"Response Cache does not currently support model {name} with sequence batching "
            "scheduler. Please disable the response cache."
        )
    if config.model_transaction_policy.decoupled:  # type: ignore[attr-defined]
        raise ModelLoadError(
            f"Response Cache does not currently support model {name} with 'decoupled' "
            "transaction policy. Please disable the response cache."
        )


def _array_bytes(arr: np.ndarray) -> int:
    """What one stored output costs: BYTES elements are Python objects, each with a header
    (33 bytes for `bytes`, 49 for `str`) and a pointer in the array."""
    if arr.dtype == np.object_:
        return ARRAY_OVERHEAD + sum(sys.getsizeof(x) + POINTER_BYTES for x in arr.flat)
    return ARRAY_OVERHEAD + int(arr.nbytes)


def _private(arr: np.ndarray) -> np.ndarray:
    out = np.array(arr, copy=True, order="C")
    out.flags.writeable = False
    return out


Tag = tuple[Any, ...]
"""Which model version's view stored an entry: `drop(tag)` removes them together."""


class _Entry:
    __slots__ = ("outputs", "size", "tag")

    def __init__(self, outputs: dict[str, np.ndarray], size: int, tag: Tag) -> None:
        self.outputs, self.size, self.tag = outputs, size, tag


class ResponseCache:
    """LRU by bytes, shared by every model. Thread-safe; the lock is held only for table
    operations (hashing and copying happen outside it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_tag: dict[Tag, set[bytes]] = {}
        self._bytes = 0
        self.evictions = 0
        self._serial = count(1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def used(self) -> int:
        with self._lock:
            return self._bytes

    def for_model(self, name: str, version: int) -> ModelCache:
        """A new view for one loaded model version. Each load gets its own (a serial number in
        its tag and key), so a reload of the same version number never answers from what the
        version it replaces computed."""
        return ModelCache(self, name, version, next(self._serial))

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.outputs

    def put(
        self,
        key: bytes,
        tag: Tag,
        outputs: Mapping[str, np.ndarray],
        view: ModelCache | None = None,
    ) -> bool:
        """Store a private copy of `outputs`; False when it is larger than the whole cache or
        `view` was closed (a request that finished after its version unloaded: its entry
        would sit in the cache, unreachable, until evicted)."""
        size = ENTRY_OVERHEAD + len(key)
        size += sum(len(n) + _array_bytes(a) for n, a in outputs.items())
        if size > self.capacity:
            return False
        private = {n: _private(a) for n, a in outputs.items()}
        with self._lock:
            if view is not None and view.closed:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
            while self._bytes + size > self.capacity and self._entries:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._forget(evicted_key, evicted)
                self.evictions += 1
            self._entries[key] = _Entry(private, size, tag)
            self._by_tag.setdefault(tag, set()).add(key)
            self._bytes += size
        return True

    def drop(self, tag: Tag, view: ModelCache | None = None) -> int:
        """Remove every entry of one model version (it unloaded or reloaded); `view`, when
        given, is closed in the same step, so nothing is stored for it afterwards."""
        with self._lock:
            if view is not None:
                view.closed = True
            keys = self._by_tag.pop(tag, set())
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._bytes -= entry.size
            return len(keys)

    def _forget(self, key: bytes, entry: _Entry) -> None:
        self._bytes -= entry.size
        keys = self._by_tag.get(entry.tag)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_tag[entry.tag]


class ModelCache:
    """One model version's use of the shared cache."""

    def __init__(self, cache: ResponseCache, name: str, version: int, serial: int = 0) -> None:
        self.cache = cache
        self.tag: Tag = (name, version, serial)
        self.closed = False  # set under the cache's lock
        self._prefix = _prefix(name, version, serial)

    def key(self, inputs: Mapping[str, np.ndarray], outputs: Iterable[tuple[str, int]]) -> bytes:
        """The request's digest. `outputs`: (requested output name, classification count)."""
        h = self._prefix.copy()
        for name in sorted(inputs):
            arr = inputs[name]
            _field(h, name.encode())
            _field(h, arr.dtype.str.encode())
            _field(h, np.asarray(arr.shape, dtype="<i8").tobytes())
            if arr.dtype == np.object_:
                _hash_elements(h, arr)
            elif arr.flags.c_contiguous:
                h.update(arr.data.cast("B") if arr.ndim else arr.tobytes())
            else:  # a strided view: hash it in its logical order
                h.update(np.ascontiguousarray(arr).data.cast("B"))
        h.update(b"\x00outputs")
        for name, k in outputs:
            _field(h, name.encode())
            h.update(k.to_bytes(8, "little", signed=True))
        return h.digest()

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        return self.cache.get(key)

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> bool:
        return self.cache.put(key, self.tag, outputs, self)

    def close(self) -> None:
        self.cache.drop(self.tag, self)


def _prefix(name: str, version: int, serial: int) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=16, person=b"tributary-cache")
    _field(h, name.encode())
    h.update(version.to_bytes(8, "little", signed=True))
    h.update(serial.to_bytes(8, "little"))
    return h


def _hash_elements(h: hashlib.blake2b, arr: np.ndarray) -> None:
    """BYTES elements: all lengths, then all bytes, each in one call (C-speed joins, not one
    hash call per element, which would cost a microsecond per element)."""
    items = [x.encode() if isinstance(x, str) else bytes(x) for x in arr.ravel().tolist()]
    h.update(np.fromiter(map(len, items), dtype="<i8", count=len(items)).tobytes())
    h.update(b"".join(items))


def _field(h: hashlib.blake2b, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
