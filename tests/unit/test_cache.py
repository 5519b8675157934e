"""The response cache: LRU bounded by bytes, keys over everything that decides an answer."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from google.protobuf import text_format

from tributary.cli import parse_cache_config
from tributary.errors import ModelLoadError
from tributary.scheduler.cache import (
    ARRAY_OVERHEAD,
    ENTRY_OVERHEAD,
    POINTER_BYTES,
    ModelCache,
    ResponseCache,
    refuse_unsupported,
)
from tributary_client._proto import model_config_pb2 as mc

KEY = b"k" * 16


def out(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"y": np.full(n, value, dtype=np.float32)}


def size_of(n: int) -> int:
    """What `out(n)` is charged under a 16-byte key: one output named "y" of n float32."""
    return ENTRY_OVERHEAD + 16 + len("y") + ARRAY_OVERHEAD + 4 * n


# -- the store ------------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used_by_bytes() -> None:
    cache = ResponseCache(3 * size_of(10))
    for k in (b"a", b"b", b"c"):
        assert cache.put(k.ljust(16, b"."), ("m", 1), out(10))
    assert len(cache) == 3 and cache.used == 3 * size_of(10)
    assert cache.get(b"a".ljust(16, b".")) is not None  # a is now the most recent
    cache.put(b"d".ljust(16, b"."), ("m", 1), out(10))
    assert cache.get(b"b".ljust(16, b".")) is None  # b was the least recent
    assert cache.get(b"a".ljust(16, b".")) is not None
    assert cache.evictions == 1
    # a bigger entry pushes out as many as it needs
    cache.put(b"e".ljust(16, b"."), ("m", 1), out(10 + size_of(10) // 4))
    assert cache.used <= cache.capacity and len(cache) == 2


def test_an_entry_larger_than_the_cache_is_not_stored() -> None:
    cache = ResponseCache(size_of(10))
    assert cache.put(KEY, ("m", 1), out(10))
    assert not cache.put(b"x" * 16, ("m", 1), out(11))
    assert cache.get(KEY) is not None  # nothing was evicted for it
    assert cache.get(b"x" * 16) is None


def test_stored_outputs_are_private_read_only_copies() -> None:
    cache = ResponseCache(1 << 20)
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    cache.put(KEY, ("m", 1), {"y": batch[1:]})  # a view of a batch's output
    batch[:] = -1
    hit = cache.get(KEY)
    assert hit is not None
    np.testing.assert_array_equal(hit["y"], [[4, 5, 6, 7]])
    assert not hit["y"].flags.writeable and hit["y"].base is None


def test_bytes_outputs_are_sized_by_their_elements() -> None:
    element = sys.getsizeof(b"12345") + POINTER_BYTES  # the object, its header and pointer
    cache = ResponseCache(ENTRY_OVERHEAD + 16 + len("s") + ARRAY_OVERHEAD + 2 * element)
    assert cache.put(KEY, ("m", 1), {"s": np.array([b"12345", b"67890"], dtype=object)})
    assert not cache.put(b"y" * 16, ("m", 1), {"s": np.array([b"123456789a", b"b"], dtype=object)})


def test_drop_removes_one_versions_entries_only() -> None:
    cache = ResponseCache(1 << 20)
    cache.put(b"1" * 16, ("m", 1), out(4))
    cache.put(b"2" * 16, ("m", 1), out(4))
    cache.put(b"3" * 16, ("m", 2), out(4))
    cache.put(b"4" * 16, ("other", 1), out(4))
    assert cache.drop(("m", 1)) == 2
    assert len(cache) == 2 and cache.used == 2 * size_of(4)
    assert cache.get(b"3" * 16) is not None and cache.get(b"4" * 16) is not None


def test_replacing_a_key_does_not_leak_bytes() -> None:
    cache = ResponseCache(1 << 20)
    cache.put(KEY, ("m", 1), out(4))
    cache.put(KEY, ("m", 1), out(8))
    assert len(cache) == 1 and cache.used == size_of(8)


@pytest.mark.parametrize(
    "outputs",
    [
        pytest.param(lambda i: {"y": np.array([i % 100], np.int8)}, id="tiny-numeric"),
        pytest.param(
            lambda i: {f"out{j}": np.array([i], np.int64) for j in range(8)}, id="many-outputs"
        ),
        pytest.param(
            lambda i: {"s": np.array([b"%d-%d" % (i, j) for j in range(64)], dtype=object)},
            id="short-bytes-elements",
        ),
    ],
)
def test_the_configured_size_bounds_the_memory_entries_really_hold(
    outputs: Callable[[int], dict[str, np.ndarray]],
) -> None:
    """Many small entries: the size must bound what the process holds (keys, table, array
    objects, BYTES element objects), not only the payload bytes; a 2-8x overshoot was seen when
    only the payload and a flat 256 bytes were charged."""
    capacity = 2 << 20
    gc.collect()
    tracemalloc.start()
    try:
        cache = ResponseCache(capacity)
        view = cache.for_model("m", 1)
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            view.put(key(view, {"a": np.array([i], np.int64)}), outputs(i))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.evictions > 0  # the cache filled up and turned over
    assert held <= capacity, f"{held} bytes held for a {capacity}-byte cache"
    assert held >= capacity // 2  # and charges are not so high that the size is wasted


def test_a_closed_view_stores_nothing_more() -> None:
    """A request finishing after its version unloaded offers its result to a closed view: it
    must not land in the cache, where nobody could reach it but it would hold bytes."""
    cache = ResponseCache(1 << 20)
    view = cache.for_model("m", 1)
    assert view.put(KEY, out(4))
    view.close()
    assert len(cache) == 0 and cache.used == 0
    assert not view.put(b"x" * 16, out(4))
    assert len(cache) == 0 and cache.used == 0


def test_a_reloaded_version_never_answers_from_the_one_it_replaced() -> None:
    """A reload keeps the version number; its new view must not see what the old model
    computed (the model file may have changed), even for entries stored after the swap."""
    cache = ResponseCache(1 << 20)
    old = cache.for_model("m", 1)
    x = {"a": np.arange(4, dtype=np.float32)}
    old.put(key(old, x), out(4, 1.0))
    new = cache.for_model("m", 1)
    assert new.get(key(new, x)) is None
    new.put(key(new, x), out(4, 2.0))
    old.close()  # the old version retires after the new one serves
    hit = new.get(key(new, x))
    assert hit is not None and hit["y"][0] == 2.0


# -- keys ---------------------------------------------------------------------------------------


def key(
    view: ModelCache, inputs: dict[str, np.ndarray], outputs: list[tuple[str, int]] | None = None
) -> bytes:
    return view.key(inputs, outputs if outputs is not None else [("y", 0)])


def test_the_key_covers_model_version_inputs_and_requested_outputs() -> None:
    cache = ResponseCache(1 << 20)
    m1, m2, other = cache.for_model("m", 1), cache.for_model("m", 2), cache.for_model("n", 1)
    x = {"a": np.arange(4, dtype=np.float32)}
    base = key(m1, x)
    assert len(base) == 16
    assert key(m1, {"a": np.arange(4, dtype=np.float32)}) == base  # same request, same key
    different = [
        key(m2, x),
        key(other, x),
        key(m1, {"b": x["a"]}),  # input name
        key(m1, {"a": x["a"].astype(np.int32)}),  # datatype (same values)
        key(m1, {"a": x["a"].reshape(2, 2)}),  # shape (same bytes)
        key(m1, {"a": np.array([0, 1, 2, 4], np.float32)}),  # bytes
        key(m1, x, [("y", 0), ("z", 0)]),  # requested outputs
        key(m1, x, [("y", 3)]),  # classification
    ]
    assert len({base, *different}) == len(different) + 1


def test_input_order_does_not_matter_but_bytes_elements_do() -> None:
    view = ResponseCache(1 << 20).for_model("m", 1)
    a, b = np.zeros(2, np.int32), np.ones(2, np.int32)
    assert key(view, {"a": a, "b": b}) == key(view, {"b": b, "a": a})
    s1 = {"s": np.array([b"ab", b"c"], dtype=object)}
    s2 = {"s": np.array([b"a", b"bc"], dtype=object)}  # same concatenation, other elements
    assert key(view, s1) != key(view, s2)
    assert key(view, {"s": np.array(["ab", "c"], dtype=object)}) == key(view, s1)


def test_a_strided_view_hashes_like_its_contiguous_copy() -> None:
    view = ResponseCache(1 << 20).for_model("m", 1)
    full = np.arange(16, dtype=np.int64).reshape(4, 4)
    assert key(view, {"a": full[:, ::2]}) == key(view, {"a": np.ascontiguousarray(full[:, ::2])})


def test_a_huge_input_is_hashed_in_place() -> None:
    view = ResponseCache(1 << 20).for_model("m", 1)
    big = np.zeros(64 << 20, dtype=np.uint8)  # 64 MiB: hashed without a copy
    k1 = key(view, {"a": big})
    big[-1] = 1
    assert key(view, {"a": big}) != k1


# -- configuration ------------------------------------------------------------------------------


def test_parse_cache_config() -> None:
    assert parse_cache_config([], None) is None
    assert parse_cache_config(["local,size=0"], None) is None
    config = parse_cache_config(["local,size=1048576"], None)
    assert config is not None and config.size == 1048576
    legacy = parse_cache_config([], 4096)
    assert legacy is not None and legacy.size == 4096
    with pytest.raises(ValueError, match="only one cache"):
        parse_cache_config(["local,size=1", "redis,host=h"], None)


def model_config(text: str) -> mc.ModelConfig:
    return text_format.Parse('name: "m" response_cache { enable: true }\n' + text, mc.ModelConfig())


def test_sequence_and_decoupled_models_refuse_the_cache() -> None:
    refuse_unsupported(model_config(""))
    with pytest.raises(ModelLoadError, match="with sequence batching scheduler"):
        refuse_unsupported(model_config("sequence_batching { }"))
    with pytest.raises(ModelLoadError, match="'decoupled' transaction policy"):
        refuse_unsupported(model_config("model_transaction_policy { decoupled: true }"))
    plain = text_format.Parse('name: "m" sequence_batching { }', mc.ModelConfig())
    refuse_unsupported(plain)  # cache off: nothing to refuse


def test_a_hit_counts_as_success_and_queue_but_not_as_compute_or_inference() -> None:
    from tributary.stats import ModelStats

    stats = ModelStats("m", 1)
    stats.request_cache_hit(total_ns=2_000, hit_ns=500, now_ms=7)
    stats.cache_miss(miss_ns=900)
    s = stats.snapshot()
    assert (s.success.count, s.success.ns, s.queue.count, s.queue.ns) == (1, 2_000, 1, 0)
    assert (s.cache_hit.count, s.cache_hit.ns, s.cache_miss.count, s.cache_miss.ns) == (
        1,
        500,
        1,
        900,
    )
    assert s.compute_infer.count == 0 and s.inference_count == 0 and s.execution_count == 0
    assert s.last_inference_ms == 7
