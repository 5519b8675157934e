"""One benchmark run, side by side: the floor, the inline server, Tributary and its peers.

Everything is measured in the same invocation on the same machine, one server process at a
time, back to back, and reported as ratios (absolute numbers move with the machine):

- in-process ONNX Runtime on `mlp` (the model's own cost; batch 64 sets the machine limit),
- the echo floor (echo_server.py: a 16-thread sync grpcio server, no model),
- the inline server (inline_server.py: the same server calling session.run per request),
- Tributary,
- the peers a user would pick instead, each in its own venv under benchmarks/work/peers/,
  installed here from pinned requirements (benchmarks/peers/*.txt): KServe's ModelServer,
  MLServer with adaptive batching, and Triton through PyTriton with dynamic batching.

Every server serves the same ONNX files (simple, mlp, big), is checked against in-process ONNX
Runtime on a fixed input before it is measured, and is driven by perf_analyzer over gRPC. Per
cell: infer/s, p50, p99, the server process tree's CPU µs per request (user+system from /proc
over the perf_analyzer run) and, where the server reports ModelStatistics, the executed batch
sizes. Writes raw JSON under benchmarks/out/ and rewrites run.py's own section of
benchmarks/RESULTS.md (between its markers; other scripts' sections are kept).

    PERF_ANALYZER=/path/to/perf_analyzer python benchmarks/run.py            # the full run
    python benchmarks/run.py --quick                                         # ~2 minutes
    python benchmarks/run.py --servers floor,kserve --interval 1000 --trials 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
WORK = HERE / "work"
PEERS = HERE / "peers"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(HERE))

from results_md import NAMES, PEER_PACKAGE  # noqa: E402

from tributary_client._proto import grpc_service_pb2 as pb  # noqa: E402
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tributary_client._proto import model_config_pb2 as mc  # noqa: E402

BIG_SHAPE = [3, 224, 224]
BIG_BYTES = 3 * 224 * 224 * 4


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    concurrency: int

    @property
    def key(self) -> str:
        b = f"-b{self.batch}" if self.batch != 1 else ""
        return f"{self.model}{b}-c{self.concurrency}"


# The cells, in table order.
CASES = [
    *(Case("simple", 1, c) for c in (1, 8, 32)),
    *(Case("mlp", 1, c) for c in (1, 8, 32, 64)),
    Case("mlp", 8, 16),
    Case("big", 1, 8),
]
QUICK_CASES = [Case("simple", 1, 8), Case("mlp", 1, 32)]
# Tributary only: the same graph without dynamic batching, for CPU per inference with and
# without the batcher; and `mlp_ortdefault`, the batched mlp with the inline server's ONNX
# Runtime session options (ORT's defaults: a thread per core, spinning), so that the c=1
# comparison with the inline server measures the batcher and not the thread settings.
EXTRA_TRIBUTARY = [
    Case("mlp_nobatch", 1, 1),
    Case("mlp_nobatch", 1, 32),
    Case("mlp_ortdefault", 1, 1),
    Case("mlp_ortdefault", 1, 32),
]
SERVERS = ["floor", "inline", "tributary", "kserve", "mlserver", "pytriton"]
PEER_NAMES = ["kserve", "mlserver", "pytriton"]
QUICK_SERVERS = ["floor", "inline", "tributary", "kserve"]


def pa_flags(interval_ms: int, trials: int) -> list[str]:
    return [
        "-i",
        "grpc",
        "--measurement-interval",
        str(interval_ms),
        "--max-trials",
        str(trials),
        "--stability-percentage",
        "999",
        "--input-data",
        "zero",
        "--percentile=99",
    ]


def perf_analyzer() -> str:
    path = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not path:
        sys.exit("perf_analyzer not found: pip install perf-analyzer, or set $PERF_ANALYZER")
    return path


# ---------------------------------------------------------------------------------------------
# Models


def build_repo(repo: Path) -> None:
    import build_models as bm
    from onnx import TensorProto, helper, numpy_helper

    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    bm.build_simple(repo)
    bm.build_mlp(repo)
    # One instance: two would each hold the 15 MB of weights and evict each other from the
    # cache (measured: c=1 p50 1020 -> 819 us, c=32 +3%). Its intra-op threads are the
    # server's default (the CPUs less one for the front end, docs/model-config.md).
    with (repo / "mlp" / "config.pbtxt").open("a") as f:
        f.write("\ninstance_group [ { kind: KIND_CPU, count: 1 } ]\n")
    # The same model with ONNX Runtime's own defaults, as the inline server runs it:
    # intra_op_num_threads 0 (ORT picks one per physical core) and a spinning pool.
    shutil.copytree(repo / "mlp", repo / "mlp_ortdefault")
    cfg = (repo / "mlp" / "config.pbtxt").read_text()
    cfg = cfg.replace('name: "mlp"', 'name: "mlp_ortdefault"')
    cfg += (
        'parameters { key: "intra_op_thread_count" value: { string_value: "0" } }\n'
        'parameters { key: "session.intra_op.allow_spinning" value: { string_value: "1" } }\n'
    )
    (repo / "mlp_ortdefault" / "config.pbtxt").write_text(cfg)
    # The same graph without dynamic batching, to compare server CPU per inference.
    shutil.copytree(repo / "mlp", repo / "mlp_nobatch")
    cfg = (repo / "mlp" / "config.pbtxt").read_text()
    cfg = cfg.replace('name: "mlp"', 'name: "mlp_nobatch"')
    cfg = cfg[: cfg.index("dynamic_batching")] if "dynamic_batching" in cfg else cfg
    cfg += "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
    (repo / "mlp_nobatch" / "config.pbtxt").write_text(cfg)
    # `big`: ResNet-shaped FP32 [3,224,224] in and out, OUTPUT0 = INPUT0 + 0 (an Add, so ONNX
    # Runtime cannot hand back its input); no batching. The payload, not the model, is the cost.
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "Z")
    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "Z"], ["OUTPUT0"])],
        "big",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, BIG_SHAPE)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, BIG_SHAPE)],
        initializer=[zero],
    )
    dims = ", ".join(map(str, BIG_SHAPE))
    config = (
        'name: "big"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        f'input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ {dims} ] }} ]\n'
    )
    bm.write_model(repo, "big", bm.make_model(graph), config)


def model_config(repo: Path, name: str) -> mc.ModelConfig:
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
    config.name = config.name or name
    return config


def peer_spec(repo: Path, models: list[str], ports: dict[str, int], path: Path) -> None:
    """The JSON the peer servers read (benchmarks/peers/common.py): same files, same windows."""
    from mini_server import DATATYPE

    entries = []
    for name in models:
        config = model_config(repo, name)
        blob = path.parent / f"{name}.modelconfig.bin"
        blob.write_bytes(pb.ModelConfigResponse(config=config).SerializeToString())
        batching = config.HasField("dynamic_batching")
        entries.append(
            {
                "name": name,
                "onnx": str(repo / name / "1" / "model.onnx"),
                "max_batch_size": config.max_batch_size,
                # Dynamic batching where the model has it in Tributary, with the same window.
                "dynamic_batching": batching,
                "max_queue_delay_us": (
                    config.dynamic_batching.max_queue_delay_microseconds if batching else 0
                ),
                "inputs": [
                    {"name": t.name, "datatype": DATATYPE[t.data_type], "dims": list(t.dims)}
                    for t in config.input
                ],
                "outputs": [
                    {"name": t.name, "datatype": DATATYPE[t.data_type], "dims": list(t.dims)}
                    for t in config.output
                ],
                "config_response": str(blob),
            }
        )
    path.write_text(json.dumps({**ports, "models": entries}, indent=2))


def fixed_inputs(config: mc.ModelConfig) -> dict[str, np.ndarray]:
    """A deterministic, non-trivial input per tensor (2 rows where the model batches)."""
    from mini_server import DATATYPE, NUMPY

    rng = np.random.default_rng(12)
    rows = [2] if config.max_batch_size > 0 else []
    out = {}
    for t in config.input:
        dtype = np.dtype(NUMPY[DATATYPE[t.data_type]])
        shape = rows + list(t.dims)
        if dtype.kind == "f":
            out[t.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[t.name] = rng.integers(-50, 50, shape).astype(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# In-process ONNX Runtime


def in_process(model: Path, batches: list[int], seconds: float = 1.5) -> dict[int, dict]:
    """Rows/s and per-run latency of plain ORT (default session options) at each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    results = {}
    for b in batches:
        x = np.zeros((b, 512), dtype=np.float32)
        for _ in range(20):
            session.run(None, {name: x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t)
        results[b] = {
            "rows_per_s": b * len(times) / sum(times),
            "p50_us": statistics.median(times) * 1e6,
        }
    return results


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server in its own process group, ready once ServerReady and every ModelReady say so.

    CPU is user+system summed over the server and whatever it spawned (tritonserver and its
    Python stubs, MLServer's inference workers), read from /proc.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        models: list[str],
        log: Path,
        *,
        port: int | None = None,
        port_file: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 240,
    ) -> None:
        self.name = name
        if port_file is not None:
            port_file.unlink(missing_ok=True)
        self.log = log
        self.proc = subprocess.Popen(
            cmd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        try:
            if port_file is not None:
                while not port_file.exists():
                    self._check(deadline)
                    time.sleep(0.05)
                port = json.loads(port_file.read_text())["grpc_port"]
            assert port is not None
            self.port = port
            self.channel = grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", 2**31 - 1)],
            )
            self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
            while not self._ready(models):
                self._check(deadline)
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{self.name} not ready in time; see {self.log}")

    def _ready(self, models: list[str]) -> bool:
        try:
            if not self.stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                return False
            return all(
                self.stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=2).ready for m in models
            )
        except grpc.RpcError:
            return False

    def cpu_seconds(self) -> float:
        """User+system seconds of the server and every live process it spawned.

        Descendants by parent pid, plus anything in the server's process group (a grandchild
        whose parent exited is re-parented but stays in the group).
        """
        procs: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, pgrp, ticks)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
            pid = int(stat.parent.name)
            procs[pid] = (int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]))
        tree = {self.proc.pid} | {p for p, (_, pgrp, _) in procs.items() if pgrp == self.proc.pid}
        grew = True
        while grew:
            more = {p for p, (ppid, _, _) in procs.items() if ppid in tree} - tree
            tree |= more
            grew = bool(more)
        return sum(procs[p][2] for p in tree if p in procs) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if hasattr(self, "channel"):
            self.channel.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        self.proc.wait()

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mini_server import NUMPY

        datatype = {np.dtype(v): k for k, v in NUMPY.items()}
        request = pb.ModelInferRequest(model_name=model, id="check")
        for name, value in inputs.items():
            request.inputs.add(name=name, datatype=datatype[value.dtype], shape=value.shape)
            request.raw_input_contents.append(value.tobytes())
        response = self.stub.ModelInfer(request, timeout=30)
        return {
            out.name: _decode_output(response, i, NUMPY[out.datatype])
            for i, out in enumerate(response.outputs)
        }

    def statistics(self, model: str) -> pb.ModelStatisticsResponse | None:
        try:
            return self.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
        except grpc.RpcError:
            return None


