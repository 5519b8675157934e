"""Build the example model repository from source, deterministically and offline.

The `.onnx` files in `model_repository/` are generated, never hand-edited: rerunning this
script must reproduce them byte for byte (fixed seeds, no timestamps). Tests import the
`build_*` functions to create small repositories in temporary directories, so every builder
takes the destination root and a model name and returns the model directory.

    python scripts/build_models.py [--out DIR] [--only NAME ...]

`mlp` (about 15 MB of weights) is only built when asked for with `--only mlp`; it exists for
benchmarks and is not committed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
IR_VERSION = 10
ROOT = Path(__file__).resolve().parent.parent

# config name -> (ONNX element type, config DataType name)
_TYPES: dict[str, tuple[int, str]] = {
    "INT32": (TensorProto.INT32, "TYPE_INT32"),
    "INT8": (TensorProto.INT8, "TYPE_INT8"),
    "STRING": (TensorProto.STRING, "TYPE_STRING"),
    "FP32": (TensorProto.FLOAT, "TYPE_FP32"),
    "INT64": (TensorProto.INT64, "TYPE_INT64"),
}


def make_model(graph: onnx.GraphProto, *, opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """Wrap a graph with the opset/IR pair the examples promise and check it."""
    imports = [helper.make_opsetid(domain, v) for domain, v in (opsets or {"": OPSET}).items()]
    model = helper.make_model(graph, opset_imports=imports, producer_name="tributary")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def write_model(
    out: Path,
    name: str,
    onnx_model: onnx.ModelProto | None,
    config_text: str | None,
    labels: Sequence[str] | None = None,
    *,
    versions: Sequence[int] = (1,),
    label_file: str = "labels.txt",
) -> Path:
    """Lay out `<out>/<name>/{config.pbtxt,<v>/model.onnx,labels}`; None skips a file."""
    model_dir = Path(out) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if config_text is not None:
        (model_dir / "config.pbtxt").write_text(config_text)
    if onnx_model is not None:
        data = onnx_model.SerializeToString(deterministic=True)
        for version in versions:
            (model_dir / str(version)).mkdir(exist_ok=True)
            (model_dir / str(version) / "model.onnx").write_bytes(data)
    if labels is not None:
        (model_dir / label_file).write_text("".join(f"{line}\n" for line in labels))
    return model_dir


def _io(name: str, elem: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def simple_graph(dtype: str = "INT32", *, batch: bool = True) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 over [N,16], computed in int32."""
    elem = _TYPES[dtype][0]
    shape: list[int | str] = ["N", 16] if batch else [16]
    nodes: list[onnx.NodeProto] = []
    a, b = "INPUT0", "INPUT1"
    if elem != TensorProto.INT32:
        # int8 wraps on overflow and strings carry decimal text: do the arithmetic in int32.
        nodes += [
            helper.make_node("Cast", ["INPUT0"], ["in0_i32"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["in1_i32"], to=TensorProto.INT32),
        ]
        a, b = "in0_i32", "in1_i32"
        nodes += [
            helper.make_node("Add", [a, b], ["sum_i32"]),
            helper.make_node("Sub", [a, b], ["diff_i32"]),
            helper.make_node("Cast", ["sum_i32"], ["OUTPUT0"], to=elem),
            helper.make_node("Cast", ["diff_i32"], ["OUTPUT1"], to=elem),
        ]
    else:
        nodes += [
            helper.make_node("Add", [a, b], ["OUTPUT0"]),
            helper.make_node("Sub", [a, b], ["OUTPUT1"]),
        ]
    graph = helper.make_graph(
        nodes,
        f"simple_{dtype.lower()}",
        [_io("INPUT0", elem, shape), _io("INPUT1", elem, shape)],
        [_io("OUTPUT0", elem, shape), _io("OUTPUT1", elem, shape)],
    )
    return make_model(graph)


def _tensors(kind: str, names: Sequence[str], type_name: str, dims: str) -> str:
    body = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {type_name}\n    dims: [ {dims} ]\n  }}'
        for n in names
    )
    return f"{kind} [\n{body}\n]\n"


def simple_config(name: str, dtype: str = "INT32", max_batch_size: int = 8) -> str:
    type_name = _TYPES[dtype][1]
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        + _tensors("input", ["INPUT0", "INPUT1"], type_name, "16")
        + _tensors("output", ["OUTPUT0", "OUTPUT1"], type_name, "16")
    )


