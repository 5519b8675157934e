"""What the peer servers share: the model spec run.py writes, and perf_analyzer's ModelConfig.

The peers run in their own virtual environments (benchmarks/work/peers/<name>/venv) with only
their own packages, numpy and onnxruntime, so nothing here imports Tributary or its protobufs.
run.py writes one JSON spec per run: for each model its ONNX file, max_batch_size, tensors and
batching window, and the path of a serialized ModelConfigResponse (built by run.py from the
model's config.pbtxt).

perf_analyzer (`-i grpc`, its Triton service kind) asks ModelConfig before measuring. Triton
answers it; KServe's and MLServer's gRPC services do not define it. `add_model_config` gives a
grpc.aio server one extra method that returns the stored bytes: metadata only, never on the
ModelInfer path being measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NUMPY_NAMES = {
    "FP32": "float32",
    "FP64": "float64",
    "FP16": "float16",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}
MODEL_CONFIG = "/inference.GRPCInferenceService/ModelConfig"


def load_spec(path: str | Path | None = None) -> dict[str, Any]:
    """The spec named on the command line (argv[1]) or by `path`."""
    return json.loads(Path(path or sys.argv[1]).read_text())


def session(onnx_path: str) -> Any:
    """One ONNX Runtime session with default options, as every server in the run uses."""
    import onnxruntime as ort

    return ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])


def _request_name(data: bytes) -> str:
    """Field 1 (name) of a ModelConfigRequest, read without the generated protobuf classes."""
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        length = shift = 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if key == 0x0A:
            return data[i : i + length].decode()
        i += length
    return ""


def add_model_config(spec: dict[str, Any]) -> None:
    """Make every grpc.aio server created from now on answer ModelConfig from the spec.

    Called before the peer imports its server, so its `grpc.aio.server(...)` gets the wrapper.
    """
    import grpc
    import grpc.aio

    blobs = {m["name"]: Path(m["config_response"]).read_bytes() for m in spec["models"]}

    async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = _request_name(request)
        if name not in blobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
        return blobs[name]

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(
                model_config,
                request_deserializer=lambda b: b,
                response_serializer=lambda b: b,
            )
        },
    )
    original = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Any:
        created = original(*args, **kwargs)
        created.add_generic_rpc_handlers((handler,))
        return created

    grpc.aio.server = server
