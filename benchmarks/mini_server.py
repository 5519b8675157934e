"""Plumbing shared by the benchmark's minimal gRPC servers (echo floor, inline ORT server).

Both are what a Python gRPC server costs at its barest: a sync grpcio server with a small
thread pool, Tributary's message limits, and just enough of the KServe v2 / Triton protocol for
perf_analyzer (ServerMetadata, ModelMetadata, ModelConfig, readiness) plus a request count
in ModelStatistics, which the benchmark divides server CPU by. They differ only in
ModelInfer, so that is the one method a subclass writes; everything else lives here once, and
the two servers' numbers differ by exactly what ModelInfer does.

A server serves every model folder (one with a config.pbtxt) under a repository directory and
announces its port in a JSON file, as Tributary's --port-file does.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc
from tributary_client._proto import model_config_pb2 as mc

DATATYPE = {v.number: v.name.removeprefix("TYPE_") for v in mc.DataType.DESCRIPTOR.values}
DATATYPE[mc.TYPE_STRING] = "BYTES"
NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
# The floor: 16 workers (Tributary's own default is larger; the benchmark passes 16 to
# both minimal servers so that they are the same server but for ModelInfer).
DEFAULT_WORKERS = 16


class Model:
    """One model's config and the metadata reply derived from it."""

    def __init__(self, model_dir: Path) -> None:
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        config.name = config.name or model_dir.name
        self.dir = model_dir
        self.config = config
        self.batched = config.max_batch_size > 0
        batch = [-1] if self.batched else []
        meta = pb.ModelMetadataResponse.TensorMetadata
        self.metadata = pb.ModelMetadataResponse(
            name=config.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[
                meta(name=t.name, datatype=DATATYPE[t.data_type], shape=batch + list(t.dims))
                for t in config.input
            ],
            outputs=[
                meta(name=t.name, datatype=DATATYPE[t.data_type], shape=batch + list(t.dims))
                for t in config.output
            ],
        )


def load_models(repo: Path) -> dict[str, Model]:
    """Every model folder under `repo` (or `repo` itself when it is a model folder)."""
    dirs = [repo] if (repo / "config.pbtxt").exists() else sorted(repo.iterdir())
    models = [Model(d) for d in dirs if (d / "config.pbtxt").exists()]
    return {m.config.name: m for m in models}


class MiniServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Metadata and readiness for perf_analyzer; subclasses answer ModelInfer."""

    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models
        self._served = dict.fromkeys(models, 0)
        self._lock = threading.Lock()

    def count(self, name: str) -> None:
        """One request served: the benchmark divides server CPU by this (ModelStatistics)."""
        with self._lock:
            self._served[name] += 1

    def model(self, name: str, context: grpc.ServicerContext) -> Model:
        found = self.models.get(name)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
        return found  # type: ignore[return-value]  # abort raises

    def ServerLive(self, request, context):  # noqa: N802 - gRPC method names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name="mini", version="0", extensions=[])

    def ModelMetadata(self, request, context):  # noqa: N802
        return self.model(request.name, context).metadata

    def ModelConfig(self, request, context):  # noqa: N802
        return pb.ModelConfigResponse(config=self.model(request.name, context).config)

    def ModelStatistics(self, request, context):  # noqa: N802
        # Only the request count: no timings are kept, so none are reported.
        names = [request.name] if request.name else list(self.models)
        reply = pb.ModelStatisticsResponse()
        for name in names:
            n = self._served.get(self.model(name, context).config.name, 0)
            reply.model_stats.add(
                name=name,
                version="1",
                inference_count=n,
                execution_count=n,
                inference_stats=pb.InferStatistics(success=pb.StatisticDuration(count=n)),
            )
        return reply


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("repo", type=Path, help="model repository (or one model folder)")
    parser.add_argument("port_file", type=Path, help="JSON file to announce the port in")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="gRPC threads")
    return parser.parse_args()


def serve(make: Callable[[dict[str, Model]], MiniServicer], description: str) -> int:
    """Parse the command line, serve until SIGTERM/SIGINT, and return the exit status."""
    opts = parse_args(description)
    servicer = make(load_models(opts.repo))
    limit = 2**31 - 1
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=opts.workers),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    opts.port_file.write_text(json.dumps({"grpc_port": port}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0
