"""Sequence batching: the pure table (slots, backlog, batch formation, idle release) with plain
integers for time, then the threaded scheduler with fake instances that compute in numpy."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest

from tributary.errors import Cancelled, InferenceError, InvalidArgument, Unavailable
from tributary.scheduler import Closed, SequenceFlags, SequencePolicy, SequenceScheduler, WorkItem
from tributary.scheduler.batchqueue import Entry
from tributary.scheduler.sequence import BACKLOG_CHECK_NS, Control, SequenceTable, StateSpec
from tributary.stats import ModelStats

US = 1_000
MS = 1_000_000
I32 = np.dtype(np.int32)
CONTROLS = (
    Control("START", "START", I32),
    Control("END", "END", I32),
    Control("READY", "READY", I32),
    Control("CORRID", "CORRID", np.dtype(np.uint64), wire="UINT64"),
)


def item(
    seq_id: int | str, value: int = 0, *, start: bool = False, end: bool = False, **kw
) -> WorkItem:
    x = np.full((1, 1), value, dtype=np.int32)
    return WorkItem(
        inputs={"INPUT": x},
        rows=1,
        outputs=("OUTPUT",),
        sequence=SequenceFlags(seq_id, start, end),
        **kw,
    )


def push(t: SequenceTable, now: int, seq_id: int | str, value: int = 0, **kw) -> Entry:
    e = Entry(item(seq_id, value, **kw))
    t.check(e.item)
    t.enqueue(e, now)
    return e


def slot_of(t: SequenceTable, seq_id: int | str) -> tuple[int, int]:
    for row in t.slots:
        for s in row:
            if s.seq is not None and s.seq.id == seq_id:
                return s.instance, s.index
    raise AssertionError(f"sequence {seq_id} has no slot")


def row_ids(plan_rows: Sequence[tuple[object, Entry | None]]) -> list[int | str | None]:
    out: list[int | str | None] = []
    for _, e in plan_rows:
        out.append(None if e is None else e.item.sequence.id)  # type: ignore[union-attr]
    return out


# ------------------------------------------------------------------------ requests and errors


def test_triton_errors_for_missing_id_missing_start_batch_and_corrid_type() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=4, controls=CONTROLS))
    with pytest.raises(InvalidArgument, match="must specify a non-zero or non-empty correlation"):
        t.check(item(0, start=True))
    with pytest.raises(InvalidArgument, match="non-empty correlation ID"):
        t.check(item("", start=True))
    no_seq = WorkItem(inputs={}, rows=1, outputs=())
    with pytest.raises(InvalidArgument, match="correlation ID"):
        t.check(no_seq)
    with pytest.raises(InvalidArgument, match="must specify batch-size 1 due to requirements"):
        t.check(WorkItem(inputs={}, rows=2, outputs=(), sequence=SequenceFlags(3, True)))
    with pytest.raises(
        InvalidArgument,
        match="sequence batching control 'CORRID' data-type is 'BYTES', but model 'm' "
        "expects 'UINT64'",
    ):
        t.check(item("abc", start=True))
    with pytest.raises(
        InvalidArgument,
        match="inference request for sequence 7 to model 'm' must specify the START flag on the "
        "first request of the sequence",
    ):
        t.enqueue(Entry(item(7)), 0)
    string_corrid = SequencePolicy(
        controls=(Control("CORRID", "C", np.dtype(object), wire="BYTES"),)
    )
    with pytest.raises(
        InvalidArgument, match="data-type is 'UINT64', but model 'm' expects 'BYTES'"
    ):
        SequenceTable("m", 1, string_corrid).check(item(5, start=True))


def test_int_and_string_ids_are_different_sequences() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=4))
    push(t, 0, 5, start=True)
    push(t, 0, "5", start=True)
    assert slot_of(t, 5) != slot_of(t, "5")


# ------------------------------------------------------------------------ slot assignment


def test_sequences_spread_over_instances_before_sharing_one() -> None:
    t = SequenceTable("m", 3, SequencePolicy(max_batch_size=2))
    for sid in (1, 2, 3, 4):
        push(t, 0, sid, start=True)
    assert [slot_of(t, s) for s in (1, 2, 3, 4)] == [(0, 0), (1, 0), (2, 0), (0, 1)]


def test_full_slots_put_new_sequences_in_a_backlog_that_end_releases() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1))
    a = push(t, 0, 1, start=True)
    push(t, 0, 2, 20, start=True)  # no slot: waits in the backlog
    assert t.open_sequences() == 2
    plan = t.next_batch(0, 0)
    assert row_ids(plan.rows) == [1]
    t.finished(plan.rows, 1)
    end = push(t, 2, 1, end=True)
    plan = t.next_batch(0, 2)
    assert plan.rows[0][1] is end
    assert t.finished(plan.rows, 3) == {0}  # the slot went to sequence 2
    assert slot_of(t, 2) == (0, 0)
    assert row_ids(t.next_batch(0, 3).rows) == [2]
    assert a.item.sequence is not None


def test_backlog_is_bounded_and_refuses_with_unavailable() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1, max_backlog=2))
    for sid in (1, 2, 3):
        push(t, 0, sid, start=True)
    with pytest.raises(Unavailable, match="sequences already wait"):
        push(t, 0, 4, start=True)
    assert t.open_sequences() == 3


def test_queued_requests_per_sequence_are_bounded() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_queued_per_sequence=2))
    push(t, 0, 1, start=True)
    push(t, 0, 1)
    with pytest.raises(Unavailable, match="already queued"):
        push(t, 0, 1)


# ------------------------------------------------------------------------ batch formation


def test_direct_rows_follow_slots_with_null_rows_for_idle_slots() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=4))
    for sid in (1, 2, 3):
        push(t, 0, sid, start=True)
    plan = t.next_batch(0, 0)
    assert row_ids(plan.rows) == [1, 2, 3]
    t.finished(plan.rows, 1)
    push(t, 1, 3)  # only slot 2 has work: slots 0 and 1 become null rows
    plan = t.next_batch(0, 1)
    assert row_ids(plan.rows) == [None, None, 3]


def test_one_request_per_sequence_per_batch_in_order() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=4))
    first = push(t, 0, 1, 1, start=True)
    second = push(t, 0, 1, 2)
    plan = t.next_batch(0, 0)
    assert [e for _, e in plan.rows] == [first]
    assert t.next_batch(0, 0).rows == []  # the sequence is running: its next request waits
    t.finished(plan.rows, 1)
    assert [e for _, e in t.next_batch(0, 1).rows] == [second]


def test_direct_delay_waits_for_slot_utilization() -> None:
    policy = SequencePolicy(max_batch_size=4, max_queue_delay_us=100, minimum_slot_utilization=0.5)
    t = SequenceTable("m", 1, policy)
    push(t, 0, 1, start=True)
    plan = t.next_batch(0, 10 * US)
    assert plan.rows == [] and plan.wait_until_ns == 100 * US
    push(t, 20 * US, 2, start=True)  # 2 of 4 slots ready: utilization reached
    assert row_ids(t.next_batch(0, 20 * US).rows) == [1, 2]


def test_oldest_takes_oldest_heads_up_to_the_batch_size_without_null_rows() -> None:
    policy = SequencePolicy(max_batch_size=2, oldest=True, max_candidate_sequences=4)
    t = SequenceTable("m", 1, policy)
    push(t, 30, 3, start=True)
    push(t, 10, 1, start=True)
    push(t, 20, 2, start=True)
    plan = t.next_batch(0, 40)
    assert sorted(row_ids(plan.rows)) == [1, 3]  # arrival order: 3 came first, then 1
    t.finished(plan.rows, 50)
    assert row_ids(t.next_batch(0, 50).rows) == [2]


def test_oldest_waits_for_a_preferred_size_until_the_delay() -> None:
    policy = SequencePolicy(
        max_batch_size=4,
        oldest=True,
        max_candidate_sequences=8,
        preferred_batch_sizes=(2,),
        max_queue_delay_us=1000,
    )
    t = SequenceTable("m", 1, policy)
    push(t, 0, 1, start=True)
    plan = t.next_batch(0, 0)
    assert plan.rows == [] and plan.wait_until_ns == 1000 * US
    assert row_ids(t.next_batch(0, 1000 * US).rows) == [1]  # the delay passed: run alone
    t2 = SequenceTable("m", 1, policy)
    push(t2, 0, 1, start=True)
    push(t2, 5, 2, start=True)
    assert row_ids(t2.next_batch(0, 10).rows) == [1, 2]  # the preferred size: at once


def test_rows_with_other_shapes_wait_for_a_later_batch() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=4))
    push(t, 0, 1, start=True)
    odd = Entry(
        WorkItem(
            inputs={"INPUT": np.zeros((1, 3), np.int32)},
            rows=1,
            outputs=(),
            sequence=SequenceFlags(2, True),
        )
    )
    t.enqueue(odd, 0)
    plan = t.next_batch(0, 0)
    assert row_ids(plan.rows) == [1]  # slot 1 has other shapes: it waits
    t.finished(plan.rows, 1)
    assert row_ids(t.next_batch(0, 1).rows) == [None, 2]


# ------------------------------------------------------------------------ release paths


def test_idle_sequences_are_released_and_then_need_start() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1, max_sequence_idle_us=100))
    push(t, 0, 1, start=True)
    push(t, 0, 2, start=True)  # backlogged
    plan = t.next_batch(0, 0)
    t.finished(plan.rows, 10 * US)
    dropped, woken = t.reap(50 * US)
    assert not dropped and not woken and t.next_reap_ns == 110 * US
    dropped, woken = t.reap(110 * US)
    assert woken == {0} and slot_of(t, 2) == (0, 0)  # the backlog got the freed slot
    with pytest.raises(InvalidArgument, match="must specify the START flag"):
        push(t, 120 * US, 1, 5)


def test_backlogged_requests_expire_with_tritons_text() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1))
    push(t, 0, 1, start=True)
    t.reap(0)  # the first look: next one after the idle time (1 s)
    waiting = push(t, 0, 2, start=True, timeout_us=50)
    assert t.next_reap_ns == 50 * US  # the backlog deadline comes first
    dropped, _ = t.reap(50 * US)
    assert dropped == [waiting]
    assert isinstance(waiting.error, Unavailable)
    assert "timeout of the corresponding sequence has been expired" in waiting.error.message
    assert t.open_sequences() == 1 and t.queued == 1


def test_backlogged_sequences_of_clients_that_went_away_leave_the_backlog() -> None:
    """A client whose deadline passed (or whose stream was cancelled) while its sequence
    waited for a slot: the sequence must not keep its backlog place (nor its caller's thread)
    until a slot frees -- an active sequence may hold the only slot for ever."""
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1, max_backlog=1))
    push(t, 0, 1, start=True)
    t.reap(0)
    wanted = [True]
    waiting = push(t, 0, 2, start=True, is_active=lambda: wanted[0])
    with pytest.raises(Unavailable, match="sequences already wait"):
        push(t, 0, 3, start=True)
    assert t.next_reap_ns == BACKLOG_CHECK_NS  # checked again well before the idle time
    assert t.reap(BACKLOG_CHECK_NS) == ([], set())  # still wanted: it stays
    wanted[0] = False
    dropped, _ = t.reap(2 * BACKLOG_CHECK_NS)
    assert dropped == [waiting] and isinstance(waiting.error, Cancelled)
    assert waiting.item.failure_reason == "CANCELED"
    assert t.open_sequences() == 1 and t.queued == 1 and not t.knows(2)
    push(t, 2 * BACKLOG_CHECK_NS, 3, start=True)  # its backlog place is free again


def test_cancel_fails_the_whole_sequence_and_frees_its_slot() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=1))
    a = push(t, 0, 1, start=True)
    b = push(t, 0, 1)
    woken: set[int] = set()
    assert t.cancel(b.item, woken) == [a, b]
    assert isinstance(a.error, Cancelled) and t.queued == 0 and t.open_sequences() == 0
    push(t, 1, 2, start=True)
    assert slot_of(t, 2) == (0, 0)


def test_inactive_head_cancels_its_sequence_when_a_batch_forms() -> None:
    t = SequenceTable("m", 1, SequencePolicy(max_batch_size=2))
    gone = push(t, 0, 1, start=True, is_active=lambda: False)
    push(t, 0, 2, start=True)
    plan = t.next_batch(0, 0)
    assert plan.dropped == [gone] and row_ids(plan.rows) == [None, 2]


def test_drain_frees_every_slot_and_the_backlog() -> None:
    t = SequenceTable("m", 2, SequencePolicy(max_batch_size=1))
    entries = [push(t, 0, sid, start=True) for sid in (1, 2, 3)]
    assert sorted(map(id, t.drain())) == sorted(map(id, entries))
    assert t.open_sequences() == 0 and t.queued == 0
    push(t, 0, 4, start=True)
    push(t, 0, 5, start=True)
    assert {slot_of(t, 4), slot_of(t, 5)} == {(0, 0), (1, 0)}


# ------------------------------------------------------------------------ the threaded driver


class Summer:
    """OUTPUT = (INPUT + ACC_IN) * READY + START, ACC_OUT = OUTPUT; records each batch. With a
    gate, `run` blocks until the test opens it."""

    def __init__(self, name: str = "i0", gate: threading.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.batches: list[dict[str, np.ndarray]] = []
        self.fail = False
        self.entered = threading.Event()

    def run(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append(dict(inputs))
        out = (inputs["INPUT"] + inputs["ACC_IN"]) * inputs["READY"] + inputs["START"]
        return {"OUTPUT": out, "ACC_OUT": out}


STATE = StateSpec("ACC_IN", "ACC_OUT", I32, (1,), np.full((1,), 100, np.int32))


def scheduler(instances: Sequence[Summer], **kw) -> SequenceScheduler:
    kw.setdefault("max_batch_size", 4)
    policy = SequencePolicy(controls=CONTROLS, states=(STATE,), **kw)
    return SequenceScheduler("m", instances, policy, ModelStats("m", 1))


def test_state_is_kept_per_sequence_and_reset_by_start() -> None:
    s = scheduler([Summer()])
    try:
        out = [int(s.infer(item(9, v, start=(v == 1)))["OUTPUT"][0, 0]) for v in (1, 2, 3)]
        assert out == [102, 104, 107]  # initial 100, +1 for START, then the running sum
        again = s.infer(item(9, 5, start=True, end=True))["OUTPUT"]
        assert int(again[0, 0]) == 106
    finally:
        s.close(1)


def test_controls_and_corrid_rows_match_their_requests() -> None:
    gate = threading.Event()
    inst = Summer(gate=gate)
    s = scheduler([inst])
    results: list[tuple[int, object]] = []
    lock = threading.Lock()

    def done(tag: int):
        def cb(result: object, error: InferenceError | None) -> None:
            with lock:
                results.append((tag, error or result))

        return cb

    try:
        s.submit(item(11, 1, start=True), done(0))  # runs alone, held at the gate
        assert inst.entered.wait(10)
        s.submit(item(12, 2, start=True), done(1))
        s.submit(item(2**64 - 1, 3, start=True, end=True), done(2))
        gate.set()
        s.close(5)
    finally:
        gate.set()
    assert len(results) == 3 and all(isinstance(r, dict) for _, r in results)
    second = inst.batches[1]
    assert second["READY"].ravel().tolist() == [0, 1, 1]  # slot 0 idle: a null row
    assert second["START"].ravel().tolist() == [0, 1, 1]
    assert second["END"].ravel().tolist() == [0, 0, 1]
    assert second["CORRID"].ravel().tolist() == [0, 12, 2**64 - 1]


def test_model_error_fails_the_batch_but_keeps_the_sequence() -> None:
    inst = Summer()
    s = scheduler([inst])
    try:
        assert int(s.infer(item(3, 1, start=True))["OUTPUT"][0, 0]) == 102
        inst.fail = True
        with pytest.raises(InferenceError, match="boom"):
            s.infer(item(3, 1))
        inst.fail = False
        assert int(s.infer(item(3, 1, end=True))["OUTPUT"][0, 0]) == 103  # state unchanged
    finally:
        s.close(1)


def test_close_fails_queued_requests_and_refuses_new_sequences() -> None:
    gate = threading.Event()
    s = scheduler([Summer(gate=gate)], max_batch_size=1)
    inst = s._instances[0]
    errors: list[InferenceError | None] = []
    s.submit(item(1, 1, start=True), lambda r, e: errors.append(e))  # held at the gate
    assert inst.entered.wait(10)  # type: ignore[attr-defined]
    s.submit(item(1, 2), lambda r, e: errors.append(e))  # queued behind it
    s.close(0)
    with pytest.raises(Closed):
        s.infer(item(2, 1, start=True))
    gate.set()
    assert len(errors) >= 1 and isinstance(errors[0], Closed)


# ------------------------------------------------------------------------ config -> policy


def _config(text: str):  # type: ignore[no-untyped-def]
    from tributary.config import parse_config

    return parse_config(text, "config.pbtxt")


def test_policy_from_config_controls_states_and_strategy(tmp_path) -> None:
    from tributary.model import sequence_policy

    cfg = _config(
        """
        name: "m" max_batch_size: 4
        sequence_batching {
          oldest {
            max_candidate_sequences: 16 preferred_batch_size: [2]
            max_queue_delay_microseconds: 50 preserve_ordering: true
          }
          control_input [
            { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
            { name: "R" control [
              { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } ] },
            { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }
          ]
          state [ { input_name: "h" output_name: "h_out" data_type: TYPE_FP32 dims: [ 3 ] } ]
        }
        """
    )
    p = sequence_policy(cfg, tmp_path)
    assert p.oldest and p.slots_per_instance == 16 and p.batch_cap == 4
    assert p.preferred_batch_sizes == (2,) and p.max_queue_delay_us == 50 and p.preserve_ordering
    assert p.max_sequence_idle_us == 1_000_000
    start, ready, corrid = p.controls
    assert (start.kind, start.dtype, start.true) == ("START", np.dtype(np.float32), 1.0)
    assert (ready.kind, ready.dtype, ready.true) == ("READY", np.dtype(np.bool_), True)
    assert (corrid.kind, corrid.wire) == ("CORRID", "BYTES")
    np.testing.assert_array_equal(p.states[0].start_value(), np.zeros(3, np.float32))
    idle = p.idle_inputs(2)
    assert idle["S"].shape == (2, 1) and idle["h"].shape == (2, 3) and idle["C"].dtype == object


def test_initial_state_file_is_confined_to_the_model_dir(tmp_path) -> None:
    from tributary.errors import ModelLoadError
    from tributary.model import sequence_policy

    def cfg(data: str) -> object:
        return _config(
            f"""
            name: "m" max_batch_size: 0
            sequence_batching {{ state [ {{ input_name: "a" output_name: "b" data_type: TYPE_INT32
              dims: [ 2 ] initial_state {{ name: "i" data_type: TYPE_INT32 dims: [ 2 ]
              {data} }} }} ] }}
            """
        )

    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "ok.bin").write_bytes(np.array([7, 8], "<i4").tobytes())
    (tmp_path / "initial_state" / "short.bin").write_bytes(b"\0\0\0\0")
    p = sequence_policy(cfg('data_file: "ok.bin"'), tmp_path)
    np.testing.assert_array_equal(p.states[0].start_value(), [7, 8])
    with pytest.raises(ModelLoadError):
        sequence_policy(cfg('data_file: "../../../etc/passwd"'), tmp_path)
    with pytest.raises(ModelLoadError, match="expects 8 bytes"):
        sequence_policy(cfg('data_file: "short.bin"'), tmp_path)
    rank = cfg("zero_data: true")
    rank.sequence_batching.state[0].initial_state[0].dims.append(1)  # type: ignore[attr-defined]
    with pytest.raises(ModelLoadError, match="doesn't match the size of 'state' dimensions"):
        sequence_policy(rank, tmp_path)


def test_bad_controls_are_load_errors(tmp_path) -> None:
    from tributary.errors import ModelLoadError
    from tributary.model import sequence_policy

    corrid = _config(
        'name: "m" sequence_batching { control_input [ { name: "C" control [ '
        "{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 } ] } ] }"
    )
    with pytest.raises(ModelLoadError, match="expected TYPE_UINT64, TYPE_INT64"):
        sequence_policy(corrid, tmp_path)
    pair = _config(
        'name: "m" sequence_batching { control_input [ { name: "S" control [ '
        "{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 1 ] } ] } ] }"
    )
    with pytest.raises(ModelLoadError, match="exactly two values"):
        sequence_policy(pair, tmp_path)


def test_unbatched_model_gets_controls_and_state_without_a_batch_dim() -> None:
    seen: list[dict[str, np.ndarray]] = []

    class Flat:
        name = "flat"

        def run(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]):  # type: ignore[no-untyped-def]
            seen.append(dict(inputs))
            acc = inputs["ACC_IN"] + inputs["INPUT"]
            return {"OUTPUT": acc, "ACC_OUT": acc}

    state = StateSpec("ACC_IN", "ACC_OUT", I32, (1,))
    policy = SequencePolicy(controls=CONTROLS[:1], states=(state,))
    s = SequenceScheduler("m", [Flat()], policy, ModelStats("m", 1))

    def flat(seq_id: int, value: int, start: bool = False) -> WorkItem:
        return WorkItem(
            inputs={"INPUT": np.array([value], np.int32)},
            rows=1,
            outputs=("OUTPUT",),
            sequence=SequenceFlags(seq_id, start),
        )

    try:
        assert s.infer(flat(1, 4, start=True))["OUTPUT"].tolist() == [4]
        assert s.infer(flat(1, 5))["OUTPUT"].tolist() == [9]
    finally:
        s.close(1)
    assert seen[0]["START"].shape == (1,) and seen[1]["ACC_IN"].shape == (1,)


def test_hammer_every_path_gives_back_its_slot() -> None:
    """Many clients over few slots with model errors, cancelled clients, backlog timeouts and
    sequences that never END; afterwards every request was answered exactly once, nothing is
    pending, and once idle sequences are released every slot takes a new sequence."""
    import random
    import time

    rng = random.Random(5)
    insts = [Summer("a"), Summer("b")]

    def flaky(inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if rng.random() < 0.1:
            raise RuntimeError("model error")
        time.sleep(rng.random() * 0.001)
        out = (inputs["INPUT"] + inputs["ACC_IN"]) * inputs["READY"]
        return {"OUTPUT": out, "ACC_OUT": out}

    for inst in insts:
        inst.run = flaky  # type: ignore[method-assign]
    stats = ModelStats("m", 1)
    policy = SequencePolicy(
        max_batch_size=2, controls=CONTROLS, states=(STATE,), max_sequence_idle_us=20_000
    )
    s = SequenceScheduler("m", insts, policy, stats)
    answered: dict[int, int] = {}
    lock = threading.Lock()
    counter = [0]

    def client(seed: int) -> None:
        r = random.Random(seed)
        for k in range(15):
            sid = seed * 100 + k
            length = r.randint(1, 4)
            for i in range(length):
                with lock:
                    counter[0] += 1
                    tag = counter[0]
                active = (lambda: False) if r.random() < 0.05 else None
                it = item(
                    sid,
                    i,
                    start=i == 0,
                    end=(i == length - 1) and r.random() < 0.7,
                    is_active=active,
                    timeout_us=r.choice([0, 500]),
                )

                def cb(result: object, error: object, tag: int = tag) -> None:
                    with lock:
                        answered[tag] = answered.get(tag, 0) + 1

                if r.random() < 0.5:
                    s.submit(it, cb)
                else:
                    try:
                        s.infer(it)
                    except InferenceError:
                        pass
                    cb(None, None)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 10
    while len(answered) < counter[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(answered) == counter[0] and set(answered.values()) == {1}
    assert stats.snapshot().pending == 0
    table = s._table
    deadline = time.monotonic() + 10
    while table.open_sequences() and time.monotonic() < deadline:
        time.sleep(0.01)  # idle sequences go after 20 ms
    assert table.open_sequences() == 0 and table.queued == 0
    for inst in insts:
        inst.run = Summer.run.__get__(inst)  # type: ignore[method-assign]
    outs = [s.infer(item(90000 + k, 1, start=True, end=True)) for k in range(4)]
    assert len(outs) == 4
    s.close(1)


def test_state_tensors_are_checked_against_the_graph(tmp_path) -> None:
    import build_models as bm

    from tributary import config as C
    from tributary.backends.graph import read_graph
    from tributary.errors import ModelLoadError

    good = bm.ACCUMULATOR_CONFIG.format(name="accumulator")
    for bad, match in [
        (good.replace('output_name: "ACC_OUT"', 'output_name: "NOPE"'), "state output 'NOPE'"),
        (
            good.replace("data_type: TYPE_INT32\n      dims", "data_type: TYPE_FP32\n      dims"),
            "TYPE_FP32",
        ),
    ]:
        d = bm.build_accumulator(tmp_path / match[:5], config=bad)
        config = C.normalize(C.load_config(d), d)
        with pytest.raises(ModelLoadError, match=match):
            C.validate(config, read_graph(C.model_file(d, 1, config)), d)


def test_slot_counts_are_bounded_at_load(tmp_path) -> None:
    from tributary.errors import ModelLoadError
    from tributary.model import sequence_policy

    with pytest.raises(ModelLoadError, match="max_batch_size must be at most 65536"):
        sequence_policy(_config('name: "m" max_batch_size: 2000000000 sequence_batching { }'))
    oldest = 'name: "m" sequence_batching { oldest { max_candidate_sequences: 70000 } }'
    with pytest.raises(ModelLoadError, match="max_candidate_sequences must be between"):
        sequence_policy(_config(oldest))
