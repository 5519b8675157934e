"""Ensembles: Triton's DAG checks at load, and step readiness/ordering when a request runs.

Composing models are fakes here (a scheduler that records submissions and is completed by the
test), so the order in which steps start is observed exactly, without threads or timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from tributary.config import ModelSignature, TensorSpec
from tributary.datatypes import BY_NAME
from tributary.ensemble import MAX_NESTING, MAX_STEPS, check_composing, check_nesting, plan
from tributary.errors import Cancelled, InferenceError, Internal, ModelLoadError
from tributary.scheduler import Closed, WorkItem
from tributary.scheduler.batchqueue import SequenceFlags
from tributary.scheduler.ensemble import EnsembleScheduler
from tributary.stats import ModelStats
from tributary_client._proto import model_config_pb2 as mc


def cfg(text: str, name: str = "ens") -> mc.ModelConfig:
    config = text_format.Parse(text, mc.ModelConfig())
    config.name = name
    config.platform = "ensemble"
    return config


def io(kind: str, name: str, dtype: str = "TYPE_FP32", dims: str = "4") -> str:
    return f'{kind} {{ name: "{name}" data_type: {dtype} dims: [ {dims} ] }}\n'


def step(model: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'step {{ model_name: "{model}" model_version: {version} {ins} {outs} }}\n'


def sched(*steps: str) -> str:
    return "ensemble_scheduling {\n" + "".join(steps) + "}\n"


# A diamond: A feeds B and C, which both feed D.
DIAMOND = (
    io("input", "IN")
    + io("output", "OUT")
    + sched(
        step("a", {"x": "IN"}, {"y": "t_a"}),
        step("b", {"x": "t_a"}, {"y": "t_b"}),
        step("c", {"x": "t_a"}, {"y": "t_c"}),
        step("d", {"x": "t_b", "z": "t_c"}, {"y": "OUT"}),
    )
)


def load_error(text: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        plan(cfg(text))
    return info.value.message


# -- plan(): Triton's structural checks --------------------------------------------------------


def test_plan_readiness_table() -> None:
    p = plan(cfg(DIAMOND))
    assert [s.model for s in p.steps] == ["a", "b", "c", "d"]
    assert p.needs == (1, 1, 1, 2)
    assert p.consumers == {"IN": (0,), "t_a": (1, 2), "t_b": (3,), "t_c": (3,)}
    assert p.dependencies() == ["a", "b", "c", "d"]
    assert p.outputs == ("OUT",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (io("input", "IN") + io("output", "OUT"), "must specify 'step' for ensemble 'ens'"),
        (
            io("input", "IN")
            + io("output", "OUT")
            + sched('step { input_map { key: "x" value: "IN" } }'),
            "must specify 'model_name' in step 0 of ensemble 'ens'",
        ),
        (
            io("input", "IN") + io("output", "OUT") + sched('step { model_name: "a" }'),
            "must specify 'input_map' in step 0 of ensemble 'ens'",
        ),
        (
            io("input", "IN")
            + io("output", "OUT")
            + sched('step { model_name: "a" input_map { key: "x" value: "IN" } }'),
            "must specify 'output_map' in step 0 of ensemble 'ens'",
        ),
        (
            io("input", "IN")
            + io("output", "OUT")
            + sched(step("a", {"x": "IN"}, {"y": "OUT"}), step("b", {"x": "IN"}, {"y": "OUT"})),
            "ensemble tensor 'OUT' can appear in an output map only once for ensemble 'ens' step 1",
        ),
        (
            io("input", "IN")
            + io("input", "SPARE")
            + io("output", "OUT")
            + sched(step("a", {"x": "IN"}, {"y": "OUT"})),
            "ensemble input 'SPARE' for ensemble ens' is not used",
        ),
        (
            io("input", "IN")
            + io("output", "OUT")
            + io("output", "MORE")
            + sched(step("a", {"x": "IN"}, {"y": "OUT"})),
            "ensemble output 'MORE' for ensemble ens' is not used",
        ),
        (  # an input no step produces (and no client sends)
            io("input", "IN")
            + io("output", "OUT")
            + sched(step("a", {"x": "IN", "z": "NOWHERE"}, {"y": "OUT"})),
            "output 'OUT' for ensemble 'ens' is not written: at least one of its depending "
            "tensors, 'NOWHERE', is not connected",
        ),
        (
            io("input", "IN")
            + io("output", "OUT")
            + sched(step("a", {"x": "IN"}, {"y": "OUT", "w": "WASTE"})),
            "ensemble tensor 'WASTE' is unused in ensemble 'ens'",
        ),
        (
            io("input", "IN")
            + io("output", "OUT")
            + "instance_group { count: 1 }\n"
            + sched(step("a", {"x": "IN"}, {"y": "OUT"})),
            "instance group should not be specified for ensemble 'ens'",
        ),
    ],
)
def test_plan_refusals_use_tritons_texts(text: str, message: str) -> None:
    assert load_error(text) == message


def test_a_cycle_never_becomes_ready() -> None:
    # b needs c's output and c needs b's: neither can start, so OUT is never written.
    text = (
        io("input", "IN")
        + io("output", "OUT")
        + sched(
            step("b", {"x": "IN", "z": "t_c"}, {"y": "t_b"}),
            step("c", {"x": "t_b"}, {"y": "t_c"}),
            step("d", {"x": "t_b"}, {"y": "OUT"}),
        )
    )
    message = load_error(text)
    assert message.startswith("output 'OUT' for ensemble 'ens' is not written")
    assert "is not connected" in message


def test_step_count_is_bounded() -> None:
    chain = [
        step("m", {"x": "IN" if i == 0 else f"t{i}"}, {"y": f"t{i + 1}"}) for i in range(10_000)
    ]
    message = load_error(io("input", "IN") + io("output", "t10000") + sched(*chain))
    assert f"this server allows at most {MAX_STEPS}" in message and "10000 steps" in message


def test_longest_allowed_chain_plans() -> None:
    n = MAX_STEPS
    chain = [step("m", {"x": "IN" if i == 0 else f"t{i}"}, {"y": f"t{i + 1}"}) for i in range(n)]
    p = plan(cfg(io("input", "IN") + io("output", f"t{n}") + sched(*chain)))
    assert len(p.steps) == n and p.needs == (1,) * n


# -- check_composing(): against the loaded composing models --------------------------------------


@dataclass
class Loaded:
    name: str
    version: int
    config: mc.ModelConfig


def composing(name: str, text: str, version: int = 1) -> Loaded:
    config = text_format.Parse(text, mc.ModelConfig())
    config.name = name
    return Loaded(name, version, config)


def lookup_of(*models: Loaded) -> Callable[[str, int | None], Loaded | None]:
    def lookup(name: str, version: int | None) -> Loaded | None:
        for m in models:
            if m.name == name and (version is None or m.version == version):
                return m
        return None

    return lookup


SIMPLE_PIPE = io("input", "IN") + io("output", "OUT") + sched(step("a", {"x": "IN"}, {"y": "OUT"}))
A_OK = composing("a", io("input", "x") + io("output", "y"))


def composing_error(text: str, *models: Loaded) -> str:
    config = cfg(text)
    with pytest.raises(ModelLoadError) as info:
        check_composing(plan(config), config, lookup_of(*models))
    return info.value.message


def ensemble_over(name: str, model: str) -> Loaded:
    """A loaded one-step ensemble `name` that runs `model`."""
    text = io("input", "x") + io("output", "y") + sched(step(model, {"x": "x"}, {"y": "y"}))
    loaded = composing(name, text)
    loaded.config.platform = "ensemble"
    return loaded


def test_a_reload_that_closes_a_cycle_of_ensembles_is_refused() -> None:
    """e2 (loaded) runs e1; reloading e1 to run e2 would run e1 inside itself for ever: steps
    resolve by name, so the e1 that e2 reaches is the new one. Triton's text."""
    e1 = cfg(io("input", "x") + io("output", "y") + sched(step("e2", {"x": "x"}, {"y": "y"})))
    e1.name = "e1"
    loaded = lookup_of(ensemble_over("e2", "e1"), ensemble_over("e1", "a"), A_OK)
    with pytest.raises(ModelLoadError) as info:
        check_nesting("e1", plan(e1), loaded)
    assert info.value.message == "circular dependency between ensembles: e1 -> ... -> e2 -> e1"


