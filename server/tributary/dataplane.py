"""The data plane: everything a front end (gRPC, HTTP/REST) asks of the server, transport-neutral.

A front end parses its wire format into the generated messages (`pb.ModelInferRequest` plus
the raw input tensors it split off) and maps what comes back, or the `InferenceError` raised,
onto its own wire; it keeps no request lifecycle of its own. `DataPlane` answers health,
metadata, repository and settings calls here, and inherits inference (`infer`, `submit`) from
`tributary.lifecycle`. Nothing here imports grpc or an HTTP library, so it is tested
in-process without sockets (tests/unit/test_dataplane.py).

See docs/architecture.md for the path of one request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tributary_client._proto import grpc_service_pb2 as pb

from . import __version__
from .constants import (
    DEFAULT_CLIENT_SHM_MAX_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_TENSOR_BYTES,
    DEFAULT_STREAM_MAX_PENDING,
)
from .control import ModelControl
from .errors import InvalidArgument, Unimplemented
from .lifecycle import REROUTES, Done, InferResult, Lifecycle, internal_error
from .logs import LogControl, RequestLog
from .repository import ModelRepository
from .shm import SharedMemory
from .statistics import statistics_response
from .traceconfig import TraceConfig
from .tracing import Tracer

__all__ = [
    "REROUTES",
    "DataPlane",
    "Done",
    "InferResult",
    "ServerState",
    "internal_error",
    "server_ready",
]


EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "sequence",
    "statistics",
)
SHM_EXTENSIONS = ("system_shared_memory", "cuda_shared_memory")
"""Listed when --allow-client-shm=true, as tritonserver lists both (CUDA regions are refused
on registration with its CPU-only text, docs/protocol.md#shared-memory)."""


@dataclass
class ServerState:
    """What health/readiness depend on besides the models; flipped by the composition root."""

    server_id: str = "tributary"
    strict_readiness: bool = True
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    model_control_mode: str = "none"
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_max_pending: int = DEFAULT_STREAM_MAX_PENDING
    allow_client_shm: bool = False
    client_shm_max_bytes: int = DEFAULT_CLIENT_SHM_MAX_BYTES
    client_shm_key_prefix: str | None = None
    exiting: bool = False
    # called after a model is loaded or unloaded at run time (health follows readiness)
    listeners: list[Callable[[], None]] = field(default_factory=list)


def server_ready(repo: ModelRepository, state: ServerState) -> bool:
    """ServerReady, health Check and Watch all answer this one question."""
    if state.exiting:
        return False
    return repo.is_ready() if state.strict_readiness else True


class DataPlane(Lifecycle):
    """Health, metadata, repository, shared memory and inference, for any transport."""

    def __init__(
        self,
        repository: ModelRepository,
        state: ServerState,
        request_log: RequestLog | None = None,
        *,
        tracer: Tracer | None = None,
        logs: LogControl | None = None,
    ) -> None:
        self.repo = repository
        self.state = state
        self.request_log = request_log
        self.tracer = tracer if tracer is not None else Tracer(TraceConfig())
        self.logs = logs
        if logs is not None:
            logs.listeners.append(self._verbose)
        # Front ends read `tracing` to decide whether to collect trace headers at all, and
        # inference reads `_plain`: with neither tracing nor the request log on, a request
        # pays that one check (both follow TraceSetting and LogSettings at run time).
        self.tracing = self.tracer.enabled
        self._plain = request_log is None and not self.tracing
        self.control = ModelControl(
            repository, explicit=state.model_control_mode == "explicit", on_change=self._changed
        )
        self.shm = SharedMemory(
            state.allow_client_shm,
            max_bytes=state.client_shm_max_bytes,
            key_prefix=state.client_shm_key_prefix,
        )
        self._extensions = EXTENSIONS + (SHM_EXTENSIONS if state.allow_client_shm else ())

    def _changed(self) -> None:
        for listener in self.state.listeners:
            listener()

    def close(self) -> None:
        """After the models unloaded: remove file-override directories, unmap regions (those
        still in use unmap with their last user)."""
        self.control.close()
        self.shm.close()

    # ---- health and metadata ---------------------------------------------------------------
    def server_live(self) -> bool:
        return not self.state.exiting

    def server_ready(self) -> bool:
        return server_ready(self.repo, self.state)

    def model_ready(self, name: str, version: str) -> bool:
        return not self.state.exiting and self.repo.is_model_ready(name, version)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=self.state.server_id, version=__version__, extensions=self._extensions
        )

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        if version:
            models = [self.repo.resolve(name, version)]
        else:
            models = self.repo.ready_versions(name) or [
                self.repo.resolve(name, "")  # raises "has no available versions"
            ]
        sig = models[-1].signature
        batch = [-1] if sig.max_batch_size > 0 else []
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name,
            versions=[str(m.version) for m in models],
            platform=sig.platform,
            inputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.inputs
            ],
            outputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.outputs
            ],
        )

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        model = self.repo.resolve(name, version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        return statistics_response(self.repo, name, version)

    # ---- repository --------------------------------------------------------------------------
    def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise Unimplemented("'repository_name' specification is not supported")
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.repo.index(ready_only=request.ready)
            ]
        )

    def load(self, request: pb.RepositoryModelLoadRequest) -> None:
        self.control.load(request)

    def unload(self, request: pb.RepositoryModelUnloadRequest) -> None:
        self.control.unload(request)

    # ---- settings ------------------------------------------------------------------------------
    def trace_settings(
        self, model: str, update: Mapping[str, list[str] | None] | None
    ) -> dict[str, list[str]]:
        """TraceSetting (docs/protocol.md#tracing): read, or update then read, the global
        settings ("") or a ready model's; the next request sees the change."""
        if model and not self.repo.is_model_ready(model):
            raise InvalidArgument(f"Request for unknown model : {model}")
        settings = self.tracer.settings(model, update)
        self._refresh()
        return settings

    def log_settings(
        self, update: Mapping[str, bool | int | str] | None
    ) -> dict[str, bool | int | str]:
        """LogSettings (docs/protocol.md#log-settings): read, or update then read."""
        if self.logs is None:
            raise Unimplemented("LogSettings is not available: logging was not configured")
        return self.logs.update(update)

    def _verbose(self, level: int) -> None:
        """The verbose level changed (LogSettings): the request log follows, live."""
        if level >= 1 and self.request_log is None:
            self.request_log = RequestLog()
        elif level < 1:
            self.request_log = None
        self._refresh()

    def _refresh(self) -> None:
        self.tracing = self.tracer.enabled
        self._plain = self.request_log is None and not self.tracing
