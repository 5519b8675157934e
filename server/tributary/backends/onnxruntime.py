"""ONNX Runtime instances: sessions, providers (CUDA -> CPU), thread settings, IO binding.

Why it looks like this:
- One `OrtInstance` per instance_group slot; the scheduler owns concurrency, so each session
  runs one batch at a time and `InferenceSession.run` releases the GIL while it computes.
- Thread defaults must not oversubscribe: ORT's default intra-op pool spins and takes every
  core per session; with several instances on a 2-core box that burns CPU for nothing. Unless
  the config says otherwise we leave one of the CPUs this process may use (`cpu_count`:
  affinity and cgroup quota) to the gRPC front end, split the rest across the model's CPU
  instances and turn spinning off. The front end needs about a core under load; a pool that
  counts on that core waits for it at every parallel operator
  (docs/model-config.md#instances-and-threads).
- onnxruntime-gpu lists CUDA/TensorRT providers even on machines without a GPU and silently
  falls back to CPU when they fail to initialise. So GPUs are counted from the
  machine (NVML or /dev/nvidiaN), and after creating a session we compare `get_providers()`
  with what we asked for: a fall-back is a load error, never a surprise in production.
This module knows ONNX Runtime and model config; it knows nothing about gRPC.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

log = logging.getLogger("tributary.onnxruntime")

KIND_AUTO, KIND_GPU, KIND_CPU, KIND_MODEL = 0, 1, 2, 3

# Triton onnxruntime backend: optimization.graph.level -> ORT level (docs/model-config.md).
_GRAPH_LEVELS = {-1: "ORT_ENABLE_BASIC", 1: "ORT_ENABLE_EXTENDED", 2: "ORT_DISABLE_ALL"}

# Triton's TensorRT accelerator parameters -> ORT TensorRT provider options.
_TRT_OPTIONS = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "trt_engine_cache_enable": "trt_engine_cache_enable",
    "trt_engine_cache_path": "trt_engine_cache_path",
    "trt_engine_cache_prefix": "trt_engine_cache_prefix",
    "trt_timing_cache_enable": "trt_timing_cache_enable",
    "trt_timing_cache_path": "trt_timing_cache_path",
    "trt_profile_min_shapes": "trt_profile_min_shapes",
    "trt_profile_max_shapes": "trt_profile_max_shapes",
    "trt_profile_opt_shapes": "trt_profile_opt_shapes",
    "trt_cuda_graph_enable": "trt_cuda_graph_enable",
    "max_partition_iterations": "trt_max_partition_iterations",
    "minimum_subgraph_size": "trt_min_subgraph_size",
}


def cpu_count(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup CPU
    quota (a Kubernetes `limits.cpu`, `docker run --cpus`), rounded up, at least 1.

    `os.cpu_count()` counts the host's CPUs: in a pod limited to 2 CPUs on a 64-core node it
    says 64, and sessions sized from it would run 64 intra-op threads against a 2-CPU quota,
    to be throttled by the kernel."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def _cgroup_quota(root: str) -> int | None:
    """The CPU quota in whole CPUs (rounded up), from cgroup v2 `cpu.max` or v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us`; None when there is none or it cannot be read."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota != "max":
            return -(-int(quota) // int(period or "100000"))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return -(-quota_us // period_us)


def gpu_count() -> int:
    """GPUs on this machine, from NVML when available, else the /dev/nvidiaN device nodes."""
    try:
        import pynvml  # nvidia-ml-py, optional ([gpu] extra)

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: fall through
        pass
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


@dataclass(frozen=True)
class Device:
    kind: str  # "CPU" or "GPU"
    id: int = 0

    def __str__(self) -> str:
        return "CPU" if self.kind == "CPU" else f"GPU {self.id}"


def plan_devices(config: Any, gpus: int) -> list[tuple[str, Device]]:
    """(instance name, device) for every instance the config's instance_group asks for."""
    plan: list[tuple[str, Device]] = []
    for g_index, group in enumerate(config.instance_group):
        group_name = group.name or f"{config.name}_{g_index}"
        kind = group.kind
        if kind == KIND_AUTO:
            kind = KIND_GPU if gpus else KIND_CPU
            if not gpus:
                log.info(
                    "model '%s': no GPU found, instance group '%s' runs on CPU",
                    config.name,
                    group_name,
                )
        if kind == KIND_MODEL:
            kind = KIND_CPU
        count = max(1, group.count)
        if kind == KIND_GPU:
            if gpus == 0:
                raise ModelLoadError(
                    f"instance group '{group_name}' of model '{config.name}' asks for KIND_GPU, "
                    "but no GPU is available on this machine"
                )
            ids = list(group.gpus) or list(range(gpus))
            for gpu in ids:
                if gpu < 0 or gpu >= gpus:
                    raise ModelLoadError(
                        f"instance group '{group_name}' of model '{config.name}' names GPU {gpu}, "
                        f"but this machine has {gpus} GPU(s)"
                    )
                for i in range(count):
                    plan.append((f"{group_name}_{i}_gpu{gpu}", Device("GPU", gpu)))
        else:
            for i in range(count):
                plan.append((f"{group_name}_{i}", Device("CPU")))
    return plan


def _param(config: Any, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def default_intra_threads(cores: int, cpu_instances: int) -> int:
    """Intra-op threads per CPU instance when the config does not say: the CPUs this process
    may use, less one for the gRPC front end, split across the instances (at least one).

    Measured on 2 CPUs under perf_analyzer load (benchmarks/ANALYSIS.md): for the one
    instance of `mlp`, 1 thread used 3-17 % less server CPU per request than a 2-thread pool
    at concurrency 8-64, because every parallel operator waited for a pool thread that was
    queued behind the front end's threads; at concurrency 1, with cores to spare, the
    2-thread pool's p50 was 13-19 % lower. Under load is what a server is sized for."""
    return max(1, (cores - 1) // max(1, cpu_instances))


def session_options(config: Any, cpu_instances: int, cores: int | None = None) -> Any:
    """SessionOptions from Triton-named config parameters; defaults that do not oversubscribe."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = config.optimization.graph.level if config.HasField("optimization") else 0
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _GRAPH_LEVELS.get(level, "ORT_ENABLE_ALL")
    )
    cores = cores or cpu_count()
    intra = _param(config, "intra_op_thread_count")
    so.intra_op_num_threads = (
        int(intra) if intra not in (None, "") else default_intra_threads(cores, cpu_instances)
    )
    inter = _param(config, "inter_op_thread_count")
    if inter not in (None, "", "0"):
        so.inter_op_num_threads = int(inter)
    if _param(config, "execution_mode") == "1":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if _param(config, "enable_mem_arena") == "0":
        so.enable_cpu_mem_arena = False
    if _param(config, "enable_mem_pattern") == "0":
        so.enable_mem_pattern = False
    # A spinning pool keeps cores busy between runs; in a server they are needed elsewhere.
    # (`parameters { key: "session.intra_op.allow_spinning" value: {string_value: "1"} }` turns
    # it back on for a latency-critical model: ~80 us less at batch 1 for the benchmark's mlp.)
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        if key not in config.parameters:
            so.add_session_config_entry(key, "0")
    for key in config.parameters:
        if key.startswith("session."):  # pass-through of ORT session config entries
            so.add_session_config_entry(key, config.parameters[key].string_value)
    return so


def providers_for(config: Any, device: Device) -> list[tuple[str, dict[str, str]]]:
    """The providers to ask ORT for, in priority order, from the config's accelerators."""
    if device.kind == "CPU":
        for acc in config.optimization.execution_accelerators.cpu_execution_accelerator:
            raise ModelLoadError(
                f"model '{config.name}': CPU execution accelerator '{acc.name}' is not supported "
                "by this server"
            )
        return [("CPUExecutionProvider", {})]
    providers: list[tuple[str, dict[str, str]]] = []
    cuda: dict[str, str] = {"device_id": str(device.id)}
    if config.optimization.cuda.graphs:
        # ORT's CUDA graphs need inputs and outputs bound to fixed device buffers per shape;
        # our IO binding copies host inputs per run, so capture would not replay correctly.
        # Not verified on a GPU yet: run without graphs and say so, rather than claim it.
        log.warning(
            "model '%s': optimization.cuda.graphs is not supported yet; running without CUDA "
            "graphs",
            config.name,
        )
    for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
        params = dict(acc.parameters)
        if acc.name == "tensorrt":
            trt = {"device_id": str(device.id)}
            precision = params.pop("precision_mode", "FP32").upper()
            if precision == "FP16":
                trt["trt_fp16_enable"] = "1"
            elif precision == "INT8":
                trt["trt_int8_enable"] = "1"
            elif precision == "BF16":
                trt["trt_bf16_enable"] = "1"
            elif precision != "FP32":
                raise ModelLoadError(
                    f"model '{config.name}': unsupported TensorRT precision_mode '{precision}'"
                )
            for key, value in params.items():
                if key not in _TRT_OPTIONS:
                    raise ModelLoadError(
                        f"model '{config.name}': unknown TensorRT accelerator parameter '{key}'"
                    )
                trt[_TRT_OPTIONS[key]] = value
            providers.append(("TensorrtExecutionProvider", trt))
        elif acc.name == "cuda":
            cuda.update(params)
        else:
            raise ModelLoadError(
                f"model '{config.name}': GPU execution accelerator '{acc.name}' is not supported "
                "(use 'tensorrt' or 'cuda')"
            )
    providers.append(("CUDAExecutionProvider", cuda))
    return providers


def check_providers(model: str, instance: str, asked: Sequence[str], got: Sequence[str]) -> None:
    """A session that silently fell back to CPU is a load error."""
    missing = [p for p in asked if p != "CPUExecutionProvider" and p not in got]
    if missing:
        raise ModelLoadError(
            f"model '{model}' instance '{instance}': ONNX Runtime could not enable "
            f"{', '.join(missing)} (session providers: {', '.join(got)}); refusing to run a GPU "
            "instance on CPU. Check the CUDA/cuDNN/TensorRT libraries."
        )


class OrtInstance:
    """One ONNX Runtime session; `run` takes model-side numpy arrays and returns numpy arrays."""

    def __init__(
        self,
        name: str,
        model_path: Path,
        device: Device,
        config: Any,
        options: Any,
        session_factory: Callable[..., Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.name = name
        self.device = device
        self._model = config.name
        providers = providers_for(config, device)
        if device.kind == "GPU":
            providers.append(("CPUExecutionProvider", {}))  # for ops CUDA lacks, as ORT intends
        factory = session_factory or ort.InferenceSession
        try:
            self.session = factory(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise ModelLoadError(
                f"model '{config.name}': ONNX Runtime failed to load {model_path}: {exc}"
            ) from exc
        check_providers(config.name, name, [p for p, _ in providers], self.session.get_providers())
        self._binding = device.kind == "GPU"

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self._binding:
            return self._run_bound(inputs, outputs)
        results = self.session.run(list(outputs), inputs)
        return dict(zip(outputs, results, strict=True))

    def _run_bound(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """GPU path: bind host inputs and let ORT allocate outputs on the device, copy once."""
        binding = self.session.io_binding()
        for name, arr in inputs.items():
            binding.bind_cpu_input(name, arr)
        for name in outputs:
            binding.bind_output(name, "cuda", self.device.id)
        self.session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        return dict(zip(outputs, results, strict=True))


def create_instances(
    config: Any, model_path: Path, gpus: int, cores: int | None = None
) -> list[OrtInstance]:
    """Every instance of a model version, per its normalised instance_group."""
    plan = plan_devices(config, gpus)
    cpu_instances = sum(1 for _, d in plan if d.kind == "CPU")
    options = session_options(config, cpu_instances, cores)
    return [OrtInstance(name, model_path, device, config, options) for name, device in plan]