def build_simple(
    out: Path,
    name: str = "simple",
    dtype: str = "INT32",
    *,
    max_batch_size: int = 8,
    config: str | None = None,
    write_config: bool = True,
    versions: Sequence[int] = (1,),
) -> Path:
    """The `simple` family (INT32, INT8 or STRING); `config` replaces the default text."""
    text = config if config is not None else simple_config(name, dtype, max_batch_size)
    graph = simple_graph(dtype, batch=max_batch_size > 0)
    return write_model(out, name, graph, text if write_config else None, versions=versions)


def identity_graph(
    dtype: str = "STRING", shape: Sequence[int | str | None] = ("N", "D")
) -> onnx.ModelProto:
    elem = _TYPES[dtype][0]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        f"identity_{dtype.lower()}",
        [_io("INPUT0", elem, shape)],
        [_io("OUTPUT0", elem, shape)],
    )
    return make_model(graph)


def build_identity(
    out: Path,
    name: str = "simple_identity",
    dtype: str = "STRING",
    *,
    max_batch_size: int = 8,
    config: str | None = None,
    write_config: bool = True,
    versions: Sequence[int] = (1,),
) -> Path:
    """OUTPUT0 = INPUT0 with a variable trailing dim (ONNX stand-in for Triton's Python model)."""
    type_name = _TYPES[dtype][1]
    if config is None:
        config = (
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            + _tensors("input", ["INPUT0"], type_name, "-1")
            + _tensors("output", ["OUTPUT0"], type_name, "-1")
        )
    shape: tuple[int | str, ...] = ("N", "D") if max_batch_size > 0 else ("D",)
    graph = identity_graph(dtype, shape)
    return write_model(out, name, graph, config if write_config else None, versions=versions)