def test_ensembles_nest_at_most_max_nesting_deep() -> None:
    """Loading ensembles one over another builds any depth (each load sees its composing
    ensemble loaded already); each level is a nested submit on one thread at run time."""
    chain = [A_OK] + [ensemble_over(f"l{i}", "a" if i == 1 else f"l{i - 1}") for i in range(1, 40)]
    lookup = lookup_of(*chain)

    def top(over: str) -> mc.ModelConfig:
        config = cfg(
            io("input", "x") + io("output", "y") + sched(step(over, {"x": "x"}, {"y": "y"}))
        )
        config.name = "top"
        return config

    check_nesting("top", plan(top(f"l{MAX_NESTING - 1}")), lookup)  # MAX_NESTING levels: fine
    with pytest.raises(ModelLoadError) as info:
        check_nesting("top", plan(top(f"l{MAX_NESTING}")), lookup)
    assert "is part of a circular or too deep ensemble dependency: top -> l16 -> l15" in (
        info.value.message
    )


def test_composing_models_that_agree_pass() -> None:
    config = cfg(SIMPLE_PIPE)
    check_composing(plan(config), config, lookup_of(A_OK))


def test_unknown_composing_model() -> None:
    assert (
        composing_error(SIMPLE_PIPE) == "ensemble 'ens' depends on 'a' which has no loaded version"
    )


