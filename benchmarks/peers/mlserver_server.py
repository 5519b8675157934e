"""Peer: MLServer with a custom runtime running ONNX Runtime, adaptive batching on.

MLServer has no ONNX runtime of its own on the index (no `mlserver-onnx`), so the model is a
small `MLModel` (OrtRuntime below) as its docs describe for custom runtimes. Models that
Tributary batches get MLServer's adaptive batching with the same size and window
(`max_batch_size`, `max_batch_time`); the rest run per request. Everything else is MLServer's
defaults (one parallel inference worker process, its gRPC and REST servers), started through
its own `mlserver start` entry point. The only addition is ModelConfig
(common.add_model_config), which perf_analyzer asks for and MLServer's servicer does not define.

Usage (in the MLServer venv): python mlserver_server.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import add_model_config, load_spec, session  # noqa: E402


class OrtRuntime(MLModel):
    """One ONNX model; imported by name in MLServer's worker processes."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri  # type: ignore[union-attr]
        self._session = session(uri)
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )


def write_settings(spec: dict[str, Any], folder: Path) -> None:
    """settings.json and one model-settings.json per model, as `mlserver start` reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": spec["http_port"],
        "grpc_port": spec["grpc_port"],
        "metrics_port": spec["metrics_port"],
        "debug": False,
        "grpc_max_message_length": 2**31 - 1,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    for m in spec["models"]:
        batch = [-1] if m["max_batch_size"] > 0 else []
        model_dir = folder / m["name"]
        model_dir.mkdir(exist_ok=True)
        entry: dict[str, Any] = {
            "name": m["name"],
            "implementation": "mlserver_server.OrtRuntime",
            "parameters": {"uri": m["onnx"]},
            "inputs": [
                {"name": t["name"], "datatype": t["datatype"], "shape": batch + t["dims"]}
                for t in m["inputs"]
            ],
            "outputs": [
                {"name": t["name"], "datatype": t["datatype"], "shape": batch + t["dims"]}
                for t in m["outputs"]
            ],
        }
        if m["dynamic_batching"]:
            entry["max_batch_size"] = m["max_batch_size"]
            entry["max_batch_time"] = m["max_queue_delay_us"] / 1e6
        (model_dir / "model-settings.json").write_text(json.dumps(entry))


def main() -> int:
    spec_path = Path(sys.argv[1])
    spec = load_spec(spec_path)
    folder = spec_path.parent / "mlserver-models"
    write_settings(spec, folder)
    add_model_config(spec)
    from mlserver.cli.main import main as mlserver_main

    sys.argv = ["mlserver", "start", str(folder)]
    mlserver_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
