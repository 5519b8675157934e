"""Host (CPU) and GPU samplers behind Triton's per-interval metrics (docs/protocol.md#metrics).

Reading /proc or calling NVML costs syscalls and driver round trips, and CPU utilisation only
means something as a delta between two instants. So a background `SamplerThread` refreshes each
sampler every `--metrics-interval-ms`, and a scrape only copies the last reading under a lock:
no sampling ever happens on the request path.

Both samplers take their data source as an argument (a /proc reader function, an NVML module)
so unit tests drive them with canned text and a fake NVML; nothing here needs a GPU to be tested.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger(__name__)

ProcReader = Callable[[str], str]
"""Returns the text of a /proc file given its name ("stat", "meminfo")."""


def read_proc(name: str) -> str:
    """The real reader: small files, read whole each time (their content is regenerated)."""
    return (Path("/proc") / name).read_text()


# --------------------------------------------------------------------------------------- CPU


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate jiffies from the first `cpu` line of /proc/stat."""

    idle: int
    total: int


@dataclass(frozen=True)
class CpuReading:
    utilization: float
    memory_total_bytes: int
    memory_used_bytes: int


def parse_proc_stat(text: str) -> CpuTimes:
    """Idle counts idle + iowait (a CPU waiting on I/O is not busy); total counts the eight
    classic fields only, because guest time is already included in user/nice."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]
            values += [0] * (8 - len(values))
            idle = values[3] + values[4]
            return CpuTimes(idle=idle, total=sum(values))
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, used) bytes, used = MemTotal - MemAvailable as Triton reports it: page cache the
    kernel would give back is not counted as used."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            kib[key] = int(rest.split()[0])
    if "MemTotal" not in kib or "MemAvailable" not in kib:
        raise ValueError("MemTotal/MemAvailable missing from /proc/meminfo")
    total = kib["MemTotal"] * 1024
    return total, total - kib["MemAvailable"] * 1024


def cpu_utilization(prev: CpuTimes | None, cur: CpuTimes) -> float:
    """Busy fraction between two readings, clamped to 0..1. Without a previous reading the
    average since boot is the best available answer (better than a misleading 0)."""
    base = prev if prev is not None else CpuTimes(0, 0)
    total = cur.total - base.total
    if total <= 0:
        return 0.0
    busy = total - (cur.idle - base.idle)
    return min(1.0, max(0.0, busy / total))


class CpuSampler:
    """Keeps the last CpuReading; `sample` is called by the SamplerThread only."""

    def __init__(self, read: ProcReader = read_proc) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._prev: CpuTimes | None = None
        self._reading: CpuReading | None = None
        self._warned = False

    def sample(self) -> None:
        try:
            times = parse_proc_stat(self._read("stat"))
            total, used = parse_meminfo(self._read("meminfo"))
        except (OSError, ValueError, IndexError) as exc:
            # Not Linux, or /proc hidden: keep serving the rest of the metrics.
            if not self._warned:
                log.warning("CPU metrics unavailable: %s", exc)
                self._warned = True
            return
        reading = CpuReading(cpu_utilization(self._prev, times), total, used)
        with self._lock:
            self._prev = times
            self._reading = reading

    def reading(self) -> CpuReading | None:
        with self._lock:
            return self._reading

    def close(self) -> None:
        """Nothing to release; present so all samplers stop the same way."""


# --------------------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant. A field is None when NVML cannot report it on this device
    (e.g. power on some boards); the renderer then leaves that series out."""

    uuid: str
    utilization: float | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    power_usage_w: float | None
    power_limit_w: float | None
    energy_j: float | None


