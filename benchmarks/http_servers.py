"""Which HTTP server library carries HTTP/REST: two candidates on an infer-like path.

Candidates (both mature, both parse HTTP with a C parser):
  * uvicorn + httptools, serving a raw ASGI app (no framework);
  * aiohttp's low-level server (`aiohttp.web.Server`, its C parser), no router.

Each server runs in its own process on one asyncio loop and does what the infer route does
without a model: read the whole body, split it at `Inference-Header-Content-Length`, parse the
JSON header, and answer a JSON header plus a binary output as large as the input (Triton's
binary tensor extension). Clients are separate processes, each with keep-alive connections
(http.client) in threads, posting fixed bodies for a fixed time. Reported per body size:
requests/s and the server's user+system CPU (from /proc) per request.

    pip install uvicorn httptools   # the second candidate; not a dependency
    python benchmarks/http_servers.py [--seconds 5] [--clients 2] [--threads 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {"1 KB": 1024, "600 KB": 3 * 224 * 224 * 4}


def _header(size: int) -> bytes:
    head = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [1, size // 4],
                "parameters": {"binary_data_size": size},
            }
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    return json.dumps(head).encode()


def _answer(body: bytes, header_length: int) -> tuple[bytes, int]:
    head = json.loads(body[:header_length])
    data = memoryview(body)[header_length:]
    reply = json.dumps(
        {
            "model_name": "echo",
            "model_version": "1",
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": head["inputs"][0]["shape"],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
        }
    ).encode()
    return reply + bytes(data), len(reply)


# -- servers ------------------------------------------------------------------------------------


def serve_uvicorn(port: int) -> None:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        length = 0
        for key, value in scope["headers"]:
            if key == b"inference-header-content-length":
                length = int(value)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, head = _answer(b"".join(chunks), length)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", str(head).encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(
        app, host="127.0.0.1", port=port, http="httptools", loop="asyncio", log_level="error"
    )


def serve_aiohttp(port: int) -> None:
    import asyncio

    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        length = int(request.headers.get("Inference-Header-Content-Length", "0"))
        body, head = _answer(await request.read(), length)
        return web.Response(
            body=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(head),
            },
        )

    async def main() -> None:
        server = web.Server(handler)
        runner = web.ServerRunner(server, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


SERVERS = {"uvicorn+httptools (ASGI)": serve_uvicorn, "aiohttp (web.Server)": serve_aiohttp}


# -- clients ------------------------------------------------------------------------------------


def _client(port: int, size: int, seconds: float, threads: int, out: Any) -> None:
    import threading

    head = _header(size)
    body = head + bytes(size)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while time.monotonic() < stop:
            conn.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            counts[i] += 1
        conn.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(sum(counts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def measure(name: str, size: int, args: argparse.Namespace) -> tuple[float, float]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", name, "--port", str(port)],
    )
    try:
        _wait(port)
        _run_clients(port, size, 1.0, args)  # warm-up
        cpu0 = _cpu(proc.pid)
        t0 = time.monotonic()
        done = _run_clients(port, size, args.seconds, args)
        elapsed = time.monotonic() - t0
        cpu = _cpu(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait()
    return done / elapsed, cpu / done * 1e6


def _run_clients(port: int, size: int, seconds: float, args: argparse.Namespace) -> int:
    out: Any = mp.Queue()
    procs = [
        mp.Process(target=_client, args=(port, size, seconds, args.threads, out))
        for _ in range(args.clients)
    ]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="connections per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.port)
        return 0
    print("| server | body | requests/s | server CPU µs/request |")
    print("| --- | --- | ---: | ---: |")
    for label, size in SIZES.items():
        for name in SERVERS:
            runs = sorted(measure(name, size, args) for _ in range(args.rounds))
            rate, cpu = runs[len(runs) // 2]
            print(f"| {name} | {label} | {rate:,.0f} | {cpu:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
