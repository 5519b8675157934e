"""The inline server: the echo floor's server, but ModelInfer runs the model on the gRPC thread.

Each request's raw inputs become numpy arrays, `onnxruntime.InferenceSession.run` runs on the
worker thread that received it, and the outputs go back as raw contents: no batching, no
validation, no queue, no statistics. This is what a 40-line Python server gets, and the
comparison point for whether Tributary's batching and checks pay for themselves. Same 16-thread
sync grpcio server and plumbing as echo_server.py (mini_server.py); one session per model with
ONNX Runtime's default options, shared by all threads (its run() is thread-safe).

Usage: python benchmarks/inline_server.py REPO_OR_MODEL_DIR PORT_FILE [--workers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_server import NUMPY, MiniServicer, Model, serve  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402


class Inline(MiniServicer):
    def __init__(self, models: dict[str, Model]) -> None:
        super().__init__(models)
        self.sessions = {
            name: ort.InferenceSession(
                str(m.dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
            for name, m in models.items()
        }
        self.dtypes = {
            name: {t.name: NUMPY[t.datatype] for t in m.metadata.inputs}
            for name, m in models.items()
        }
        self.outputs = {
            name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()
        }

    def ModelInfer(self, request, context):  # noqa: N802 - gRPC method names
        name = self.model(request.model_name, context).config.name
        self.count(name)
        dtypes = self.dtypes[name]
        feeds = {
            t.name: np.frombuffer(raw, dtype=dtypes[t.name]).reshape(t.shape)
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        names = [o.name for o in request.outputs] or self.outputs[name]
        outputs = self.sessions[name].run(names, feeds)
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for out, value in zip(names, outputs, strict=True):
            response.outputs.add(name=out, datatype=_DATATYPE[value.dtype.type], shape=value.shape)
            response.raw_output_contents.append(value.tobytes())
        return response


_DATATYPE = {v: k for k, v in NUMPY.items()}

if __name__ == "__main__":
    sys.exit(serve(Inline, __doc__.splitlines()[0]))