_CONTENTS = {"f": "fp32_contents", "i": "int_contents", "u": "uint_contents", "b": "bool_contents"}


def _decode_output(response: pb.ModelInferResponse, i: int, dtype: Any) -> np.ndarray:
    out = response.outputs[i]
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(out.shape)
    kind = np.dtype(dtype).kind
    field_name = _CONTENTS[kind]
    if np.dtype(dtype) in (np.dtype(np.int64),):
        field_name = "int64_contents"
    elif np.dtype(dtype) == np.dtype(np.float64):
        field_name = "fp64_contents"
    values = getattr(out.contents, field_name)
    return np.asarray(values, dtype=dtype).reshape(out.shape)


def peer_python(name: str) -> Path:
    return WORK / "peers" / name / "venv" / "bin" / "python"


def install_peer(name: str) -> dict[str, Any]:
    """Create the peer's venv from benchmarks/peers/<name>.txt (exact pins) unless it matches.

    Returns the install status for the report: ok, the pinned versions that matter, or why not.
    """
    req = PEERS / f"{name}.txt"
    venv = WORK / "peers" / name / "venv"
    stamp = venv / ".requirements"
    log = WORK / "peers" / name / "install.log"
    wanted = req.read_text()
    if not (stamp.exists() and stamp.read_text() == wanted):
        print(f"installing {name} into {venv} (a few minutes)", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-r", str(req)]
        with log.open("wb") as f:
            for step in ([sys.executable, "-m", "venv", str(venv)], pip):
                done = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    return {"ok": False, "why": f"`{' '.join(step[1:4])}` failed; see {log}"}
        stamp.write_text(wanted)
    pins = dict(
        line.split("==", 1) for line in wanted.splitlines() if "==" in line and line[0] != "#"
    )
    keep = (PEER_PACKAGE[name], "onnxruntime", "grpcio", "numpy", "uvloop")
    return {"ok": True, "versions": {k: v for k, v in pins.items() if k in keep}}


def start_server(name: str, repo: Path, models: list[str], workers: int) -> Server:
    py = sys.executable
    log = OUT / f"server-{name}.log"
    if name in ("floor", "inline"):
        script = "echo_server.py" if name == "floor" else "inline_server.py"
        pf = OUT / f"{name}.port.json"
        cmd = [py, str(HERE / script), str(repo), str(pf), "--workers", str(workers)]
        return Server(name, cmd, models, log, port_file=pf)
    if name == "tributary":
        pf = OUT / "tributary.port.json"
        cmd = [
            py,
            "-m",
            "tributary.cli",
            "--model-repository",
            str(repo),
            "--grpc-port",
            "0",
            "--grpc-address",
            "127.0.0.1",
            "--allow-metrics=false",
            "--allow-http=false",
            "--port-file",
            str(pf),
        ]
        return Server(name, cmd, models, log, port_file=pf)
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    spec = OUT / f"{name}-spec.json"
    peer_spec(repo, models, ports, spec)
    script = PEERS / f"{name}_server.py"
    return Server(
        name,
        [str(peer_python(name)), str(script), str(spec)],
        models,
        log,
        port=ports["grpc_port"],
        env={"PYTHONPATH": str(PEERS)},
    )


# ---------------------------------------------------------------------------------------------
# Measuring


def check_outputs(server: Server, repo: Path, models: list[str]) -> dict[str, Any]:
    """The server's outputs for a fixed input against in-process ONNX Runtime's."""
    import onnxruntime as ort

    worst = 0.0
    for name in models:
        config = model_config(repo, name)
        inputs = fixed_inputs(config)
        session = ort.InferenceSession(
            str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in config.output]
        want = dict(zip(names, session.run(names, inputs), strict=True))
        try:
            got = server.infer(name, inputs)
        except grpc.RpcError as e:
            return {"ok": False, "why": f"{name}: {e.code().name} {e.details()}"}
        for out, expected in want.items():
            if out not in got or got[out].shape != expected.shape:
                shape = got[out].shape if out in got else None
                return {"ok": False, "why": f"{name}.{out}: shape {shape} != {expected.shape}"}
            if not np.allclose(got[out], expected, rtol=1e-5, atol=1e-5):
                diff = float(np.max(np.abs(got[out].astype(np.float64) - expected)))
                return {"ok": False, "why": f"{name}.{out}: max |diff| {diff:g}"}
            worst = max(worst, float(np.max(np.abs(got[out].astype(np.float64) - expected))))
    return {"ok": True, "max_abs_diff": worst}


class UnstableError(RuntimeError):
    """perf_analyzer found no stable window (worth one retry with longer windows)."""


def pa_run(pa: str, flags: list[str], case: Case, port: int, tag: str) -> dict:
    report = OUT / f"pa-{tag}.csv"
    report.unlink(missing_ok=True)
    cmd = [
        pa,
        "-m",
        case.model,
        "-u",
        f"127.0.0.1:{port}",
        "-b",
        str(case.batch),
        "--concurrency-range",
        str(case.concurrency),
        *flags,
        "-f",
        str(report),
    ]
    if case.model == "big":
        # perf_analyzer 2.60 keeps ~1 MB per `big` request until it exits (RSS grew ~2 GB in
        # 5 s against the floor at 400 req/s), so this case runs short windows.
        i = cmd.index("--measurement-interval") + 1
        cmd[i] = str(min(int(cmd[i]), BIG_WINDOW_MS))
    log = OUT / f"pa-{tag}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        peak = _watch(proc, timeout=600)
    text = log.read_text()
    if peak > PA_RSS_LIMIT:
        raise RuntimeError(f"perf_analyzer stopped at {peak >> 20} MiB RSS ({tag})")
    if proc.returncode != 0 or not report.exists():
        error = UnstableError if "Failed to obtain stable measurement" in text else RuntimeError
        raise error(f"perf_analyzer failed ({tag}):\n{text[-2000:]}")
    with report.open() as f:
        row = next(csv.DictReader(f))
    return {
        "cmd": " ".join(cmd),
        "infer_per_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
        "pa_peak_rss_mib": peak >> 20,
    }


PA_RSS_LIMIT = 6 << 30
BIG_WINDOW_MS = 500


def _watch(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for perf_analyzer, killing it past PA_RSS_LIMIT or `timeout`; returns peak RSS."""
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = next(int(x.split()[1]) << 10 for x in status.splitlines() if x[:6] == "VmRSS:")
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > PA_RSS_LIMIT or time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.2)
    return peak


def server_counts(server: Server, model: str) -> tuple[int, dict[int, int]] | None:
    """(requests, {batch size: executions}) from ModelStatistics, where the server has it."""
    stats = server.statistics(model)
    if stats is None or not stats.model_stats:
        return None
    s = stats.model_stats[0]
    requests = s.inference_stats.success.count
    batches = {b.batch_size: b.compute_infer.count for b in s.batch_stats}
    return requests, batches


def measure(pa: str, flags: list[str], server: Server, case: Case) -> dict:
    tag = f"{server.name}-{case.key}"
    for attempt in (1, 2):
        before = server_counts(server, case.model)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        try:
            r = pa_run(pa, flags, case, server.port, tag)
            break
        except UnstableError:
            if attempt == 2:
                raise
            # One noisy window (a stall on a shared machine) fails the whole cell even at
            # --stability-percentage 999; one retry with windows twice as long.
            print(f"  {tag}: no stable measurement; retrying with 2x windows", flush=True)
            i = flags.index("--measurement-interval") + 1
            flags = [*flags[:i], str(2 * int(flags[i])), *flags[i + 1 :]]
    r["attempts"] = attempt
    r["server_cpu_s"] = server.cpu_seconds() - cpu0
    r["wall_s"] = time.monotonic() - t0
    after = server_counts(server, case.model)
    # Without server statistics: the measured rate over the whole perf_analyzer run, which
    # includes its start-up (~0.1-0.5 s without load), so slightly more requests than were sent.
    requests: float = r["infer_per_s"] / case.batch * r["wall_s"]
    r["requests_from"] = "perf_analyzer rate x run time"
    if before is not None and after is not None and after[0] > before[0]:
        requests = after[0] - before[0]
        r["requests_from"] = "server statistics"
        batches = {k: v - before[1].get(k, 0) for k, v in sorted(after[1].items())}
        batches = {k: v for k, v in batches.items() if v}
        if batches:
            r["batches"] = batches
            executions = sum(batches.values())
            r["mean_batch"] = sum(k * v for k, v in batches.items()) / executions
    r["requests"] = requests
    r["cpu_us_per_request"] = r["server_cpu_s"] / requests * 1e6 if requests else 0.0
    if case.model == "big":
        r["payload_mb_per_s"] = r["infer_per_s"] * BIG_BYTES / 1e6
    print(
        f"  {tag:28s} {r['infer_per_s']:9.1f} infer/s  p50 {r['p50_us']:8.0f} us  "
        f"p99 {r['p99_us']:8.0f} us  cpu {r['cpu_us_per_request']:6.0f} us/req",
        flush=True,
    )
    return r


def run_server(
    name: str, pa: str, flags: list[str], repo: Path, cases: list[Case], workers: int
) -> dict[str, Any]:
    models = sorted({c.model for c in cases})
    entry: dict[str, Any] = {"cells": {}}
    print(NAMES[name], flush=True)
    try:
        server = start_server(name, repo, models, workers)
    except Exception as e:  # noqa: BLE001 - a peer that cannot start is reported, not fatal
        entry["error"] = f"did not start: {e}"
        print(f"  {entry['error']}", flush=True)
        return entry
    try:
        entry["idle_rss_mib"] = server.rss_mib()
        if name != "floor":
            entry["check"] = check_outputs(server, repo, models)
            print(f"  correctness: {entry['check']}", flush=True)
            if not entry["check"]["ok"]:
                entry["error"] = f"wrong outputs: {entry['check']['why']}"
                return entry
        for case in cases:
            try:
                entry["cells"][case.key] = measure(pa, flags, server, case)
            except Exception as e:  # noqa: BLE001 - one failing cell leaves the others
                entry["cells"][case.key] = {"error": str(e).strip().splitlines()[-1]}
                print(f"  {case.key}: {e}", flush=True)
    finally:
        server.stop()
    return entry


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="simple c=8 and mlp c=32 on floor, inline, tributary and KServe (~2 minutes)",
    )
    parser.add_argument("--servers", help=f"comma-separated subset of {','.join(SERVERS)}")
    parser.add_argument("--cases", help="comma-separated case keys, e.g. simple-c8,mlp-b8-c16")
    parser.add_argument("--interval", type=int, help="perf_analyzer window, ms (default 3000)")
    parser.add_argument(
        "--trials", type=int, help="perf_analyzer max trials (default 6; at least 3)"
    )
    parser.add_argument("--workers", type=int, default=16, help="floor/inline gRPC threads")
    parser.add_argument(
        "--note",
        help="a line put at the top of the RESULTS.md section (e.g. 'harness verification')",
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=HERE / "RESULTS.md",
        help="the file whose run.py section is rewritten",
    )
    opts = parser.parse_args()
    pa = perf_analyzer()
    servers = opts.servers.split(",") if opts.servers else QUICK_SERVERS if opts.quick else SERVERS
    unknown = set(servers) - set(SERVERS)
    if unknown:
        sys.exit(f"unknown servers: {sorted(unknown)}")
    cases = QUICK_CASES if opts.quick else CASES
    if opts.cases:
        wanted = opts.cases.split(",")
        cases = [c for c in CASES + EXTRA_TRIBUTARY if c.key in wanted]
    interval = opts.interval or (2000 if opts.quick else 3000)
    # perf_analyzer judges stability over the last 3 passes: with fewer it always fails.
    trials = max(3, opts.trials or (3 if opts.quick else 6))
    flags = pa_flags(interval, trials)

    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    build_repo(repo)
    res: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "load_before": os.getloadavg()[0],
        },
        "versions": _own_versions(),
        "cases": [c.key for c in cases],
        "pa_flags": flags,
        "servers": {},
        "peers": {},
    }
    for name in servers:
        if name in PEER_NAMES:
            res["peers"][name] = install_peer(name)

    print("in-process ONNX Runtime (mlp)", flush=True)
    res["inproc"] = in_process(repo / "mlp" / "1" / "model.onnx", [1, 2, 4, 8, 16, 32, 64])
    for b, r in res["inproc"].items():
        print(f"  batch {b:3d}: {r['rows_per_s']:9.0f} rows/s  p50 {r['p50_us']:7.0f} us")

    for name in servers:
        peer = res["peers"].get(name)
        if peer is not None and not peer["ok"]:
            res["servers"][name] = {"cells": {}, "error": f"not installed: {peer['why']}"}
            continue
        own = cases + (EXTRA_TRIBUTARY if name == "tributary" and not opts.quick else [])
        if opts.cases:
            own = cases if name == "tributary" else [c for c in cases if c in CASES]
        res["servers"][name] = run_server(name, pa, flags, repo, own, opts.workers)
        (OUT / "results.json").write_text(json.dumps(res, indent=2))

    res["machine"]["load_after"] = os.getloadavg()[0]
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    command = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
    write_results(res, command, opts.results_md, opts.note)
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _own_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("tributary", "grpcio", "onnxruntime-gpu", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def write_results(res: dict, command: str, path: Path, note: str | None) -> None:
    from results_md import render, replace_section

    section = render(res, command, note)
    path.write_text(replace_section(path.read_text() if path.exists() else "", section))
    print(f"wrote the run.py section of {path}")


if __name__ == "__main__":
    sys.exit(main())