def train_digits() -> tuple[object, np.ndarray, np.ndarray]:
    """Fit the digits classifier; returned with the data so tests can compare predictions."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=5000, random_state=0)
    clf.fit(x, y)
    return clf, x, y


DIGITS_CONFIG = """\
# Built by scripts/build_models.py: scikit-learn LogisticRegression(max_iter=5000,
# random_state=0) fitted on sklearn.datasets.load_digits (8x8 images flattened to 64 FP32
# pixel values in 0..16), converted with skl2onnx (zipmap disabled).
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }}
]
output [
  {{
    name: "label"
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape {{ shape: [ ] }}
  }},
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{ }}
"""

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_graph(clf: object) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = convert_sklearn(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    # skl2onnx lists the default domain twice when given a dict of opsets; keep one of each.
    opsets = {o.domain: o.version for o in model.opset_import}
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    model.ir_version = IR_VERSION
    model.producer_version = ""  # keep the file independent of the installed skl2onnx
    model.graph.name = "digits"
    onnx.checker.check_model(model, full_check=True)
    return model


DIGITS_EXPECTED = "expected_outputs.npz"
"""Beside the digits model: its inputs and what scikit-learn predicted for them when the model
was built. The tests compare the served model with these, not with a model refitted by
whatever scikit-learn is installed (another version fits slightly different weights)."""


def write_digits_expected(model_dir: Path, clf: object, x: np.ndarray) -> Path:
    path = Path(model_dir) / DIGITS_EXPECTED
    with path.open("wb") as f:  # np.savez would add its own suffix to a str path
        np.savez_compressed(
            f,
            input=x.astype(np.uint8),  # pixel values 0..16: exact in uint8
            label=clf.predict(x).astype(np.int64),  # type: ignore[attr-defined]
            probabilities=clf.predict_proba(x).astype(np.float32),  # type: ignore[attr-defined]
        )
    return path


def build_digits(out: Path, name: str = "digits", *, versions: Sequence[int] = (1,)) -> Path:
    clf, x, _ = train_digits()
    model_dir = write_model(
        out,
        name,
        digits_graph(clf),
        DIGITS_CONFIG.format(name=name),
        DIGIT_NAMES,
        versions=versions,
    )
    write_digits_expected(model_dir, clf, x)
    return model_dir


# -- the digits pipeline: an ensemble of preprocessing -> digits -> top-k -----------------------

PIXEL_SCALE = 16.0 / 255.0
"""8-bit grayscale (0..255) to the 0..16 scale the digits model was fitted on."""
TOPK = 3


def digits_pre_graph() -> onnx.ModelProto:
    """input = float32(pixels) * (16/255): raw UINT8 pixels [N,64] -> FP32 [N,64]."""
    scale = numpy_helper.from_array(np.array(PIXEL_SCALE, dtype=np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["as_float", "scale"], ["input"]),
        ],
        "digits_pre",
        [_io("pixels", TensorProto.UINT8, ["N", 64])],
        [_io("input", TensorProto.FLOAT, ["N", 64])],
        initializer=[scale],
    )
    return make_model(graph)


def digits_topk_graph() -> onnx.ModelProto:
    """The TOPK most probable classes of [N,10] probabilities: scores (FP32) and labels (INT64),
    largest first (ties: the lower label first, ONNX TopK's rule)."""
    k = numpy_helper.from_array(np.array([TOPK], dtype=np.int64), "k")
    graph = helper.make_graph(
        [helper.make_node("TopK", ["probabilities", "k"], ["scores", "labels"], axis=-1)],
        "digits_topk",
        [_io("probabilities", TensorProto.FLOAT, ["N", 10])],
        [
            _io("scores", TensorProto.FLOAT, ["N", TOPK]),
            _io("labels", TensorProto.INT64, ["N", TOPK]),
        ],
        initializer=[k],
    )
    return make_model(graph)


DIGITS_PRE_CONFIG = """\
# Built by scripts/build_models.py: 8-bit grayscale pixels (0..255) scaled to the 0..16 range
# the digits model was fitted on (input = float32(pixels) * 16/255). First step of
# digits_pipeline.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{
    name: "pixels"
    data_type: TYPE_UINT8
    dims: [ 64 ]
  }}
]
output [
  {{
    name: "input"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }}
]
dynamic_batching {{ }}
"""

DIGITS_TOPK_CONFIG = """\
# Built by scripts/build_models.py: the {k} most probable digits of a probability vector
# (ONNX TopK). Last step of digits_pipeline.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{
    name: "probabilities"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }}
]
output [
  {{
    name: "scores"
    data_type: TYPE_FP32
    dims: [ {k} ]
  }},
  {{
    name: "labels"
    data_type: TYPE_INT64
    dims: [ {k} ]
  }}
]
dynamic_batching {{ }}
"""

PIPELINE_CONFIG = """\
# An ensemble (no model file; the version directory only has to exist): raw 8-bit pixels ->
# {pre} (scale to 0..16) -> {digits} (classify) -> {topk} (best {k}). Written by
# scripts/build_models.py.
name: "{name}"
platform: "ensemble"
max_batch_size: 64
input [
  {{
    name: "PIXELS"
    data_type: TYPE_UINT8
    dims: [ 64 ]
  }}
]
output [
  {{
    name: "LABEL"
    data_type: TYPE_INT64
    dims: [ 1 ]
  }},
  {{
    name: "PROBABILITIES"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }},
  {{
    name: "TOP_SCORES"
    data_type: TYPE_FP32
    dims: [ {k} ]
  }},
  {{
    name: "TOP_LABELS"
    data_type: TYPE_INT64
    dims: [ {k} ]
  }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{pre}"
      model_version: -1
      input_map {{ key: "pixels" value: "PIXELS" }}
      output_map {{ key: "input" value: "normalized" }}
    }},
    {{
      model_name: "{digits}"
      model_version: -1
      input_map {{ key: "input" value: "normalized" }}
      output_map {{ key: "label" value: "LABEL" }}
      output_map {{ key: "probabilities" value: "PROBABILITIES" }}
    }},
    {{
      model_name: "{topk}"
      model_version: -1
      input_map {{ key: "probabilities" value: "PROBABILITIES" }}
      output_map {{ key: "scores" value: "TOP_SCORES" }}
      output_map {{ key: "labels" value: "TOP_LABELS" }}
    }}
  ]
}}
"""


def build_digits_pre(out: Path, name: str = "digits_pre") -> Path:
    return write_model(out, name, digits_pre_graph(), DIGITS_PRE_CONFIG.format(name=name))


def build_digits_topk(out: Path, name: str = "digits_topk") -> Path:
    return write_model(out, name, digits_topk_graph(), DIGITS_TOPK_CONFIG.format(name=name, k=TOPK))


def build_pipeline(
    out: Path,
    name: str = "digits_pipeline",
    *,
    pre: str = "digits_pre",
    digits: str = "digits",
    topk: str = "digits_topk",
) -> Path:
    """The ensemble's directory: config.pbtxt and an empty version directory (kept in git by
    a .gitkeep, which the repository ignores: only numeric directories are versions)."""
    text = PIPELINE_CONFIG.format(name=name, pre=pre, digits=digits, topk=topk, k=TOPK)
    model_dir = write_model(out, name, None, text)
    (model_dir / "1").mkdir(exist_ok=True)
    (model_dir / "1" / ".gitkeep").write_text("")
    return model_dir


MLP_WIDTH = 1024
MLP_LAYERS = 4


def mlp_graph(seed: int = 0) -> onnx.ModelProto:
    """FP32 [N,512] -> 4 x (Gemm 1024 + Relu) -> Gemm 10: a compute-bound benchmark model."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    prev, width = "INPUT0", 512
    for i in range(MLP_LAYERS + 1):
        last = i == MLP_LAYERS
        n_out = 10 if last else MLP_WIDTH
        # He initialisation keeps activations in a sane range through the ReLU stack.
        w = rng.normal(0.0, np.sqrt(2.0 / width), (width, n_out)).astype(np.float32)
        b = np.zeros(n_out, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        gemm_out = "OUTPUT0" if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"]))
            prev = f"relu{i}"
        width = n_out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_io("INPUT0", TensorProto.FLOAT, ["N", 512])],
        [_io("OUTPUT0", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    return make_model(graph)


MLP_CONFIG = """\
# Built by scripts/build_models.py (fixed-seed random weights); not committed, benchmark only.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 512 ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
"""


def build_mlp(out: Path, name: str = "mlp") -> Path:
    return write_model(out, name, mlp_graph(), MLP_CONFIG.format(name=name))


def _seq_io(name: str, elem: int = TensorProto.INT32, width: int = 1) -> onnx.ValueInfoProto:
    return _io(name, elem, ["N", width])


def sequence_graph(*, dyna: bool) -> onnx.ModelProto:
    """The shape Triton's sequence example clients expect of `simple_sequence` (dyna False):
    OUTPUT = (INPUT + START) * READY, and of `simple_dyna_sequence` (dyna True):
    OUTPUT = (INPUT + START + END * CORRID) * READY, CORRID (UINT64) narrowed to INT32."""
    nodes = [helper.make_node("Add", ["INPUT", "START"], ["with_start"])]
    inputs = [_seq_io("INPUT"), _seq_io("START"), _seq_io("READY")]
    last = "with_start"
    if dyna:
        inputs += [_seq_io("END"), _seq_io("CORRID", TensorProto.UINT64)]
        nodes += [
            helper.make_node("Cast", ["CORRID"], ["corrid_i32"], to=TensorProto.INT32),
            helper.make_node("Mul", ["END", "corrid_i32"], ["end_corrid"]),
            helper.make_node("Add", ["with_start", "end_corrid"], ["with_end"]),
        ]
        last = "with_end"
    nodes.append(helper.make_node("Mul", [last, "READY"], ["OUTPUT"]))
    graph = helper.make_graph(
        nodes, "dyna_sequence" if dyna else "sequence", inputs, [_seq_io("OUTPUT")]
    )
    return make_model(graph)


def _control(name: str, kind: str, extra: str = "int32_false_true: [ 0, 1 ]") -> str:
    return (
        f'    {{\n      name: "{name}"\n      control [\n        {{\n'
        f"          kind: CONTROL_SEQUENCE_{kind}\n          {extra}\n        }}\n      ]\n    }}"
    )


def sequence_config(name: str, *, dyna: bool) -> str:
    controls = [_control("START", "START")]
    if dyna:
        controls.append(_control("END", "END"))
    controls.append(_control("READY", "READY"))
    if dyna:
        controls.append(_control("CORRID", "CORRID", "data_type: TYPE_UINT64"))
    strategy = (
        "  max_sequence_idle_microseconds: 10000000\n"
        "  oldest {\n    max_candidate_sequences: 1024\n"
        "    max_queue_delay_microseconds: 10000\n  }\n"
        if dyna
        else ""
    )
    return (
        f"# Built by scripts/build_models.py: the model Triton's sequence example clients call"
        f" {name}.\n"
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        + "sequence_batching {\n"
        + strategy
        + "  control_input [\n"
        + ",\n".join(controls)
        + "\n  ]\n}\n"
        + _tensors("input", ["INPUT"], "TYPE_INT32", "1")
        + _tensors("output", ["OUTPUT"], "TYPE_INT32", "1")
        + f"instance_group [\n  {{\n    count: {2 if dyna else 1}\n    kind: KIND_CPU\n  }}\n]\n"
    )


def build_sequence(out: Path, name: str = "simple_sequence", *, dyna: bool = False) -> Path:
    return write_model(out, name, sequence_graph(dyna=dyna), sequence_config(name, dyna=dyna))


STRING_DYNA_STATE = """\
  state [
    {
      input_name: "ACC_IN"
      output_name: "ACC_OUT"
      data_type: TYPE_INT32
      dims: [ 1 ]
      initial_state {
        name: "zero"
        data_type: TYPE_INT32
        dims: [ 1 ]
        zero_data: true
      }
    }
  ]
"""


def string_dyna_graph() -> onnx.ModelProto:
    """`simple_string_dyna_sequence`, as Triton's examples expect it with `--dyna`: a running
    sum (implicit state ACC_IN/ACC_OUT, reset at START) plus, on the END request, the string
    CORRID read as a number (IDs that are not a 1-9 digit integer count as 0)."""
    zero = helper.make_tensor("zero_text", TensorProto.STRING, [], [b"0"])
    nodes = [
        helper.make_node("Add", ["ACC_IN", "INPUT"], ["ACC_OUT"]),
        helper.make_node("RegexFullMatch", ["CORRID"], ["numeric"], pattern="-?[0-9]{1,9}"),
        helper.make_node("Where", ["numeric", "CORRID", "zero_text"], ["corrid_text"]),
        helper.make_node("Cast", ["corrid_text"], ["corrid_i32"], to=TensorProto.INT32),
        helper.make_node("Mul", ["END", "corrid_i32"], ["end_corrid"]),
        helper.make_node("Add", ["ACC_OUT", "end_corrid"], ["with_end"]),
        helper.make_node("Mul", ["with_end", "READY"], ["OUTPUT"]),
    ]
    inputs = [_seq_io("INPUT"), _seq_io("START"), _seq_io("END"), _seq_io("READY")]
    inputs += [_seq_io("CORRID", TensorProto.STRING), _seq_io("ACC_IN")]
    graph = helper.make_graph(
        nodes,
        "string_dyna_sequence",
        inputs,
        [_seq_io("OUTPUT"), _seq_io("ACC_OUT")],
        initializer=[zero],
    )
    return make_model(graph)


def build_string_dyna(out: Path, name: str = "simple_string_dyna_sequence") -> Path:
    text = sequence_config(name, dyna=True).replace(
        "data_type: TYPE_UINT64", "data_type: TYPE_STRING"
    )
    text = text.replace("  control_input [", STRING_DYNA_STATE + "  control_input [", 1)
    return write_model(out, name, string_dyna_graph(), text)


ACCUMULATOR_CONFIG = """\
# Built by scripts/build_models.py: a running sum kept by the server as implicit state.
# OUTPUT = ACC_IN + INPUT and ACC_OUT = OUTPUT; the server feeds ACC_OUT back as ACC_IN on the
# sequence's next request (zeros at START), so clients send only INPUT.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: 5000000
  state [
    {{
      input_name: "ACC_IN"
      output_name: "ACC_OUT"
      data_type: TYPE_INT32
      dims: [ 1 ]
      initial_state {{
        name: "zero"
        data_type: TYPE_INT32
        dims: [ 1 ]
        zero_data: true
      }}
    }}
  ]
}}
input [
  {{
    name: "INPUT"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }}
]
output [
  {{
    name: "OUTPUT"
    data_type: TYPE_INT32
    dims: [ 1 ]
  }}
]
"""


def accumulator_graph() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ACC_IN", "INPUT"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"]),
        ],
        "accumulator",
        [_seq_io("INPUT"), _seq_io("ACC_IN")],
        [_seq_io("OUTPUT"), _seq_io("ACC_OUT")],
    )
    return make_model(graph)


def build_accumulator(out: Path, name: str = "accumulator", *, config: str | None = None) -> Path:
    text = config if config is not None else ACCUMULATOR_CONFIG.format(name=name)
    return write_model(out, name, accumulator_graph(), text)


GRU_INPUT = 4
GRU_HIDDEN = 8
GRU_CONFIG = """\
# Built by scripts/build_models.py: one step of a GRU (ONNX GRU op, fixed-seed weights) with
# its hidden state as explicit tensors H_IN/H_OUT, which the server keeps per sequence as
# implicit state. Y is the new hidden state.
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {{
  state [
    {{
      input_name: "H_IN"
      output_name: "H_OUT"
      data_type: TYPE_FP32
      dims: [ {hidden} ]
      initial_state {{
        name: "zero"
        data_type: TYPE_FP32
        dims: [ {hidden} ]
        zero_data: true
      }}
    }}
  ]
}}
input [
  {{
    name: "X"
    data_type: TYPE_FP32
    dims: [ {width} ]
  }}
]
output [
  {{
    name: "Y"
    data_type: TYPE_FP32
    dims: [ {hidden} ]
  }}
]
"""


def gru_graph(seed: int = 0) -> onnx.ModelProto:
    """X [N,I], H_IN [N,H] -> one GRU step -> H_OUT [N,H] (= Y). Weights W [1,3H,I],
    R [1,3H,H], B [1,6H] in ONNX's gate order z, r, h."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 0.5, (1, 3 * GRU_HIDDEN, GRU_INPUT)).astype(np.float32)
    r = rng.normal(0.0, 0.5, (1, 3 * GRU_HIDDEN, GRU_HIDDEN)).astype(np.float32)
    b = rng.normal(0.0, 0.1, (1, 6 * GRU_HIDDEN)).astype(np.float32)
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")
    nodes = [
        helper.make_node("Unsqueeze", ["X", "axis0"], ["x_seq"]),  # [1,N,I]
        helper.make_node("Unsqueeze", ["H_IN", "axis0"], ["h0"]),  # [1,N,H]
        helper.make_node(
            "GRU", ["x_seq", "W", "R", "B", "", "h0"], ["", "h_last"], hidden_size=GRU_HIDDEN
        ),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["H_OUT"]),
        helper.make_node("Identity", ["H_OUT"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gru_cell",
        [
            _seq_io("X", TensorProto.FLOAT, GRU_INPUT),
            _seq_io("H_IN", TensorProto.FLOAT, GRU_HIDDEN),
        ],
        [
            _seq_io("Y", TensorProto.FLOAT, GRU_HIDDEN),
            _seq_io("H_OUT", TensorProto.FLOAT, GRU_HIDDEN),
        ],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(r, "R"),
            numpy_helper.from_array(b, "B"),
            axes,
        ],
    )
    return make_model(graph)