def import_nvml() -> ModuleType | None:
    """pynvml (package nvidia-ml-py) is optional: without it GPU metrics are skipped, once,
    with a warning, rather than failing the server."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        log.warning("GPU metrics disabled: pynvml not installed (pip install nvidia-ml-py)")
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    """Older pynvml releases return bytes for strings."""
    return value.decode() if isinstance(value, bytes) else value


def _visible_handles(nvml: Any, gpus: int, visible: str | None) -> list[Any]:
    """The NVML handles of the GPUs this process uses. CUDA_VISIBLE_DEVICES entries are UUIDs
    or indices (indices match NVML's only with CUDA_DEVICE_ORDER=PCI_BUS_ID); MIG entries and
    unknown ones are skipped rather than guessed at."""
    if visible is None or not visible.strip():
        count = min(gpus, nvml.nvmlDeviceGetCount())
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles: list[Any] = []
    for entry in (e.strip() for e in visible.split(",")):
        if len(handles) >= gpus:
            break
        try:
            if entry.isdigit():
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            elif entry.startswith("GPU-"):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
        except Exception as exc:  # NVMLError has no stable import path across versions
            log.warning("GPU metrics: cannot find device %r: %s", entry, exc)
    return handles


class GpuSampler:
    """Per-GPU gauges from NVML, plus energy used since the sampler started (Triton's
    nv_energy_consumption counts from server start, not from driver load)."""

    def __init__(self, nvml: Any, gpus: int, visible: str | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._readings: tuple[GpuReading, ...] = ()
        self._failed: set[str] = set()
        nvml.nvmlInit()
        try:
            handles = _visible_handles(nvml, gpus, visible)
            self._devices = [(h, _text(nvml.nvmlDeviceGetUUID(h))) for h in handles]
        except Exception:
            nvml.nvmlShutdown()
            raise
        self._energy_base: dict[str, int | None] = {
            uuid: self._call(uuid, "energy", nvml.nvmlDeviceGetTotalEnergyConsumption, h)
            for h, uuid in self._devices
        }

    @classmethod
    def create(cls, gpus: int, nvml: Any | None = None) -> GpuSampler | None:
        """The server's entry point: None (with a warning) when NVML is missing or fails to
        initialise, so GPU metrics never stop the server from starting."""
        module = nvml if nvml is not None else import_nvml()
        if module is None:
            return None
        try:
            return cls(module, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception as exc:
            log.warning("GPU metrics disabled: NVML failed: %s", exc)
            return None

    def _call(self, uuid: str, what: str, fn: Callable[..., Any], handle: Any) -> Any:
        """One NVML query; a failure costs that field only, and is logged once per field."""
        try:
            return fn(handle)
        except Exception as exc:
            key = f"{uuid}/{what}"
            if key not in self._failed:
                self._failed.add(key)
                log.warning("GPU metrics: %s unavailable on %s: %s", what, uuid, exc)
            return None

    def _read(self, handle: Any, uuid: str) -> GpuReading:
        n = self._nvml
        util = self._call(uuid, "utilization", n.nvmlDeviceGetUtilizationRates, handle)
        mem = self._call(uuid, "memory", n.nvmlDeviceGetMemoryInfo, handle)
        power_mw = self._call(uuid, "power", n.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._call(uuid, "power limit", n.nvmlDeviceGetPowerManagementLimit, handle)
        energy_mj = self._call(uuid, "energy", n.nvmlDeviceGetTotalEnergyConsumption, handle)
        base = self._energy_base.get(uuid)
        return GpuReading(
            uuid=uuid,
            utilization=util.gpu / 100.0 if util is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            power_usage_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            energy_j=(energy_mj - base) / 1000.0
            if energy_mj is not None and base is not None
            else None,
        )

    def sample(self) -> None:
        readings = tuple(self._read(h, uuid) for h, uuid in self._devices)
        with self._lock:
            self._readings = readings

    def readings(self) -> tuple[GpuReading, ...]:
        with self._lock:
            return self._readings

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)


# ------------------------------------------------------------------------------------ thread


class Sampler(Protocol):
    def sample(self) -> None: ...

    def close(self) -> None: ...


class SamplerThread:
    """One daemon thread refreshing every sampler each interval. Samples once synchronously in
    `start` so the very first scrape already has memory figures."""

    MIN_INTERVAL_S = 0.01  # a 0 or negative interval must not turn into a busy loop

    def __init__(self, samplers: Iterable[Sampler], interval_ms: int) -> None:
        self._samplers: Sequence[Sampler] = tuple(samplers)
        self._interval = max(interval_ms / 1000.0, self.MIN_INTERVAL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def _sample_all(self) -> None:
        for sampler in self._samplers:
            try:
                sampler.sample()
            except Exception:
                log.exception("metrics sampler %s failed", type(sampler).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample_all()

    def start(self) -> None:
        self._sample_all()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for sampler in self._samplers:
            sampler.close()
