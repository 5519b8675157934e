"""ModelStreamInfer's machinery: admission, one reader and one writer per stream, shutdown.

A sync gRPC server holds a thread per open stream for its whole life, so streams are counted
and capped here (`--grpc-max-streams`; `tributary.rpcs` runs them on a pool of their own).
Each stream has a reader thread that takes requests and starts them (the servicer's
`start_one`), and the handler's own thread, which writes replies in request order. Ordering
is a queue of `Slot`s, one per request, each answered exactly once. Flow control: at most
`--grpc-stream-max-pending` replies may be running or unsent; at the limit the reader stops
reading, and HTTP/2 flow control then holds the client. A stream leaves the count the moment
its RPC ends (the writer stops waiting within `_POLL_S`); at shutdown `close_all` lets every
stream answer what it already took, then end with UNAVAILABLE. See docs/limits.md.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tributary_client._proto import grpc_service_pb2 as pb

from . import memory
from .errors import Cancelled, InferenceError, ResourceExhausted, Unavailable, clip_message
from .wire import stream_response_bytes

log = logging.getLogger("tributary.streams")

_POLL_S = 0.25
"""How often a waiting reader or writer looks whether its stream ended."""

StartOne = Callable[[bytes, "Slot", Callable[[], bool]], None]
"""Starts one streamed request: (request bytes, its slot, the call's is_active)."""


class Slot:
    """One streamed request's place in the reply order: the serialized reply, once known."""

    __slots__ = ("_done", "_response")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._response = b""

    def succeed(self, head: Any, raws: list[bytes | memoryview]) -> None:
        head.parameters["triton_final_response"].bool_param = True
        self._response = stream_response_bytes(head, raws)
        self._done.set()

    def fail(self, exc: InferenceError, request: Any = None) -> None:
        reply = pb.ModelStreamInferResponse(error_message=clip_message(exc.message))
        if request is not None:
            reply.infer_response.id = request.id
            reply.infer_response.model_name = request.model_name
            reply.infer_response.model_version = request.model_version
        reply.infer_response.parameters["triton_final_response"].bool_param = True
        self._response = reply.SerializeToString()
        self._done.set()

    def wait(self, timeout: float) -> bytes | None:
        """The reply, or None if it is not ready within `timeout` seconds."""
        return self._response if self._done.wait(timeout) else None


_CLOSE = object()
"""Put in a stream's queue at shutdown: answer what came before it, then end the stream."""


def _no_callback(_fn: Callable[[], None]) -> None:
    """Streams trim when a large request arrives only (their replies have no end callback)."""


class _Stream:
    """One open ModelStreamInfer: replies in request order and a window of pending ones."""

    def __init__(self, max_pending: int) -> None:
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.room = threading.Semaphore(max_pending)
        self.closed = threading.Event()  # stop reading requests (shutdown, or the RPC ended)
        self.ended = threading.Event()  # the RPC is over: nobody will read another reply

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.replies.put(_CLOSE)

    def wait_for_room(self) -> bool:
        """Block while the client has `max_pending` replies outstanding; False once closed."""
        while not self.room.acquire(timeout=_POLL_S):
            if self.closed.is_set():
                return False
        return not self.closed.is_set()


class Streams:
    """The open streams of one server."""

    def __init__(self, *, max_streams: int, max_pending: int, exiting: Callable[[], bool]) -> None:
        self._max_streams = max_streams
        self._max_pending = max_pending
        self._exiting = exiting
        self._open: set[_Stream] = set()
        self._lock = threading.Lock()

    def serve(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext, start: StartOne
    ) -> Iterator[bytes]:
        """The handler's body: admit, start the reader, write replies in order."""
        stream = self._admit(context)
        ended_by_server = False
        try:
            reader = threading.Thread(
                target=self._read,
                args=(stream, request_iterator, context.is_active, start),
                name="stream-reader",
                daemon=True,
            )
            try:
                reader.start()
            except RuntimeError as exc:  # the process is out of threads
                raise ResourceExhausted(f"cannot serve another stream now: {exc}") from None
            while (slot := stream.replies.get()) is not None:
                if slot is _CLOSE:
                    ended_by_server = True
                    break
                while (data := slot.wait(_POLL_S)) is None:
                    if stream.ended.is_set():  # the client left: its work finishes unread
                        return
                yield data
                stream.room.release()
        finally:
            self._forget(stream)
        if ended_by_server:
            raise Unavailable("Server exiting")  # tributary.rpcs answers it

    def close_all(self) -> None:
        """Shutdown: every open stream answers what it already took, then ends (UNAVAILABLE)."""
        with self._lock:
            streams = list(self._open)
        for stream in streams:
            stream.close()

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def _admit(self, context: grpc.ServicerContext) -> _Stream:
        """Count a new stream, or refuse it. A handler that grpcio ran after its call ended
        (it waited for a pool thread) is not counted at all."""
        with self._lock:
            if self._exiting():
                raise Unavailable("Server exiting")
            if len(self._open) >= self._max_streams:
                raise ResourceExhausted(
                    f"too many open ModelStreamInfer streams: the server allows "
                    f"{self._max_streams} (--grpc-max-streams)"
                )
            stream = _Stream(self._max_pending)
            self._open.add(stream)
        if not context.is_active() or not context.add_callback(lambda: self._forget(stream)):
            self._forget(stream)
            raise Cancelled("the stream ended before it was served")
        return stream

    def _forget(self, stream: _Stream) -> None:
        with self._lock:
            self._open.discard(stream)
        stream.closed.set()
        stream.ended.set()

    @staticmethod
    def _read(
        stream: _Stream,
        request_iterator: Iterator[bytes],
        is_active: Callable[[], bool],
        start: StartOne,
    ) -> None:
        try:
            for data in request_iterator:
                if not stream.wait_for_room():
                    break
                memory.large_request(len(data), _no_callback)
                slot = Slot()
                stream.replies.put(slot)
                start(data, slot, is_active)
        except Exception:  # noqa: BLE001 - client went away mid-stream
            log.debug("stream reader ended", exc_info=True)
        finally:
            stream.replies.put(None)