def build_gru(out: Path, name: str = "gru_cell") -> Path:
    config = GRU_CONFIG.format(name=name, hidden=GRU_HIDDEN, width=GRU_INPUT)
    return write_model(out, name, gru_graph(), config)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "simple": lambda out: build_simple(out, "simple", "INT32"),
    "simple_int8": lambda out: build_simple(out, "simple_int8", "INT8"),
    "simple_string": lambda out: build_simple(out, "simple_string", "STRING"),
    "simple_identity": lambda out: build_identity(out, "simple_identity", "STRING"),
    "digits": lambda out: build_digits(out, "digits"),
    "simple_sequence": lambda out: build_sequence(out, "simple_sequence"),
    "simple_dyna_sequence": lambda out: build_sequence(out, "simple_dyna_sequence", dyna=True),
    "simple_string_dyna_sequence": lambda out: build_string_dyna(out),
    "accumulator": lambda out: build_accumulator(out, "accumulator"),
    "gru_cell": lambda out: build_gru(out, "gru_cell"),
    "digits_pre": lambda out: build_digits_pre(out),
    "digits_topk": lambda out: build_digits_topk(out),
    "digits_pipeline": lambda out: build_pipeline(out),
    "mlp": lambda out: build_mlp(out, "mlp"),
}
DEFAULT_MODELS = [name for name in BUILDERS if name != "mlp"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BUILDERS),
        help=f"models to build (default: {' '.join(DEFAULT_MODELS)}; mlp only on request)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or DEFAULT_MODELS:
        path = BUILDERS[name](args.out)
        print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
