"""ModelStatistics RPC: stats snapshots -> ModelStatisticsResponse (Triton's semantics).

name "" lists every READY model version; version "" every READY version of the model. The
numbers come only from `stats.ModelStats`, the same source Prometheus reads.
"""

from __future__ import annotations

from typing import Any

from tributary_client._proto import grpc_service_pb2 as pb

from .config import parse_version
from .errors import InferenceError, InvalidArgument, shown
from .repository import ModelRepository
from .stats import Duration, StatsSnapshot


def _duration(target: Any, d: Duration) -> None:
    target.count = d.count
    target.ns = d.ns


def to_proto(s: StatsSnapshot) -> Any:
    out = pb.ModelStatistics(
        name=s.name,
        version=str(s.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    inf = out.inference_stats
    for field in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _duration(getattr(inf, field), getattr(s, field))
    for size in sorted(s.batch_stats):
        b = s.batch_stats[size]
        entry = out.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, b.compute_input)
        _duration(entry.compute_infer, b.compute_infer)
        _duration(entry.compute_output, b.compute_output)
    for m in s.memory_usage:
        out.memory_usage.add(type=m.kind, id=m.device_id, byte_size=m.byte_size)
    return out


def statistics_response(
    repo: ModelRepository, name: str, version: str
) -> pb.ModelStatisticsResponse:
    if not name:
        models = repo.servables()
    else:
        try:
            models = repo.ready_versions(name)
        except InferenceError:
            raise InvalidArgument(f"requested model '{shown(name)}' is not available") from None
        if version:
            try:
                wanted = parse_version(version, name)
            except InferenceError:
                wanted = None  # not a valid version string: no such version
            models = [m for m in models if m.version == wanted]
            if not models:
                raise InvalidArgument(
                    f"requested model version is not available for model '{shown(name)}'"
                )
        elif not models:
            raise InvalidArgument(f"requested model '{shown(name)}' is not available")
    models = sorted(models, key=lambda m: (m.name, m.version))
    return pb.ModelStatisticsResponse(model_stats=[to_proto(m.stats.snapshot()) for m in models])
