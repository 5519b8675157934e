"""The floor: a minimal Python gRPC server that answers ModelInfer without running a model.

It returns a zero-filled response of the right output shape (batch rows kept; the zeros are
built once per size), so its infer/s is what Python gRPC itself can do on this machine with a
16-thread sync server and Tributary's message limits; Tributary's and the inline server's numbers
are reported against it. The plumbing (metadata, config, serving) is shared with
inline_server.py in mini_server.py.

Usage: python benchmarks/echo_server.py REPO_OR_MODEL_DIR PORT_FILE [--workers N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_server import NUMPY, MiniServicer, Model, serve  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402


class Echo(MiniServicer):
    def __init__(self, models: dict[str, Model]) -> None:
        super().__init__(models)
        self._zeros: dict[int, bytes] = {}  # one zero buffer per size, built once

    def zeros(self, n: int) -> bytes:
        buf = self._zeros.get(n)
        if buf is None:
            buf = self._zeros.setdefault(n, bytes(n))
        return buf

    def ModelInfer(self, request, context):  # noqa: N802 - gRPC method names
        model = self.model(request.model_name, context)
        self.count(model.config.name)
        rows = request.inputs[0].shape[0] if model.batched else 1
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for out in model.metadata.outputs:
            shape = [rows, *out.shape[1:]] if model.batched else list(out.shape)
            response.outputs.add(name=out.name, datatype=out.datatype, shape=shape)
            size = np.dtype(NUMPY.get(out.datatype, np.float32)).itemsize
            response.raw_output_contents.append(self.zeros(int(np.prod(shape)) * size))
        return response


if __name__ == "__main__":
    sys.exit(serve(Echo, __doc__.splitlines()[0]))
