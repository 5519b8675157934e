"""Peer: KServe's Python ModelServer with a small custom `kserve.Model` running ONNX Runtime.

This is KServe's own serving stack as a user deploys a custom predictor: its grpc.aio v2
servicer, its InferRequest/InferResponse types and its data plane, one process, one worker.
KServe's Python server has no dynamic batcher (batching lives in its Go agent sidecar), so each
request runs alone. Metadata comes from the spec so perf_analyzer can shape its requests; the
only addition is ModelConfig (common.add_model_config), which perf_analyzer asks for and
KServe's servicer does not define.

Usage (in the KServe venv): python kserve_server.py SPEC.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_config, load_spec, session  # noqa: E402

SPEC = load_spec()
add_model_config(SPEC)  # before kserve creates its grpc.aio server
sys.argv = sys.argv[:1]  # kserve parses the command line at import

import numpy as np  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402

DATATYPE = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}


class OrtModel(Model):
    """One ONNX model; predict() runs it with ONNX Runtime and returns raw outputs."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.spec = spec
        self.session = session(spec["onnx"])
        self.output_names = [o["name"] for o in spec["outputs"]]
        self.ready = True

    def _types(self, tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batch = [-1] if self.spec["max_batch_size"] > 0 else []
        return [
            {"name": t["name"], "datatype": t["datatype"], "shape": batch + t["dims"]}
            for t in tensors
        ]

    def get_input_types(self) -> list[dict[str, Any]]:
        return self._types(self.spec["inputs"])

    def get_output_types(self) -> list[dict[str, Any]]:
        return self._types(self.spec["outputs"])

    def predict(self, payload: InferRequest, headers: Any = None, **_: Any) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = []
        for name, value in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(value.shape), datatype=DATATYPE[value.dtype])
            out.set_data_from_numpy(value, binary_data=True)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=True,
        )


def main() -> int:
    models = [OrtModel(m) for m in SPEC["models"]]
    ModelServer(
        http_port=SPEC["http_port"], grpc_port=SPEC["grpc_port"], workers=1, enable_grpc=True
    ).start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
