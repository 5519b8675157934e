"""A process's memory from /proc/<pid>/status, and a server subprocess for the benchmarks here.

Linux only and no psutil: VmRSS is what the process holds now, VmHWM its peak since start (or
since `reset_peak`, which writes "5" to /proc/<pid>/clear_refs). Values are KiB, as the kernel
reports them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_kib(pid: int) -> dict[str, int]:
    """Every `Vm*`/`Rss*` line of /proc/<pid>/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if (key.startswith("Vm") or key.startswith("Rss")) and parts and parts[-1] == "kB":
            out[key] = int(parts[0])
    return out


def rss_kib(pid: int) -> int:
    return status_kib(pid)["VmRSS"]


def peak_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had."""
    return status_kib(pid)["VmHWM"]


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0, own processes); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    status = status_kib(pid)
    return status["VmHWM"] <= status["VmRSS"] + 1024  # a little slack: RSS moves meanwhile


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs; 0 when xs do not vary."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


class Sampler:
    """Samples a process's RSS (and a caller-supplied counter) every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 1.0, counter=None) -> None:
        self.pid = pid
        self.interval = interval
        self.counter = counter or (lambda: 0)
        self.samples: list[tuple[float, int, int]] = []  # (monotonic s, RSS KiB, counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid), self.counter()))
            except (OSError, KeyError):  # the process is gone
                return
            if self._stop.wait(self.interval):
                return

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


class Server:
    """`python -m tributary.cli` on a free loopback port; ready once the port file appears."""

    def __init__(
        self,
        repositories: Sequence[Path],
        workdir: Path,
        *args: str,
        timeout: float = 120.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = workdir / "ports.json"
        self.port_file.unlink(missing_ok=True)
        self.log_path = workdir / "server.log"
        cmd = [sys.executable, "-m", "tributary.cli"]
        for repo in repositories:
            cmd += ["--model-repository", str(repo)]
        cmd += ["--grpc-address", "127.0.0.1", "--grpc-port", "0"]
        cmd += ["--metrics-address", "127.0.0.1", "--metrics-port", "0"]
        cmd += ["--http-address", "127.0.0.1", "--http-port", "0"]  # never the default 8000
        cmd += ["--port-file", str(self.port_file), *args]
        self.command = cmd
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not serving after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.port = ports["grpc_port"]
        self.http_port = ports.get("http_port")
        self.pid = self.proc.pid
        self.url = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
