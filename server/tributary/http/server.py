"""The HTTP/REST listener: aiohttp's low-level server on asyncio loops in their own threads.

`bind` opens the socket at start-up, before any model loads (a taken port fails there, in
one line, as for gRPC); `start` serves it once the models are loaded; `stop` drains: the
listening socket closes, requests in flight finish within the exit timeout, idle
keep-alive connections close. `--http-thread-count` event loops share the one listening
socket (each its own duplicate of it); the gRPC server keeps its own thread pool.

aiohttp was chosen by measurement (benchmarks/http_servers.py): it parses HTTP in C, and on
image-sized bodies it needed half the CPU per request of uvicorn with httptools. It is used
without its router or body helpers: `tributary.http.routes` does the routing and reads
bodies within --http-max-input-size itself; header and line sizes are left to aiohttp's
limits (8 KiB per line and field, 128 fields).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..constants import DEFAULT_HTTP_MAX_CONNECTIONS
from ..dataplane import DataPlane
from ..restrict import Restriction
from .routes import Routes

log = logging.getLogger("tributary.http")

BACKLOG = 1024  # tritonserver's listen backlog
KEEPALIVE_S = 75.0
"""An idle keep-alive connection is closed after this long (aiohttp's default is an hour, which
lets idle clients hold sockets and buffers long after they are gone)."""


class HttpServer:
    """One HTTP/REST front end over a `DataPlane`."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        address: str,
        port: int,
        threads: int,
        max_input_size: int,
        max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS,
        reuse_port: bool = False,
        drain_timeout: float = 30.0,
        restricted: Mapping[str, Restriction] | None = None,
    ) -> None:
        self.address, self.port, self.threads = address, port, max(1, threads)
        self.reuse_port = reuse_port
        self.drain_timeout = drain_timeout
        self.routes = Routes(dataplane, max_input_size=max_input_size, restricted=restricted)
        self.connections = _ConnectionCap(max_connections)
        self._sock: socket.socket | None = None
        self._loops: list[tuple[asyncio.AbstractEventLoop, web.ServerRunner]] = []
        self._threads: list[threading.Thread] = []

    def bind(self) -> int:
        """Open the listening socket; returns the bound port. Raises OSError (port taken,
        address not available), which the composition root reports in one line."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.address, self.port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        return self.port

    def start(self) -> None:
        """Serve the bound socket on `threads` event loops; returns once all are serving."""
        assert self._sock is not None, "bind() first"
        for i in range(self.threads):
            started = threading.Event()
            sock = self._sock.dup()
            thread = threading.Thread(
                target=self._serve, args=(sock, started), name=f"http-{i}", daemon=True
            )
            thread.start()
            started.wait()
            self._threads.append(thread)
        self._sock.close()  # each loop holds its own duplicate

    def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def open_site() -> web.ServerRunner:
            server = _CappedServer(
                self.connections,
                self.routes.handle,
                auto_decompress=False,
                access_log=None,
                keepalive_timeout=KEEPALIVE_S,
            )
            runner = web.ServerRunner(
                server, handle_signals=False, shutdown_timeout=self.drain_timeout
            )
            await runner.setup()
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
            return runner

        try:
            self._loops.append((loop, loop.run_until_complete(open_site())))
        except BaseException:
            log.exception("HTTP event loop could not start")
            loop.close()
            return
        finally:
            started.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish for up to the drain timeout (the
        server's --exit-timeout-secs), close connections, end the loops."""
        if self._sock is not None and not self._threads:
            self._sock.close()  # bound but never started (start-up failed)
            return
        waits = []
        for loop, runner in self._loops:
            waits.append(asyncio.run_coroutine_threadsafe(runner.cleanup(), loop))
        for wait in waits:
            try:
                wait.result(self.drain_timeout + 5.0)
            except Exception:
                log.exception("HTTP server shutdown")
        for loop, _ in self._loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in self._threads:
            thread.join(5.0)
        self.routes.close()


class _ConnectionCap:
    """Open connections over every event loop, at most `limit` (--http-max-connections)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                self.refused += 1
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1


class _CappedServer(web.Server):
    """aiohttp's low-level server, closing a connection past the cap as soon as it is
    accepted: without a cap, idle or slowly-sent requests could hold sockets until the
    process ran out of file descriptors, and with it gRPC, model loads and the log."""

    def __init__(self, cap: _ConnectionCap, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cap = cap
        self._counted: set[object] = set()

    def connection_made(self, handler: Any, transport: Any) -> None:
        super().connection_made(handler, transport)
        if self._cap.take():
            self._counted.add(handler)
            return
        if self._cap.refused % 1000 == 1:  # the first, then one line per 1,000
            log.warning(
                "HTTP connection refused: %d open, the server allows %d "
                "(--http-max-connections); %d refused so far",
                self._cap.open,
                self._cap.limit,
                self._cap.refused,
            )
        # after aiohttp's handler has started (closing it inside this call would end the
        # connection before its task exists, which aiohttp asserts against)
        asyncio.get_running_loop().call_soon(transport.abort)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if handler in self._counted:
            self._counted.discard(handler)
            self._cap.give_back()