def test_required_version_not_loaded() -> None:
    text = io("input", "IN") + io("output", "OUT") + sched(step("a", {"x": "IN"}, {"y": "OUT"}, 3))
    assert composing_error(text, A_OK) == (
        "ensemble 'ens' depends on 'a' whose required version 3 is not loaded"
    )


def test_datatype_mismatch_between_steps() -> None:
    a = composing("a", io("input", "x", "TYPE_INT32") + io("output", "y"))
    assert composing_error(SIMPLE_PIPE, a) == (
        "in ensemble ens, ensemble tensor IN: inconsistent data type: TYPE_FP32 is inferred "
        "from model ens while TYPE_INT32 is inferred from model a"
    )


def test_shape_mismatch_between_steps() -> None:
    a = composing("a", io("input", "x") + io("output", "y", dims="5"))
    assert composing_error(SIMPLE_PIPE, a) == (
        "in ensemble ens, ensemble tensor OUT: inconsistent shape: [4] is inferred from model "
        "ens while [5] is inferred from model a"
    )


def test_variable_dims_are_consistent_with_fixed_ones() -> None:
    a = composing("a", io("input", "x", dims="-1") + io("output", "y", dims="-1"))
    config = cfg(SIMPLE_PIPE)
    check_composing(plan(config), config, lookup_of(a))


def test_mapping_to_a_missing_input_or_from_a_missing_output() -> None:
    a = composing("a", io("input", "other") + io("output", "y"))
    assert composing_error(SIMPLE_PIPE, a) == (
        "in ensemble ens, ensemble tensor IN is mapping to non-existing input x in model a"
    )
    a = composing("a", io("input", "x") + io("output", "other"))
    assert composing_error(SIMPLE_PIPE, a) == (
        "in ensemble ens, ensemble tensor OUT is mapped from non-existing output y in model a"
    )


def test_an_unmapped_model_input() -> None:
    a = composing("a", io("input", "x") + io("input", "x2") + io("output", "y"))
    assert composing_error(SIMPLE_PIPE, a) == (
        "in ensemble ens, input x2 in model a is not mapped to any ensemble tensors"
    )


def test_ensemble_batch_larger_than_a_step_allows() -> None:
    a = composing("a", "max_batch_size: 2\n" + io("input", "x") + io("output", "y"))
    text = "max_batch_size: 8\n" + SIMPLE_PIPE
    assert composing_error(text, a) == (
        "ensemble ens allows maximum batch size 8, but it contains model a which only allows "
        "maximum batch size to be 2"
    )


# -- execution: readiness and ordering ----------------------------------------------------------


def sig(name: str, inputs: list[str], outputs: list[str], mbs: int = 0) -> ModelSignature:
    fp32 = BY_NAME["FP32"]
    return ModelSignature(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=mbs,
        inputs=tuple(TensorSpec(n, fp32, (4,), None) for n in inputs),
        outputs=tuple(TensorSpec(n, fp32, (4,), None) for n in outputs),
    )


