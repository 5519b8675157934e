"""The floor: a minimal Python gRPC server that answers ModelInfer without running a model.

It speaks just enough of the protocol for perf_analyzer (ServerMetadata, ModelMetadata,
ModelConfig, ModelInfer) and returns a pre-built response of the right output shape. Its
infer/s is what Python gRPC itself can do on this machine with the same server settings
Tributary uses (thread pool, message limits), so Tributary's numbers are reported against it.

Usage: python benchmarks/echo_server.py MODEL_DIR PORT_FILE
(MODEL_DIR: a model folder with config.pbtxt; the config gives the signature to mimic.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc
from tributary_client._proto import model_config_pb2 as mc

_DT = {v.number: v.name.removeprefix("TYPE_") for v in mc.DataType.DESCRIPTOR.values}
_DT[mc.TYPE_STRING] = "BYTES"
_SIZE = {"FP32": 4, "INT32": 4, "INT64": 8, "FP64": 8, "INT8": 1, "UINT8": 1, "BOOL": 1}


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, config: mc.ModelConfig) -> None:
        self.config = config
        batch = [-1] if config.max_batch_size > 0 else []
        meta = pb.ModelMetadataResponse.TensorMetadata
        self.metadata = pb.ModelMetadataResponse(
            name=config.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[
                meta(name=t.name, datatype=_DT[t.data_type], shape=batch + list(t.dims))
                for t in config.input
            ],
            outputs=[
                meta(name=t.name, datatype=_DT[t.data_type], shape=batch + list(t.dims))
                for t in config.output
            ],
        )

    def ServerMetadata(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerMetadataResponse(name="echo", version="0", extensions=[])

    def ModelMetadata(self, request, context):  # noqa: N802
        return self.metadata

    def ModelConfig(self, request, context):  # noqa: N802
        return pb.ModelConfigResponse(config=self.config)

    def ModelInfer(self, request, context):  # noqa: N802
        # Shape the reply like a real one: one raw output per model output, batch rows kept.
        rows = request.inputs[0].shape[0] if self.config.max_batch_size > 0 else 1
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for out in self.metadata.outputs:
            shape = [rows, *out.shape[1:]] if self.config.max_batch_size > 0 else list(out.shape)
            tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=shape)
            del tensor
            n = int(np.prod(shape)) * _SIZE.get(out.datatype, 4)
            response.raw_output_contents.append(bytes(n))
        return response


def main() -> int:
    model_dir, port_file = Path(sys.argv[1]), Path(sys.argv[2])
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    config.name = config.name or model_dir.name
    limit = 2**31 - 1
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=int(os.environ.get("ECHO_WORKERS", "128"))),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(config), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(json.dumps({"grpc_port": port}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
