"""config.py: parsing, Triton's normalisation and auto-complete rules, validation, versions."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import text_format

from tributary import config as C
from tributary import config_check as CC
from tributary.backends.graph import GraphInfo, GraphTensor, read_graph
from tributary.datatypes import BY_NAME
from tributary.errors import InvalidArgument, ModelLoadError
from tributary_client._proto import model_config_pb2 as mc

CPU, GPU, AUTO = (
    mc.ModelInstanceGroup.KIND_CPU,
    mc.ModelInstanceGroup.KIND_GPU,
    mc.ModelInstanceGroup.KIND_AUTO,
)


def cfg(text: str = "") -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def tensor(name: str, dtype: str, *shape: int | None) -> GraphTensor:
    return GraphTensor(name, BY_NAME[dtype], tuple(shape))


def graph(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> GraphInfo:
    return GraphInfo(tuple(inputs), tuple(outputs))


BATCHED = graph(
    [tensor("IN", "INT32", None, 16)],
    [tensor("OUT", "FP32", None, 4), tensor("SCORE", "FP32", None)],
)


class Reader:
    """A graph_reader that records which files it was asked about."""

    def __init__(self, info: GraphInfo) -> None:
        self.info = info
        self.paths: list[Path] = []

    def __call__(self, path: Path) -> GraphInfo:
        self.paths.append(path)
        return self.info


def never(path: Path) -> GraphInfo:
    raise AssertionError(f"graph reader must not be called ({path})")


def model_dir(root: Path, name: str = "m", versions: Sequence[int] = (1,), text: str | None = None):
    d = root / name
    for v in versions:
        (d / str(v)).mkdir(parents=True)
        (d / str(v) / "model.onnx").write_bytes(b"")
    d.mkdir(exist_ok=True)
    if text is not None:
        (d / "config.pbtxt").write_text(text)
    return d


IO = """
input [ { name: "IN" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def norm(d: Path, text: str = IO, **kw) -> mc.ModelConfig:
    kw.setdefault("graph_reader", never)
    return C.normalize(cfg(text), d, **kw)


# -- parsing and loading -------------------------------------------------------------------------


def test_parse_config_error_names_source_and_parser_message() -> None:
    with pytest.raises(ModelLoadError) as err:
        C.parse_config('name: "x"\nbogus_field: 3\n', "/repo/x/config.pbtxt")
    assert "/repo/x/config.pbtxt" in err.value.message
    assert "bogus_field" in err.value.message
    assert C.parse_config("max_batch_size: 8", "s").max_batch_size == 8


def test_load_config_missing_file_is_empty(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    assert C.load_config(d) == mc.ModelConfig()


def test_load_config_custom_name_and_fallback(tmp_path: Path) -> None:
    d = model_dir(tmp_path, text="max_batch_size: 1")
    (d / "configs").mkdir()
    (d / "configs" / "big.pbtxt").write_text("max_batch_size: 32")
    assert C.load_config(d, config_name="big").max_batch_size == 32
    assert C.load_config(d, config_name="absent").max_batch_size == 1
    assert C.load_config(d).max_batch_size == 1


def test_load_config_override_replaces_file_and_is_copied(tmp_path: Path) -> None:
    d = model_dir(tmp_path, text="max_batch_size: 1\n" + IO)
    override = cfg("max_batch_size: 16")
    loaded = C.load_config(d, override=override)
    assert loaded.max_batch_size == 16 and not loaded.input
    loaded.max_batch_size = 2
    assert override.max_batch_size == 16


def test_load_config_bad_file(tmp_path: Path) -> None:
    d = model_dir(tmp_path, text="max_batch_size: banana")
    with pytest.raises(ModelLoadError, match="config.pbtxt"):
        C.load_config(d)


# -- versions ------------------------------------------------------------------------------------


def test_list_versions_numeric_only(tmp_path: Path) -> None:
    d = model_dir(tmp_path, versions=(1, 2, 10))
    for name in ("01", "0", "abc", "1a", ".5"):
        (d / name).mkdir()
    (d / "3").write_text("a file, not a version")
    assert C.list_versions(d) == [1, 2, 10]
    assert C.list_versions(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [10]),
        ("version_policy { latest { num_versions: 2 } }", [2, 10]),
        ("version_policy { latest { num_versions: 9 } }", [1, 2, 10]),
        ("version_policy { all { } }", [1, 2, 10]),
        ("version_policy { specific { versions: [1, 3, 10] } }", [1, 10]),
    ],
)
def test_select_versions(policy: str, expected: list[int]) -> None:
    assert C.select_versions(cfg(policy), [10, 1, 2]) == expected


def test_model_file_default_custom_and_directory(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    assert C.model_file(d, 1, mc.ModelConfig()) == d / "1" / "model.onnx"
    assert C.model_file(d, 1, cfg('default_model_filename: "net.onnx"')) == d / "1" / "net.onnx"
    (d / "2" / "model.onnx").mkdir(parents=True)
    assert C.model_file(d, 2, mc.ModelConfig()) == d / "2" / "model.onnx" / "model.onnx"


@pytest.mark.parametrize(("text", "expected"), [("", None), ("1", 1), ("17", 17), ("0", 0)])
def test_parse_version_valid(text: str, expected: int | None) -> None:
    assert C.parse_version(text, "simple") == expected


@pytest.mark.parametrize(
    "text", ["wrong_specification", "1.5", "x1", "1 2", " ", "99999999999999999999"]
)
def test_parse_version_not_integer(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        C.parse_version(text, "simple")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == (
        f"failed to get model version from specified version string '{text}' "
        "(details: stol), version should be an integral value > 0"
    )


def test_parse_version_negative() -> None:
    with pytest.raises(InvalidArgument) as err:
        C.parse_version("-1", "simple")
    assert err.value.message == (
        "invalid model version specified '-1' , version should be an integral value > 0"
    )


# -- normalisation (docs/model-config.md) ------------------------------------------------------


def test_normalize_defaults(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "simple")
    original = cfg("max_batch_size: 8\n" + IO)
    out = C.normalize(original, d, graph_reader=never)
    assert original == cfg("max_batch_size: 8\n" + IO), "input config must not be modified"
    assert out.name == "simple"
    assert (out.platform, out.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert out.default_model_filename == "model.onnx"
    assert out.version_policy.WhichOneof("policy_choice") == "latest"
    assert out.version_policy.latest.num_versions == 1
    assert len(out.instance_group) == 1
    group = out.instance_group[0]
    assert (group.name, group.kind, group.count, list(group.gpus)) == ("simple", CPU, 2, [])
    assert out.optimization.input_pinned_memory.enable is True
    assert out.optimization.output_pinned_memory.enable is True
    # inputs and outputs present: no backend auto-complete, so no batching added
    assert out.max_batch_size == 8
    assert out.WhichOneof("scheduling_choice") is None


def test_normalize_keeps_explicit_values(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m")
    out = norm(
        d,
        IO
        + """
        platform: "onnxruntime_onnx"
        default_model_filename: "net.onnx"
        version_policy { all { } }
        optimization { input_pinned_memory { enable: false } }
        """,
    )
    assert out.default_model_filename == "net.onnx"
    assert out.version_policy.WhichOneof("policy_choice") == "all"
    assert out.optimization.input_pinned_memory.enable is False
    assert out.optimization.output_pinned_memory.enable is True


def test_normalize_name_must_match_directory(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "simple")
    assert norm(d, 'name: "simple"' + IO).name == "simple"
    with pytest.raises(ModelLoadError, match="'other'.*'simple'"):
        norm(d, 'name: "other"' + IO)


@pytest.mark.parametrize("text", ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"', ""])
def test_normalize_platform_backend_fill_each_other(tmp_path: Path, text: str) -> None:
    out = norm(model_dir(tmp_path), text + IO)
    assert (out.platform, out.backend) == ("onnxruntime_onnx", "onnxruntime")


def test_normalize_without_platform_needs_model_file(tmp_path: Path) -> None:
    d = tmp_path / "m"
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.plan").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no platform or backend"):
        norm(d)


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ('backend: "python"', "python"),
        ('platform: "tensorflow_savedmodel"', "tensorflow_savedmodel"),
        ('platform: "onnxruntime_onnx" backend: "tensorrt"', "tensorrt"),
    ],
)
def test_normalize_rejects_other_backends(tmp_path: Path, text: str, word: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        norm(model_dir(tmp_path), text + IO)
    assert f"'{word}'" in err.value.message and "'m'" in err.value.message


def test_normalize_default_group_on_gpus(tmp_path: Path) -> None:
    out = norm(model_dir(tmp_path, "g"), gpu_count=2)
    [group] = out.instance_group
    assert (group.name, group.kind, group.count, list(group.gpus)) == ("g", GPU, 1, [0, 1])


def test_normalize_explicit_groups(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m")
    text = (
        IO
        + """
        instance_group [ { kind: KIND_AUTO }, { name: "mine" count: 3 kind: KIND_CPU },
                         { kind: KIND_CPU } ]
    """
    )
    out = norm(d, text)
    got = [(g.name, g.kind, g.count) for g in out.instance_group]
    assert got == [("m_0", CPU, 2), ("mine", CPU, 3), ("m_2", CPU, 2)]
    out = norm(d, text, gpu_count=1)
    assert (out.instance_group[0].kind, out.instance_group[0].count) == (GPU, 1)
    assert list(out.instance_group[0].gpus) == [0]


def test_normalize_gpu_group_errors(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m")
    with pytest.raises(ModelLoadError, match="instance group 'm_0' of model 'm'.*no GPUs"):
        norm(d, IO + "instance_group [ { kind: KIND_GPU } ]")
    with pytest.raises(ModelLoadError, match="gpu id 3"):
        norm(d, IO + "instance_group [ { kind: KIND_GPU gpus: [3] } ]", gpu_count=2)
    with pytest.raises(ModelLoadError, match="count >= 1"):
        norm(d, IO + "instance_group [ { count: -1 } ]")


def test_normalize_dynamic_batching_preferred_default(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    out = norm(d, "max_batch_size: 8 dynamic_batching { }" + IO)
    assert list(out.dynamic_batching.preferred_batch_size) == [8]
    out = norm(d, "max_batch_size: 8 dynamic_batching { preferred_batch_size: [2, 4] }" + IO)
    assert list(out.dynamic_batching.preferred_batch_size) == [2, 4]


def test_normalize_sequence_idle_default(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    out = norm(d, "max_batch_size: 8 sequence_batching { }" + IO)
    assert out.sequence_batching.max_sequence_idle_microseconds == 1_000_000
    out = norm(d, "sequence_batching { max_sequence_idle_microseconds: 5 }" + IO)
    assert out.sequence_batching.max_sequence_idle_microseconds == 5


def test_normalize_rejects_latest_zero(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'m'"):
        norm(model_dir(tmp_path), "version_policy { latest { } }" + IO)


def test_normalize_rejects_negative_max_batch_size(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'m'.*max_batch_size"):
        norm(model_dir(tmp_path), "max_batch_size: -1" + IO)


# -- auto-complete (docs/model-config.md) ------------------------------------------------------


def test_autocomplete_batchable_graph(tmp_path: Path) -> None:
    reader = Reader(BATCHED)
    out = C.normalize(cfg(), model_dir(tmp_path, "m", versions=(1, 2)), graph_reader=reader)
    assert reader.paths == [tmp_path / "m" / "2" / "model.onnx"], "first selected version"
    assert out.max_batch_size == 4
    assert list(out.dynamic_batching.preferred_batch_size) == [4]
    assert [(i.name, i.data_type, list(i.dims)) for i in out.input] == [("IN", mc.TYPE_INT32, [16])]
    out0, score = out.output
    assert (out0.name, out0.data_type, list(out0.dims)) == ("OUT", mc.TYPE_FP32, [4])
    assert not out0.HasField("reshape")
    # a [batch] output is a scalar per row: shown as [1], fed to the model as []
    assert (score.name, list(score.dims), score.HasField("reshape")) == ("SCORE", [1], True)
    assert list(score.reshape.shape) == []


def test_autocomplete_default_max_batch_size(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    out = C.normalize(cfg(), d, default_max_batch_size=16, graph_reader=Reader(BATCHED))
    assert out.max_batch_size == 16 and list(out.dynamic_batching.preferred_batch_size) == [16]
    out = C.normalize(cfg(), d, default_max_batch_size=1, graph_reader=Reader(BATCHED))
    assert out.max_batch_size == 1 and out.WhichOneof("scheduling_choice") is None
    # default 0 disables batching: full graph shapes, unknown dims as -1
    out = C.normalize(cfg(), d, default_max_batch_size=0, graph_reader=Reader(BATCHED))
    assert out.max_batch_size == 0
    assert list(out.input[0].dims) == [-1, 16]
    assert list(out.output[1].dims) == [-1] and not out.output[1].HasField("reshape")


def test_autocomplete_keeps_explicit_max_batch_and_scheduler(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    out = C.normalize(cfg("max_batch_size: 32"), d, graph_reader=Reader(BATCHED))
    assert out.max_batch_size == 32
    assert list(out.dynamic_batching.preferred_batch_size) == [32]
    out = C.normalize(cfg("sequence_batching { }"), d, graph_reader=Reader(BATCHED))
    assert out.WhichOneof("scheduling_choice") == "sequence_batching"


def test_autocomplete_not_batchable(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "fixed")
    info = graph([tensor("IN", "FP32", 3, None)], [tensor("OUT", "FP32"), tensor("V", "INT64", 2)])
    out = C.normalize(cfg(), d, graph_reader=Reader(info))
    assert out.max_batch_size == 0 and out.WhichOneof("scheduling_choice") is None
    assert list(out.input[0].dims) == [3, -1]
    # scalar without batching: dims [1] and no reshape
    assert list(out.output[0].dims) == [1] and not out.output[0].HasField("reshape")
    assert list(out.output[1].dims) == [2]
    # one batched tensor is not enough: every input and output needs a symbolic first dim
    mixed = graph([tensor("IN", "FP32", None, 4)], [tensor("OUT", "FP32", 1, 4)])
    assert C.normalize(cfg(), d, graph_reader=Reader(mixed)).max_batch_size == 0


def test_autocomplete_error_when_batching_impossible(tmp_path: Path) -> None:
    info = graph([tensor("IN", "FP32", 3)], [tensor("OUT", "FP32", 3)])
    with pytest.raises(ModelLoadError) as err:
        C.normalize(
            cfg("max_batch_size: 8"), model_dir(tmp_path, "fixed"), graph_reader=Reader(info)
        )
    assert err.value.message == (
        "autofill failed for model 'fixed': model does not support batching while non-zero "
        "max_batch_size is specified"
    )


def test_autocomplete_fills_only_missing_list(tmp_path: Path) -> None:
    text = 'max_batch_size: 2 input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]'
    out = C.normalize(cfg(text), model_dir(tmp_path), graph_reader=Reader(BATCHED))
    assert [list(i.dims) for i in out.input] == [[-1]], "existing inputs untouched"
    assert [o.name for o in out.output] == ["OUT", "SCORE"]
    assert out.HasField("dynamic_batching")


def test_autocomplete_skipped_when_complete_or_disabled(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    out = C.normalize(cfg(IO), d, graph_reader=never)
    assert out.max_batch_size == 0 and out.WhichOneof("scheduling_choice") is None
    out = C.normalize(cfg(), d, auto_complete=False, graph_reader=never)
    assert not out.input and not out.output and out.max_batch_size == 0
    assert out.instance_group[0].count == 2, "core normalisation still applies"


def test_autocomplete_needs_a_version(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m", versions=(1,))
    with pytest.raises(ModelLoadError, match="at least one version .* model 'm'"):
        C.normalize(
            cfg('platform: "onnxruntime_onnx" version_policy { specific { versions: [5] } }'),
            d,
            graph_reader=Reader(BATCHED),
        )


def test_autocomplete_with_real_onnx_graph(tmp_path: Path, bm) -> None:
    d = bm.build_simple(tmp_path, "auto", write_config=False)
    out = C.normalize(C.load_config(d), d)
    assert out.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims)) for t in out.input] == [
        ("INPUT0", mc.TYPE_INT32, [16]),
        ("INPUT1", mc.TYPE_INT32, [16]),
    ]
    assert [t.name for t in out.output] == ["OUTPUT0", "OUTPUT1"]
    C.validate(out, read_graph(C.model_file(d, 1, out)), d)


# -- validation ----------------------------------------------------------------------------------

SIMPLE_GRAPH = graph(
    [tensor("INPUT0", "INT32", None, 16), tensor("INPUT1", "INT32", None, 16)],
    [tensor("OUTPUT0", "INT32", None, 16), tensor("OUTPUT1", "INT32", None, 16)],
)


def simple_cfg(extra: str = "", *, dtype: str = "TYPE_INT32", dims: str = "[16]") -> mc.ModelConfig:
    return cfg(
        f"""name: "simple" max_batch_size: 8
        input [ {{ name: "INPUT0" data_type: {dtype} dims: {dims} }},
                {{ name: "INPUT1" data_type: TYPE_INT32 dims: [16] }} ]
        output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [16] }},
                 {{ name: "OUTPUT1" data_type: TYPE_INT32 dims: [16] }} ]
        {extra}"""
    )


def fails(config: mc.ModelConfig, info: GraphInfo = SIMPLE_GRAPH, model_dir: Path | None = None):
    with pytest.raises(ModelLoadError) as err:
        C.validate(config, info, model_dir)
    return err.value.message


def test_validate_accepts_matching_config() -> None:
    C.validate(simple_cfg(), SIMPLE_GRAPH)
    C.validate(simple_cfg("dynamic_batching { preferred_batch_size: [4, 8] }"), SIMPLE_GRAPH)


def test_validate_missing_input_and_output() -> None:
    config = simple_cfg()
    config.input[0].name = "X"
    assert fails(config).startswith(
        "unable to load model 'simple', configuration expects input 'X' which is not provided "
        "by the model"
    )
    config = simple_cfg()
    config.output[1].name = "Y"
    assert fails(config) == (
        "unable to load model 'simple', configuration expects output 'Y' which is not provided "
        "by the model"
    )


def test_validate_graph_input_missing_from_config() -> None:
    config = simple_cfg()
    del config.input[1]
    assert "'simple'" in (msg := fails(config)) and "'INPUT1'" in msg


def test_validate_outputs_may_be_a_subset() -> None:
    config = simple_cfg()
    del config.output[1]
    C.validate(config, SIMPLE_GRAPH)


def test_validate_datatype() -> None:
    assert fails(simple_cfg(dtype="TYPE_FP32")) == (
        "unable to load model 'simple', unexpected datatype TYPE_FP32 for input 'INPUT0', "
        "model provides TYPE_INT32"
    )
    assert "'INPUT0'" in fails(simple_cfg(dtype="TYPE_INVALID"))


@pytest.mark.parametrize("dims", ["[8]", "[16, 1]", "[-1]"])
def test_validate_dims_mismatch(dims: str) -> None:
    msg = fails(simple_cfg(dims=dims))
    assert "'simple'" in msg and "'INPUT0'" in msg and "[-1,16]" in msg


def test_validate_batch_dim_counts() -> None:
    config = simple_cfg()
    config.max_batch_size = 0  # dims [16] vs graph [?,16]: rank mismatch without a batch dim
    assert "[16]" in fails(config)
    config = simple_cfg()
    config.max_batch_size = -2
    assert "max_batch_size" in fails(config)
    fixed = graph([tensor("INPUT0", "INT32", 1, 16)], [])
    one = cfg(
        'name: "f" max_batch_size: 4 input [{name: "INPUT0" data_type: TYPE_INT32 dims: [16]}]'
    )
    assert "'INPUT0'" in fails(one, fixed)


def test_validate_symbolic_dims_match_anything() -> None:
    info = graph([tensor("IN", "FP32", None, None, 3)], [tensor("OUT", "FP32", None)])
    C.validate(
        cfg(
            'name: "v" max_batch_size: 2 input [{name: "IN" data_type: TYPE_FP32 dims: [-1, 3]}] '
            'output [{name: "OUT" data_type: TYPE_FP32 dims: [1] reshape { shape: [] }}]'
        ),
        info,
    )
    C.validate(
        cfg('name: "v" input [{name: "IN" data_type: TYPE_FP32 dims: [7, 5, 3]}]'),
        graph([tensor("IN", "FP32", None, None, 3)], []),
    )


@pytest.mark.parametrize("dims", ["[0]", "[16, -2]", "[]"])
def test_validate_bad_dims(dims: str) -> None:
    msg = fails(simple_cfg(dims=dims))
    assert "'simple'" in msg and "'INPUT0'" in msg


def test_validate_reshape() -> None:
    info = graph([tensor("IN", "FP32", None, 4, 4)], [])
    base = 'name: "r" max_batch_size: 2 input [{name: "IN" data_type: TYPE_FP32 dims: [16] '
    C.validate(cfg(base + "reshape { shape: [4, 4] } }]"), info)
    msg = fails(cfg(base + "reshape { shape: [4, 5] } }]"), info)
    assert "different size" in msg and "'IN'" in msg and "'r'" in msg
    assert "'IN'" in fails(cfg(base + "reshape { shape: [4, 0] } }]"), info)
    var = graph([tensor("IN", "FP32", None, None, 4)], [])
    base_var = 'name: "r" max_batch_size: 2 input [{name: "IN" data_type: TYPE_FP32 dims: [-1, 4] '
    C.validate(cfg(base_var + "reshape { shape: [-1, 4] } }]"), var)
    assert "different size" in fails(cfg(base_var + "reshape { shape: [2, 2] } }]"), var)


def test_validate_scalar_without_batching() -> None:
    info = graph([tensor("S", "FP32")], [])
    C.validate(cfg('name: "s" input [{name: "S" data_type: TYPE_FP32 dims: [1]}]'), info)
    bad = cfg('name: "s" input [{name: "S" data_type: TYPE_FP32 dims: [2]}]')
    assert "'S'" in fails(bad, info)


def test_validate_preferred_batch_size() -> None:
    msg = fails(simple_cfg("dynamic_batching { preferred_batch_size: [16] }"))
    assert "'simple'" in msg and "preferred" in msg


def test_validate_duplicate_tensor() -> None:
    config = simple_cfg()
    config.input[1].name = "INPUT0"
    assert "twice" in fails(config)


def test_validate_label_file(tmp_path: Path) -> None:
    config = simple_cfg()
    config.output[0].label_filename = "labels.txt"
    msg = fails(config, SIMPLE_GRAPH, tmp_path)
    assert "'simple'" in msg and "'OUTPUT0'" in msg and "labels.txt" in msg
    (tmp_path / "labels.txt").write_text("a\nb\n")
    C.validate(config, SIMPLE_GRAPH, tmp_path)


def test_validate_sequence_control_inputs() -> None:
    info = graph(
        [tensor("INPUT", "INT32", None, 1), tensor("START", "INT32", None, 1)],
        [tensor("OUTPUT", "INT32", None, 1)],
    )
    io = (
        'name: "seq" max_batch_size: 8 input [{name: "INPUT" data_type: TYPE_INT32 dims: [1]}] '
        'output [{name: "OUTPUT" data_type: TYPE_INT32 dims: [1]}] '
    )
    seq = (
        'sequence_batching { control_input [{ name: "START" control [{ kind: '
        "CONTROL_SEQUENCE_START %s: [0, 1] }] }] }"
    )
    C.validate(cfg(io + seq % "int32_false_true"), info)
    assert "'START'" in fails(cfg(io + seq % "fp32_false_true"), info)
    assert "'START'" in fails(cfg(io), info)  # not declared as a control: unfed graph input


def test_all_built_models_validate(tmp_path: Path, bm) -> None:
    for name in ("simple", "simple_int8", "simple_string", "simple_identity"):
        d = bm.BUILDERS[name](tmp_path)
        config = C.normalize(C.load_config(d), d)
        for v in C.versions_of(name, config, d):
            C.validate(config, read_graph(C.model_file(d, v, config)), d)


# -- signature -----------------------------------------------------------------------------------


def test_signature_simple(tmp_path: Path, bm) -> None:
    d = bm.build_simple(tmp_path)
    sig = C.signature(C.normalize(C.load_config(d), d), d)
    assert (sig.name, sig.platform, sig.max_batch_size, sig.batching) == (
        "simple",
        "onnxruntime_onnx",
        8,
        True,
    )
    assert [t.name for t in sig.inputs] == ["INPUT0", "INPUT1"]
    spec = sig.input("INPUT1")
    assert spec == C.TensorSpec("INPUT1", BY_NAME["INT32"], (16,), None)
    assert sig.input("OUTPUT0") is None and sig.output("OUTPUT0") is not None
    assert sig.output("nope") is None


def test_signature_reshape_labels_optional_and_backend_platform(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    config = cfg(
        'name: "c" backend: "onnxruntime" max_batch_size: 4 '
        'input [{name: "X" data_type: TYPE_FP32 dims: [3] optional: true}] '
        'output [{name: "L" data_type: TYPE_INT64 dims: [1] reshape { shape: [] }}, '
        '{name: "P" data_type: TYPE_FP32 dims: [2] label_filename: "labels.txt"}]'
    )
    sig = C.signature(config, tmp_path)
    assert sig.platform == "onnxruntime"
    assert sig.input("X").optional is True
    assert sig.output("L").reshape == () and sig.output("L").labels is None
    assert sig.output("P").labels == ("cat", "dog") and sig.output("P").reshape is None
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(ModelLoadError, match="labels.txt"):
        C.signature(config, tmp_path)


# -- paths a config names (security: a load override must not read host files) -----------------


def refused(model: str, field: str, value: str) -> str:
    return (
        f"unable to load model '{model}', {field} '{value}' must name a file inside the model "
        "directory"
    )


def labelled(label: str) -> mc.ModelConfig:
    config = cfg('output [{ name: "OUT" data_type: TYPE_FP32 dims: [4] }]')
    config.output[0].label_filename = label
    return config


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(C.RefusedConfig) as err:
        fn(*args, **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.message


@pytest.mark.parametrize(
    ("label", "shown"),
    [
        ("../../../../etc/passwd", "../../../../etc/passwd"),
        ("/etc/passwd", "/etc/passwd"),
        ("/proc/self/environ", "/proc/self/environ"),
        ("sub/../../x", "sub/../../x"),
        ("..", ".."),
        ("labels.txt\x00", "labels.txt\\x00"),
    ],
    ids=["dotdot", "absolute", "proc", "inner-dotdot", "parent", "nul"],
)
def test_label_filename_outside_model_dir_is_refused(
    tmp_path: Path, label: str, shown: str
) -> None:
    d = model_dir(tmp_path)
    (d / "labels.txt").write_text("a\n")
    config = labelled(label)
    out = config.output[0]
    assert refusal(C.check_paths, config, d) == refused("m", "label_filename", shown)
    assert refusal(CC.read_labels, "m", out, d) == refused("m", "label_filename", shown)


def test_label_symlink_inside_model_dir_works_configmap_style(tmp_path: Path) -> None:
    """Kubernetes mounts ConfigMaps as `f -> ..data/f`, `..data -> ..<timestamp>/`."""
    d = model_dir(tmp_path)
    (d / "..2024_01_01").mkdir()
    (d / "..2024_01_01" / "labels.txt").write_text("cat\ndog\n")
    (d / "..data").symlink_to("..2024_01_01")
    (d / "labels.txt").symlink_to("..data/labels.txt")
    C.check_paths(labelled("labels.txt"), d)
    assert CC.read_labels("m", labelled("labels.txt").output[0], d) == ("cat", "dog")
    (d / "1" / "up.txt").symlink_to("../labels.txt")  # a link through `..` that stays inside
    assert CC.read_labels("m", labelled("1/up.txt").output[0], d) == ("cat", "dog")


def test_label_symlink_escaping_model_dir_is_refused(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    (d / "labels.txt").symlink_to(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "labels.txt").write_text("x\n")
    (d / "sub").symlink_to(tmp_path / "outside")
    for label in ("labels.txt", "sub/labels.txt"):
        config = labelled(label)
        assert refusal(C.check_paths, config, d) == refused("m", "label_filename", label)
        with pytest.raises(C.RefusedConfig):
            CC.read_labels("m", config.output[0], d)


def test_oversize_label_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    with (d / "labels.txt").open("wb") as f:
        f.truncate(CC.MAX_LABEL_FILE_BYTES + 1)  # sparse: costs no disk or time
    msg = refusal(CC.read_labels, "m", labelled("labels.txt").output[0], d)
    assert msg == (
        "unable to load model 'm', label file 'labels.txt' for output 'OUT' is larger than the "
        f"{CC.MAX_LABEL_FILE_BYTES}-byte limit"
    )


def test_label_file_must_be_utf8_and_errors_name_no_server_path(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    (d / "labels.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    out = labelled("labels.txt").output[0]
    with pytest.raises(ModelLoadError) as err:
        CC.read_labels("m", out, d)
    assert err.value.message == (
        "unable to load model 'm', label file 'labels.txt' for output 'OUT' is not UTF-8 text "
        "(invalid byte at offset 3)"
    )
    (d / "labels.txt").unlink()
    with pytest.raises(ModelLoadError) as err:
        CC.read_labels("m", out, d)
    assert err.value.message == (
        "unable to load model 'm', failed to read label file 'labels.txt' for output 'OUT': "
        "No such file or directory"
    )
    assert str(tmp_path) not in err.value.message


def test_label_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    os.mkfifo(d / "labels.txt")
    result: list[BaseException | tuple] = []

    def read() -> None:
        try:
            result.append(CC.read_labels("m", labelled("labels.txt").output[0], d))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert result, "reading a FIFO label file blocked the load"
    assert isinstance(result[0], ModelLoadError)
    assert result[0].message.endswith(
        "label file 'labels.txt' for output 'OUT' is not a regular file"
    )


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../../1/model.onnx", "../model.onnx", "sub/../../model.onnx", "model\x00"],
    ids=["absolute", "dotdot", "sibling", "inner-dotdot", "nul"],
)
def test_default_model_filename_outside_is_refused(tmp_path: Path, name: str) -> None:
    d = model_dir(tmp_path)
    config = mc.ModelConfig(default_model_filename=name)
    expected = refused("m", "default_model_filename", name.replace("\x00", "\\x00"))
    assert refusal(C.model_file, d, 1, config) == expected
    assert refusal(C.check_paths, config, d) == expected
    # auto-complete never reads the graph of a refused file
    with pytest.raises(C.RefusedConfig):
        C.normalize(config, d, graph_reader=never)


def test_default_model_filename_symlinks(tmp_path: Path) -> None:
    d = model_dir(tmp_path, versions=(1, 2, 3))
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"")
    (d / "shared.onnx").write_bytes(b"")
    (d / "1" / "net.onnx").symlink_to("../shared.onnx")  # inside: fine
    (d / "2" / "net.onnx").symlink_to(outside)  # escapes: refused
    (d / "3" / "net.onnx").mkdir()  # a directory holding model.onnx, which escapes
    (d / "3" / "net.onnx" / "model.onnx").symlink_to(outside)
    config = mc.ModelConfig(default_model_filename="net.onnx")
    assert C.model_file(d, 1, config) == d / "1" / "net.onnx"
    assert refusal(C.model_file, d, 2, config) == refused("m", "default_model_filename", "net.onnx")
    assert refusal(C.model_file, d, 3, config) == refused(
        "m", "default_model_filename", "net.onnx/model.onnx"
    )
    config.version_policy.specific.versions.append(1)
    C.check_paths(config, d)  # only the versions the policy selects are checked
    config.version_policy.specific.versions.append(2)
    assert refusal(C.check_paths, config, d) == refused("m", "default_model_filename", "net.onnx")


def test_path_parameters_are_checked(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    trt = cfg(
        "optimization { execution_accelerators { gpu_execution_accelerator [ { name: "
        '"tensorrt" parameters { key: "trt_engine_cache_path" value: "/tmp/x" } } ] } }'
    )
    assert refusal(C.check_paths, trt, d) == refused("m", "trt_engine_cache_path", "/tmp/x")
    session = cfg(
        'parameters { key: "session.model_external_initializers_file_folder_path" '
        'value: { string_value: "../../x" } }'
    )
    assert refusal(C.check_paths, session, d) == refused(
        "m", "parameter 'session.model_external_initializers_file_folder_path'", "../../x"
    )
    ok = cfg('parameters { key: "session.intra_op.allow_spinning" value: { string_value: "1" } }')
    C.check_paths(ok, d)


@pytest.mark.parametrize("name", ["../../../etc/x", "a/b", "/etc/x", "x\x00", "..", "."])
def test_model_config_name_must_be_a_file_name(tmp_path: Path, name: str) -> None:
    d = model_dir(tmp_path, text="max_batch_size: 1")
    msg = refusal(C.load_config, d, config_name=name)
    assert msg.startswith("unable to load model 'm', model config name '")
    assert "must be a plain file name" in msg
    with pytest.raises(C.RefusedConfig):
        C.check_config_name(name)
    C.check_config_name("..big")  # `configs/..big.pbtxt` is a plain file name


def test_oversize_config_is_refused_and_messages_are_repository_relative(tmp_path: Path) -> None:
    d = model_dir(tmp_path, text="max_batch_size: 1")
    with (d / "config.pbtxt").open("wb") as f:
        f.truncate(C.MAX_CONFIG_FILE_BYTES + 1)
    assert refusal(C.load_config, d) == (
        "unable to load model 'm', model config 'm/config.pbtxt' is larger than the "
        f"{C.MAX_CONFIG_FILE_BYTES}-byte limit"
    )
    (d / "config.pbtxt").write_text("max_batch_size: banana")
    with pytest.raises(ModelLoadError) as err:
        C.load_config(d)
    assert err.value.message.startswith("failed to read text proto from m/config.pbtxt: ")
    assert str(tmp_path) not in err.value.message
    (d / "configs").mkdir()
    (d / "configs" / "big.pbtxt").write_bytes(b"\xff")
    with pytest.raises(ModelLoadError, match="model config 'm/configs/big.pbtxt' is not UTF-8"):
        C.load_config(d, config_name="big")


def test_repository_relative(tmp_path: Path) -> None:
    root = tmp_path / "models"
    d = root / "simple"
    d.mkdir(parents=True)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    text = (
        f"Load model from {d}/1/model.onnx failed; {root}/simple_int8/1/model.onnx; "
        f"repository {root}; model {d}"
    )
    assert CC.repository_relative(text, d, [root]) == (
        "Load model from simple/1/model.onnx failed; simple_int8/1/model.onnx; "
        "repository <model repository>; model simple"
    )
    linked = root / "linked"
    real = tmp_path / "elsewhere"
    real.mkdir()
    assert CC.repository_relative(f"x {real}/1/model.onnx", linked, [root]) == (
        "x linked/1/model.onnx"
    )
