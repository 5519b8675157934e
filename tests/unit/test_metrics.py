"""Prometheus exposition: Triton's names and types, exact sample lines, samplers, HTTP endpoint.

No GPU is needed anywhere here: GPU metrics are driven through a fake NVML module.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tributary.metrics import CONTENT_TYPE, MetricsServer, escape_label_value, render
from tributary.options import ServerOptions
from tributary.stats import LATENCY_BUCKETS_US, ModelStats
from tributary.sysmetrics import (
    CpuSampler,
    CpuTimes,
    GpuSampler,
    SamplerThread,
    cpu_utilization,
    parse_meminfo,
    parse_proc_stat,
)
from tributary_client._proto import model_config_pb2 as mc

# ------------------------------------------------------------------------------ fixtures


@dataclass
class FakeModel:
    name: str
    version: int
    stats: ModelStats
    load_seconds: float = 0.25
    config: mc.ModelConfig = field(default_factory=mc.ModelConfig)


class FakeRepository:
    def __init__(self, *models: FakeModel) -> None:
        self.models = list(models)

    def servables(self) -> list[FakeModel]:
        return list(self.models)


def _known_stats(name: str = "simple", version: int = 1) -> ModelStats:
    """3 successes (rows 1, 2, 5), 1 REJECTED failure, 2 executions, 1 pending."""
    stats = ModelStats(name, version)
    for rows, total_us in ((1, 150), (2, 700), (5, 30_000)):
        stats.request_success(
            total_ns=total_us * 1000 + 999,  # the 999 ns must vanish in the us conversion
            queue_ns=40_500,
            compute_input_ns=1_999,
            compute_infer_ns=100_000,
            compute_output_ns=2_500,
            rows=rows,
            now_ms=1,
        )
    stats.request_failure(total_ns=5_000, reason="REJECTED")
    stats.execution(
        batch_rows=3, compute_input_ns=1_999, compute_infer_ns=100_000, compute_output_ns=2_500
    )
    stats.execution(
        batch_rows=5, compute_input_ns=1_999, compute_infer_ns=100_000, compute_output_ns=2_500
    )
    stats.pending(2)
    stats.pending(-1)
    return stats


def _lines(text: str) -> list[str]:
    return text.splitlines()


# ------------------------------------------------------------------------------ render


def test_render_exact_counter_and_gauge_lines() -> None:
    text = render(FakeRepository(FakeModel("simple", 1, _known_stats())), cpu=None, gpu=None)
    lines = _lines(text)
    lab = 'model="simple",version="1"'
    expected = [
        f"nv_inference_request_success{{{lab}}} 3",
        f'nv_inference_request_failure{{{lab},reason="REJECTED"}} 1',
        f'nv_inference_request_failure{{{lab},reason="CANCELED"}} 0',
        f'nv_inference_request_failure{{{lab},reason="BACKEND"}} 0',
        f'nv_inference_request_failure{{{lab},reason="OTHER"}} 0',
        f"nv_inference_count{{{lab}}} 8",
        f"nv_inference_exec_count{{{lab}}} 2",
        # (150999 + 700999 + 30000999) ns -> 30852 us (sum first, then integer division)
        f"nv_inference_request_duration_us{{{lab}}} 30852",
        f"nv_inference_queue_duration_us{{{lab}}} 121",  # 3 * 40500 ns = 121500 ns
        f"nv_inference_compute_input_duration_us{{{lab}}} 5",  # 3 * 1999 ns = 5997 ns
        f"nv_inference_compute_infer_duration_us{{{lab}}} 300",
        f"nv_inference_compute_output_duration_us{{{lab}}} 7",  # 7500 ns
        f"nv_inference_pending_request_count{{{lab}}} 1",
        f"nv_model_load_duration_secs{{{lab}}} 0.25",
    ]
    for line in expected:
        assert line in lines, line
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ):
        assert types[name] == "counter"
    assert types["nv_inference_pending_request_count"] == "gauge"
    assert types["nv_model_load_duration_secs"] == "gauge"
    assert types["tributary_inference_batch_size"] == "histogram"
    assert "_total" not in text and "_created" not in text
    # Every family has a HELP line right before its TYPE line.
    for i, line in enumerate(lines):
        if line.startswith("# TYPE"):
            assert lines[i - 1].startswith("# HELP " + line.split()[2] + " ")
    assert text.endswith("\n")


def test_render_histograms_are_cumulative_and_end_at_count() -> None:
    text = render(FakeRepository(FakeModel("simple", 1, _known_stats())), cpu=None, gpu=None)
    lines = _lines(text)
    lab = 'model="simple",version="1"'
    # Request durations 150, 700 and 30000 us against 100, 250, 500, 1000, ... 25000, 50000.
    name = "tributary_inference_request_duration_us"
    assert f'{name}_bucket{{{lab},le="100"}} 0' in lines
    assert f'{name}_bucket{{{lab},le="250"}} 1' in lines
    assert f'{name}_bucket{{{lab},le="500"}} 1' in lines
    assert f'{name}_bucket{{{lab},le="1000"}} 2' in lines
    assert f'{name}_bucket{{{lab},le="25000"}} 2' in lines
    assert f'{name}_bucket{{{lab},le="50000"}} 3' in lines
    assert f'{name}_bucket{{{lab},le="+Inf"}} 3' in lines
    assert f"{name}_sum{{{lab}}} 30852" in lines
    assert f"{name}_count{{{lab}}} 3" in lines
    buckets = [ln for ln in lines if ln.startswith(f"{name}_bucket")]
    assert len(buckets) == len(LATENCY_BUCKETS_US) + 1
    values = [int(ln.rsplit(" ", 1)[1]) for ln in buckets]
    assert values == sorted(values)
    # Batch sizes: executions of 3 and 5 rows against 1, 2, 4, 8, ...
    name = "tributary_inference_batch_size"
    assert f'{name}_bucket{{{lab},le="2"}} 0' in lines
    assert f'{name}_bucket{{{lab},le="4"}} 1' in lines
    assert f'{name}_bucket{{{lab},le="8"}} 2' in lines
    assert f'{name}_bucket{{{lab},le="+Inf"}} 2' in lines
    assert f"{name}_sum{{{lab}}} 8" in lines
    assert f"{name}_count{{{lab}}} 2" in lines
    name = "tributary_inference_queue_duration_us"
    assert f'{name}_bucket{{{lab},le="+Inf"}} 3' in lines
    assert f"{name}_sum{{{lab}}} 121" in lines


def test_render_metric_tags_order_and_escaping() -> None:
    config = mc.ModelConfig(name="tagged")
    config.metric_tags["team"] = 'vision "core"'
    config.metric_tags["app-id"] = "a\\b\nc"
    repo = FakeRepository(
        FakeModel("zeta", 2, ModelStats("zeta", 2)),
        FakeModel("tagged", 10, ModelStats("tagged", 10), config=config),
        FakeModel("tagged", 9, ModelStats("tagged", 9), config=config),
    )
    text = render(repo, cpu=None, gpu=None)
    success = [ln for ln in _lines(text) if ln.startswith("nv_inference_request_success{")]
    tags = '_app_id="a\\\\b\\nc",_team="vision \\"core\\""'
    assert success == [
        f'nv_inference_request_success{{model="tagged",version="9",{tags}}} 0',
        f'nv_inference_request_success{{model="tagged",version="10",{tags}}} 0',
        'nv_inference_request_success{model="zeta",version="2"} 0',
    ]
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    # The parser must read the escaped values back exactly.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = families["nv_inference_request_success"].samples[0].labels
    assert labels["_team"] == 'vision "core"' and labels["_app_id"] == "a\\b\nc"


def test_render_with_no_models_still_valid() -> None:
    text = render(FakeRepository(), cpu=None, gpu=None)
    assert "# TYPE nv_inference_count counter" in text
    assert not [ln for ln in _lines(text) if not ln.startswith("#")]
    list(text_string_to_metric_families(text))


def test_exposition_parses_with_prometheus_client() -> None:
    cpu = CpuSampler(_proc_reader([STAT_A], MEMINFO))
    cpu.sample()
    gpu = GpuSampler(FakeNvml(), gpus=2)
    gpu.sample()
    repo = FakeRepository(FakeModel("simple", 1, _known_stats()))
    families = {f.name: f for f in text_string_to_metric_families(render(repo, cpu=cpu, gpu=gpu))}
    assert families["nv_inference_count"].type == "counter"
    # The parser itself appends _total internally; the value must still be ours.
    assert [s.value for s in families["nv_inference_count"].samples] == [8]
    failure = families["nv_inference_request_failure"]
    assert {s.labels["reason"]: s.value for s in failure.samples} == {
        "REJECTED": 1,
        "CANCELED": 0,
        "BACKEND": 0,
        "OTHER": 0,
    }
    hist = families["tributary_inference_request_duration_us"]
    assert hist.type == "histogram"
    inf = [s for s in hist.samples if s.labels.get("le") == "+Inf"]
    count = [s for s in hist.samples if s.name.endswith("_count")]
    assert inf[0].value == count[0].value == 3
    assert families["nv_cpu_memory_used_bytes"].type == "gauge"
    assert families["nv_energy_consumption"].type == "counter"
    assert len(families["nv_gpu_utilization"].samples) == 2


# ------------------------------------------------------------------------------ CPU

STAT_A = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\nintr 1 2 3\n"
# +60 user, +20 system, +100 idle, +20 iowait: busy 80 of 200
STAT_B = "cpu  160 0 70 900 70 0 0 0 0 0\ncpu0 160 0 70 900 70 0 0 0 0 0\n"
MEMINFO = "MemTotal:       16000000 kB\nMemFree:  1000 kB\nMemAvailable:   12000000 kB\n"


def _proc_reader(stats: list[str], meminfo: str) -> Any:
    """Serves successive /proc/stat texts, one per sample, and a fixed meminfo."""
    queue = list(stats)

    def read(name: str) -> str:
        if name == "stat":
            return queue.pop(0)
        assert name == "meminfo"
        return meminfo

    return read


def test_proc_parsers() -> None:
    assert parse_proc_stat(STAT_A) == CpuTimes(idle=850, total=1000)
    assert parse_meminfo(MEMINFO) == (16_000_000 * 1024, 4_000_000 * 1024)
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2\n")
    with pytest.raises(ValueError):
        parse_meminfo("MemTotal: 1 kB\n")


def test_cpu_utilization_math() -> None:
    a, b = parse_proc_stat(STAT_A), parse_proc_stat(STAT_B)
    assert cpu_utilization(a, b) == pytest.approx(0.4)
    assert cpu_utilization(None, a) == pytest.approx(0.15)  # since boot
    assert cpu_utilization(b, b) == 0.0  # no time passed: no division by zero


def test_cpu_sampler_uses_deltas_between_samples() -> None:
    cpu = CpuSampler(_proc_reader([STAT_A, STAT_B], MEMINFO))
    assert cpu.reading() is None
    cpu.sample()
    cpu.sample()
    reading = cpu.reading()
    assert reading is not None
    assert reading.utilization == pytest.approx(0.4)
    text = render(FakeRepository(), cpu=cpu, gpu=None)
    assert "# TYPE nv_cpu_utilization gauge" in text
    assert "nv_cpu_utilization 0.4" in _lines(text)
    assert f"nv_cpu_memory_total_bytes {16_000_000 * 1024}" in _lines(text)
    assert f"nv_cpu_memory_used_bytes {4_000_000 * 1024}" in _lines(text)


def test_cpu_sampler_without_proc_keeps_serving() -> None:
    def missing(name: str) -> str:
        raise FileNotFoundError(name)

    cpu = CpuSampler(missing)
    cpu.sample()
    assert cpu.reading() is None
    assert "nv_cpu" not in render(FakeRepository(), cpu=cpu, gpu=None)


# ------------------------------------------------------------------------------ GPU


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Just the pynvml calls GpuSampler makes. Device 1 cannot report power (like some boards)."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.energy_mj = [1_000_000, 5_000_000]
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.init_calls += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        if i >= self.count:
            raise FakeNvmlError("invalid index")
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:  # noqa: N802
        return int(uuid.rsplit("-", 1)[1])

    def nvmlDeviceGetUUID(self, h: int) -> str | bytes:  # noqa: N802
        return f"GPU-fake-{h}" if h == 0 else f"GPU-fake-{h}".encode()

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=[37, 100][h], memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(total=80 * 2**30, used=[2**30, 0][h], free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        if h == 1:
            raise FakeNvmlError("not supported")
        return 123_456  # mW

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:  # noqa: N802
        if h == 1:
            raise FakeNvmlError("not supported")
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:  # noqa: N802
        return self.energy_mj[h]


def test_gpu_sampler_with_fake_nvml() -> None:
    nvml = FakeNvml()
    gpu = GpuSampler(nvml, gpus=2)
    nvml.energy_mj = [1_002_500, 5_000_000]  # device 0 used 2.5 J since start
    gpu.sample()
    lines = _lines(render(FakeRepository(), cpu=None, gpu=gpu))
    for line in (
        "# TYPE nv_gpu_utilization gauge",
        'nv_gpu_utilization{gpu_uuid="GPU-fake-0"} 0.37',
        'nv_gpu_utilization{gpu_uuid="GPU-fake-1"} 1.0',
        f'nv_gpu_memory_total_bytes{{gpu_uuid="GPU-fake-0"}} {80 * 2**30}',
        f'nv_gpu_memory_used_bytes{{gpu_uuid="GPU-fake-0"}} {2**30}',
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-fake-1"} 0',
        'nv_gpu_power_usage{gpu_uuid="GPU-fake-0"} 123.456',
        'nv_gpu_power_limit{gpu_uuid="GPU-fake-0"} 700.0',
        "# TYPE nv_energy_consumption counter",
        'nv_energy_consumption{gpu_uuid="GPU-fake-0"} 2.5',
        'nv_energy_consumption{gpu_uuid="GPU-fake-1"} 0.0',
    ):
        assert line in lines, line
    # A field the device cannot report is left out, not faked as zero.
    assert not [ln for ln in lines if ln.startswith('nv_gpu_power_usage{gpu_uuid="GPU-fake-1')]
    gpu.close()
    assert nvml.init_calls == 1 and nvml.shutdown_calls == 1


def test_gpu_sampler_respects_visible_devices_and_count() -> None:
    assert [r.uuid for r in _sampled(GpuSampler(FakeNvml(), gpus=1))] == ["GPU-fake-0"]
    visible = GpuSampler(FakeNvml(), gpus=1, visible="1")
    assert [r.uuid for r in _sampled(visible)] == ["GPU-fake-1"]
    by_uuid = GpuSampler(FakeNvml(), gpus=2, visible="GPU-fake-1,MIG-xyz")
    assert [r.uuid for r in _sampled(by_uuid)] == ["GPU-fake-1"]


def _sampled(gpu: GpuSampler) -> tuple:
    gpu.sample()
    return gpu.readings()


def test_gpu_sampler_create_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError("no pynvml")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert GpuSampler.create(1) is None

    class BrokenNvml(FakeNvml):
        def nvmlInit(self) -> None:  # noqa: N802
            raise FakeNvmlError("driver not loaded")

    assert GpuSampler.create(1, BrokenNvml()) is None


# ------------------------------------------------------------------------------ server


def _options(**kw: Any) -> ServerOptions:
    return ServerOptions(metrics_address="127.0.0.1", metrics_port=0, **kw)


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_server_end_to_end() -> None:
    repo = FakeRepository(FakeModel("simple", 1, _known_stats()))
    server = MetricsServer(repo, _options(), gpus=0)
    server.start()
    try:
        port = server.port
        assert port > 0
        status, ctype, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert ctype == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert 'nv_inference_count{model="simple",version="1"} 8' in body.splitlines()
        assert "# TYPE nv_cpu_utilization gauge" in body  # sampled once at start
        assert "nv_gpu_" not in body  # gpus=0
        # Stats move between scrapes: the endpoint renders live, not a cached body.
        repo.models[0].stats.pending(5)
        body = _get(f"http://127.0.0.1:{port}/metrics?x=1")[2]
        assert 'nv_inference_pending_request_count{model="simple",version="1"} 6' in body
        assert _get(f"http://127.0.0.1:{port}/")[0] == 404
        assert _get(f"http://127.0.0.1:{port}/metricsx")[0] == 404
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as sock:  # free again: a new listener can take it (TIME_WAIT aside)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_metrics_server_option_switches_and_fake_gpu() -> None:
    nvml = FakeNvml()
    server = MetricsServer(FakeRepository(), _options(allow_cpu_metrics=False), gpus=2, nvml=nvml)
    server.start()
    try:
        body = server.render()
        assert "nv_cpu_" not in body
        assert 'nv_gpu_utilization{gpu_uuid="GPU-fake-0"} 0.37' in body.splitlines()
    finally:
        server.stop()
    assert nvml.shutdown_calls == 1
    off = MetricsServer(FakeRepository(), _options(allow_gpu_metrics=False), gpus=2, nvml=nvml)
    assert "nv_gpu_" not in off.render()
    off.stop()  # never started: still releases cleanly


def test_sampler_thread_refreshes_and_stops() -> None:
    class Counting:
        def __init__(self) -> None:
            self.samples = 0
            self.closed = False
            self.four = threading.Event()

        def sample(self) -> None:
            self.samples += 1
            if self.samples == 2:
                raise RuntimeError("one bad sample must not kill the thread")
            if self.samples >= 4:
                self.four.set()

        def close(self) -> None:
            self.closed = True

    counting = Counting()
    thread = SamplerThread([counting], interval_ms=1)
    thread.start()
    assert counting.samples >= 1  # synchronous first sample
    assert counting.four.wait(timeout=10)
    thread.stop()
    assert counting.closed
    assert not thread._thread.is_alive()


def test_metrics_server_drops_idle_and_half_sent_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slow or idle clients cannot hold threads: each connection has a read timeout, and
    scrapes keep working while many half-sent requests are open."""
    from tributary import metrics

    monkeypatch.setattr(metrics._Handler, "timeout", 0.5)
    server = MetricsServer(FakeRepository(FakeModel("simple", 1, _known_stats())), _options(), 0)
    server.start()
    socks: list[socket.socket] = []
    try:
        for _ in range(60):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /metr")  # never finished
            socks.append(s)
        assert _get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
        for s in socks:  # the server hangs up on each of them by itself
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
        server.stop()