@dataclass
class FakeScheduler:
    """Records submissions; the test completes them in the order it chooses."""

    log: list[str]
    name: str
    pending: list[tuple[WorkItem, Any]] = field(default_factory=list)
    cancelled: list[WorkItem] = field(default_factory=list)

    def submit(self, item: WorkItem, callback: Any) -> None:
        self.log.append(f"start {self.name}")
        self.pending.append((item, callback))

    def cancel(self, item: WorkItem) -> bool:
        self.cancelled.append(item)
        return True

    def complete(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        item, callback = self.pending.pop(0)
        item.queue_ns = 5
        self.log.append(f"done {self.name}")
        callback(fn(item.inputs), None)

    def fail(self, error: InferenceError, reason: str = "BACKEND") -> None:
        item, callback = self.pending.pop(0)
        item.failure_reason = reason
        callback(None, error)


@dataclass
class FakeModel:
    name: str
    signature: ModelSignature
    scheduler: FakeScheduler
    stats: ModelStats
    version: int = 1


class Diamond:
    """The DIAMOND ensemble over fake models a (x+1), b (x*2), c (x*3), d (x+z)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.models = {
            n: FakeModel(n, sig(n, ["x", "z"] if n == "d" else ["x"], ["y"]),
                         FakeScheduler(self.log, n), ModelStats(n, 1))
            for n in "abcd"
        }  # fmt: skip
        self.gone: set[str] = set()
        config = cfg(DIAMOND)
        self.ens = EnsembleScheduler(plan(config), self.resolve, sig("ens", ["IN"], ["OUT"]))
        self.results: list[tuple[Any, Any]] = []

    def resolve(self, name: str, version: str) -> FakeModel:
        if name in self.gone:
            raise Internal(f"Request for unknown model: '{name}' has no available versions")
        return self.models[name]

    def submit(self, value: float = 1.0, **kw: Any) -> WorkItem:
        item = WorkItem(
            inputs={"IN": np.full(4, value, dtype=np.float32)}, rows=1, outputs=("OUT",), **kw
        )
        self.ens.submit(item, lambda out, err: self.results.append((out, err)))
        return item

    def run(self, name: str) -> None:
        ops = {
            "a": lambda i: {"y": i["x"] + 1},
            "b": lambda i: {"y": i["x"] * 2},
            "c": lambda i: {"y": i["x"] * 3},
            "d": lambda i: {"y": i["x"] + i["z"]},
        }
        self.models[name].scheduler.complete(ops[name])


def test_steps_carry_the_requests_sequence_id_and_flags() -> None:
    """A composing model with sequence batching needs the correlation ID and START/END of the
    ensemble's request on every step (Triton copies them); without them every request to
    such an ensemble failed with 'must specify a non-zero or non-empty correlation ID'."""
    d = Diamond()
    d.submit(1.0, sequence=SequenceFlags(42, start=True, end=False))
    d.run("a")
    for name in "bc":
        ((item, _),) = d.models[name].scheduler.pending
        assert item.sequence == SequenceFlags(42, start=True, end=False)


def test_steps_start_as_their_inputs_become_ready_and_independent_ones_together() -> None:
    d = Diamond()
    d.submit(1.0)
    assert d.log == ["start a"]
    d.run("a")
    assert d.log == ["start a", "done a", "start b", "start c"]  # b and c in flight together
    d.run("c")
    assert d.log[-1] == "done c"  # d still waits for b
    assert not d.results
    d.run("b")
    assert d.log[-2:] == ["done b", "start d"]
    d.run("d")
    ((out, err),) = d.results
    assert err is None
    np.testing.assert_array_equal(out["OUT"], np.full(4, (1 + 1) * 2 + (1 + 1) * 3, np.float32))
    # each step counted once by its own model; the ensemble itself records nothing here
    for n in "abcd":
        snap = d.models[n].stats.snapshot()
        assert (snap.success.count, snap.queue.count, snap.queue.ns) == (1, 1, 5)
    assert not d.ens._runs


def test_a_failing_step_fails_the_request_once_and_stops_the_graph() -> None:
    d = Diamond()
    item = d.submit()
    d.run("a")
    d.models["b"].scheduler.fail(Internal("inference failed for model 'b'"))
    ((out, err),) = d.results
    assert out is None and err.message == "inference failed for model 'b'"
    assert item.failure_reason == "BACKEND"
    d.run("c")  # c was already running: its result is dropped, d never starts
    assert "start d" not in d.log and len(d.results) == 1
    assert d.models["b"].stats.snapshot().fail.count == 1
    assert d.models["c"].stats.snapshot().success.count == 1


def test_a_missing_composing_model_names_the_step() -> None:
    d = Diamond()
    d.gone.add("a")
    d.submit()
    ((out, err),) = d.results
    assert err.message.startswith("in ensemble 'ens', step 0: composing model 'a' is not available")


def test_a_step_retired_by_a_reload_is_submitted_again() -> None:
    d = Diamond()
    d.submit()
    d.models["a"].scheduler.fail(Closed("Server exiting"), "OTHER")
    assert d.log == ["start a", "start a"]
    assert not d.results


def test_cancel_withdraws_queued_steps_and_answers_cancelled() -> None:
    d = Diamond()
    item = d.submit()
    d.run("a")
    assert d.ens.cancel(item)
    ((out, err),) = d.results
    assert isinstance(err, Cancelled) and item.failure_reason == "CANCELED"
    assert (
        len(d.models["b"].scheduler.cancelled) == 1 and len(d.models["c"].scheduler.cancelled) == 1
    )
    assert not d.ens.cancel(item)  # already gone


def test_an_inactive_request_starts_no_further_step() -> None:
    d = Diamond()
    active = [True]
    d.submit(is_active=lambda: active[0])
    active[0] = False
    d.run("a")
    ((out, err),) = d.results
    assert isinstance(err, Cancelled)
    assert d.log == ["start a", "done a"]


def test_a_tensor_of_the_wrong_shape_between_steps_is_refused_naming_the_model() -> None:
    d = Diamond()
    d.submit()
    d.models["a"].scheduler.complete(lambda i: {"y": np.zeros(5, np.float32)})
    ((out, err),) = d.results
    assert "unexpected shape for input 'x' for model 'b'" in err.message


def test_close_refuses_new_requests_with_closed() -> None:
    d = Diamond()
    d.ens.close(0)
    d.submit()
    ((out, err),) = d.results
    assert isinstance(err, Closed)


def test_composing_caches_answer_steps_without_recursion() -> None:
    """A chain of MAX_STEPS steps over one cached model: the second identical request is
    answered by the cache at every step, synchronously, in a loop (no recursion limit)."""
    from tributary.scheduler.cache import ResponseCache

    log: list[str] = []
    model = FakeModel("m", sig("m", ["x"], ["y"]), FakeScheduler(log, "m"), ModelStats("m", 1))
    model.cache = ResponseCache(1 << 24).for_model("m", 1)  # type: ignore[attr-defined]
    n = MAX_STEPS
    chain = [step("m", {"x": "IN" if i == 0 else f"t{i}"}, {"y": f"t{i + 1}"}) for i in range(n)]
    config = cfg(io("input", "IN") + io("output", f"t{n}") + sched(*chain))
    ens = EnsembleScheduler(plan(config), lambda name, v: model, sig("ens", ["IN"], [f"t{n}"]))
    results: list[tuple[Any, Any]] = []

    def submit() -> None:
        item = WorkItem(inputs={"IN": np.zeros(4, np.float32)}, rows=1, outputs=(f"t{n}",))
        ens.submit(item, lambda out, err: results.append((out, err)))

    submit()
    while model.scheduler.pending:
        model.scheduler.complete(lambda i: {"y": i["x"] + 1})
    submit()
    assert len(results) == 2 and results[0][1] is None and results[1][1] is None
    np.testing.assert_array_equal(results[1][0][f"t{n}"], np.full(4, n, np.float32))
    assert log.count("start m") == n  # the second request ran nothing
    snap = model.stats.snapshot()
    assert (snap.cache_hit.count, snap.cache_miss.count, snap.success.count) == (n, n, 2 * n)
