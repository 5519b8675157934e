"""HTTP/REST v2 routes: each maps a path to one data plane call, through `translate`.

One error boundary (`Routes.handle`): an `InferenceError` becomes `{"error": message}` with
Triton's HTTP status (`translate.http_status`); anything else is our bug, logged once with a
reference (`dataplane.internal_error`) and answered 500. Bodies are read here with their
bounds (`--http-max-input-size` from Content-Length before reading, and while decompressing),
so a hostile size costs nothing (docs/limits.md#httprest).

Inference goes through `DataPlane.submit`: the request is parsed on the event loop (bodies of
`OFF_LOOP_BYTES` or more, and compressed ones, on a small parse pool, so a large JSON body
cannot stall the loop), runs on the scheduler's threads, and its completion is handed back to
the loop with `call_soon_threadsafe`; no thread of ours waits for a model.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..dataplane import DataPlane, InferResult, internal_error
from ..errors import InferenceError, InvalidArgument, clip_message
from ..restrict import Restriction
from . import translate as tr

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"

OFF_LOOP_BYTES = 64 << 10
"""Infer bodies (and replies) from this size on are parsed (encoded) on the parse pool, not on
the event loop: parsing JSON costs ~50-100 ms per MiB, which would stall every connection the
loop serves."""
PARSE_THREADS = 4
"""Threads of the parse pool, shared by every event loop. Parsing holds the GIL, so more
threads would not parse faster; the bound also caps how many large bodies are expanded into
Python objects at once (a JSON body costs several times its size while it is converted)."""

Handler = Callable[["Call"], Awaitable[web.StreamResponse]]


class HttpError(InferenceError):
    """A transport-level refusal with its own HTTP status (404 path, 405 method, 403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Call:
    """One HTTP request as the handlers see it: method, decoded path parameters, request."""

    __slots__ = ("request", "model", "version", "region")

    def __init__(self, request: web.BaseRequest, params: Mapping[str, str]) -> None:
        self.request = request
        self.model = params.get("model", "")
        self.version = params.get("version", "")
        self.region = params.get("region", "")


_SEG = r"([^/]+)"
_MODEL = rf"/v2/models/{_SEG}(?:/versions/{_SEG})?"


class Routes:
    """The route table and its handlers over one `DataPlane`."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        max_input_size: int,
        restricted: Mapping[str, Restriction] | None = None,
    ) -> None:
        self.dp = dataplane
        self.max_input_size = max_input_size
        self.restricted = dict(restricted or {})
        self._pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="http-parse")
        # (pattern, group names, {method: (category, handler)})
        get, post = "GET", "POST"
        table: list[tuple[str, tuple[str, ...], dict[str, tuple[str, Handler]]]] = [
            ("/v2/health/live", (), {get: ("health", self.live)}),
            ("/v2/health/ready", (), {get: ("health", self.ready)}),
            ("/v2", (), {get: ("metadata", self.server_metadata)}),
            ("/v2/models/stats", (), {get: ("statistics", self.statistics)}),
            (rf"{_MODEL}", ("model", "version"), {get: ("metadata", self.model_metadata)}),
            (rf"{_MODEL}/ready", ("model", "version"), {get: ("health", self.model_ready)}),
            (rf"{_MODEL}/config", ("model", "version"), {get: ("model-config", self.config)}),
            (rf"{_MODEL}/stats", ("model", "version"), {get: ("statistics", self.statistics)}),
            (rf"{_MODEL}/infer", ("model", "version"), {post: ("inference", self.infer)}),
            (
                rf"/v2/models/{_SEG}/trace/setting",
                ("model",),
                {get: ("trace", self.trace), post: ("trace", self.trace)},
            ),
            ("/v2/trace/setting", (), {get: ("trace", self.trace), post: ("trace", self.trace)}),
            ("/v2/logging", (), {get: ("logging", self.logging), post: ("logging", self.logging)}),
            ("/v2/repository/index", (), {post: ("model-repository", self.index)}),
            (
                rf"/v2/repository/models/{_SEG}/load",
                ("model",),
                {post: ("model-repository", self.load)},
            ),
            (
                rf"/v2/repository/models/{_SEG}/unload",
                ("model",),
                {post: ("model-repository", self.unload)},
            ),
        ]
        for kind, (status, register, unregister) in {
            "systemsharedmemory": (self.shm_status, self.shm_register, self.shm_unregister),
            "cudasharedmemory": (self.cuda_status, self.cuda_register, self.cuda_unregister),
        }.items():
            region = rf"/v2/{kind}(?:/region/{_SEG})?"
            table += [
                (rf"{region}/status", ("region",), {get: ("shared-memory", status)}),
                (
                    rf"/v2/{kind}/region/{_SEG}/register",
                    ("region",),
                    {post: ("shared-memory", register)},
                ),
                (rf"{region}/unregister", ("region",), {post: ("shared-memory", unregister)}),
            ]
        self._table = [(re.compile(p), names, methods) for p, names, methods in table]

    # ---- dispatch --------------------------------------------------------------------------
    def _route(self, request: web.BaseRequest) -> tuple[Handler, Call]:
        path = request.raw_path.split("?", 1)[0]
        for pattern, names, methods in self._table:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            entry = methods.get(request.method)
            if entry is None:
                raise HttpError(405, "Method Not Allowed")
            category, handler = entry
            restriction = self.restricted.get(category)
            if restriction is not None and not restriction.allows_values(
                request.headers.getall(restriction.header, [])
            ):
                raise HttpError(403, restriction.http_message)
            params = {
                name: unquote(value)
                for name, value in zip(names, match.groups(), strict=True)
                if value is not None
            }
            return handler, Call(request, params)
        raise HttpError(404, "Not Found")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The one error boundary of the HTTP front end."""
        try:
            handler, call = self._route(request)
            return await handler(call)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        except InferenceError as exc:
            return error_response(tr.http_status(exc), exc.message)
        except Exception as exc:
            bug = internal_error(f"HTTP {request.method} {request.raw_path[:200]}", exc)
            return error_response(500, bug.message)

    # ---- bodies ----------------------------------------------------------------------------
    async def body(self, request: web.BaseRequest, *, inflate: bool = True) -> bytes:
        """The request body, bounded by --http-max-input-size before and while reading, and
        decompressed (Content-Encoding gzip or deflate) within the same bound (unless
        `inflate` is false: then the caller inflates it, off the event loop)."""
        limit = self.max_input_size
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(length, limit)
        if request.headers.get("Expect", "").lower() == "100-continue":
            # curl and libcurl wait for this before sending a large body (aiohttp's router
            # sends it; its low-level server leaves it to us). Only after the size check, so
            # an oversize body is refused without ever being sent.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        try:
            if length is not None:
                data = await request.content.readexactly(length) if length else b""
            else:  # chunked: count as it arrives
                parts, total = [], 0
                async for chunk in request.content.iter_any():
                    total += len(chunk)
                    if total > limit:
                        raise _too_large(total, limit, at_least=True)
                    parts.append(chunk)
                data = b"".join(parts)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise InvalidArgument("the request body ended before its Content-Length") from None
        encoding = _content_encoding(request)
        if not encoding or not inflate:
            return data
        return _decompress(data, _WBITS[encoding], limit)

    def close(self) -> None:
        """After the event loops stopped: end the parse pool's threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def json_body(self, call: Call) -> dict[str, Any]:
        return tr.json_object(await self.body(call.request))

    # ---- health and metadata ---------------------------------------------------------------
    async def live(self, call: Call) -> web.StreamResponse:
        return _status_only(self.dp.server_live())

    async def ready(self, call: Call) -> web.StreamResponse:
        return _status_only(self.dp.server_ready())

    async def model_ready(self, call: Call) -> web.StreamResponse:
        return _status_only(self.dp.model_ready(call.model, call.version))

    async def server_metadata(self, call: Call) -> web.StreamResponse:
        meta = self.dp.server_metadata()
        return json_response(
            {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
        )

    async def model_metadata(self, call: Call) -> web.StreamResponse:
        return json_response(tr.model_metadata(self.dp.model_metadata(call.model, call.version)))

    async def config(self, call: Call) -> web.StreamResponse:
        response = self.dp.model_config(call.model, call.version)
        return json_response(tr.message_json(response.config))

    async def statistics(self, call: Call) -> web.StreamResponse:
        response = await _off_loop(self.dp.model_statistics, call.model, call.version)
        return json_response(tr.message_json(response))

    # ---- repository ------------------------------------------------------------------------
    async def index(self, call: Call) -> web.StreamResponse:
        request = tr.index_request(await self.json_body(call))
        response = await _off_loop(self.dp.repository_index, request)
        return json_response(tr.repository_index(response))

    async def load(self, call: Call) -> web.StreamResponse:
        request = tr.load_request(call.model, await self.json_body(call))
        await _off_loop(self.dp.load, request)
        return _empty()

    async def unload(self, call: Call) -> web.StreamResponse:
        request = tr.unload_request(call.model, await self.json_body(call))
        await _off_loop(self.dp.unload, request)
        return _empty()

    # ---- shared memory ---------------------------------------------------------------------
    async def shm_status(self, call: Call) -> web.StreamResponse:
        return json_response(
            [
                {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in self.dp.shm.status(call.region)
            ]
        )

    async def shm_register(self, call: Call) -> web.StreamResponse:
        key, offset, size = tr.shm_register(await self.json_body(call))
        await _off_loop(self.dp.shm.register, call.region, key, offset, size)
        return _empty()

    async def shm_unregister(self, call: Call) -> web.StreamResponse:
        await _off_loop(self.dp.shm.unregister, call.region)
        return _empty()

    async def cuda_status(self, call: Call) -> web.StreamResponse:
        self.dp.shm.cuda_status(call.region)  # raises NotFound for a named region
        return json_response([])

    async def cuda_register(self, call: Call) -> web.StreamResponse:
        await self.json_body(call)  # read (and bound) it; the registration is refused anyway
        self.dp.shm.cuda_register(call.region)
        return _empty()

    async def cuda_unregister(self, call: Call) -> web.StreamResponse:
        self.dp.shm.cuda_unregister(call.region)
        return _empty()

    # ---- settings --------------------------------------------------------------------------
    async def trace(self, call: Call) -> web.StreamResponse:
        update = None
        if call.request.method == "POST":
            update = tr.trace_update(await self.json_body(call))
        return json_response(tr.trace_json(self.dp.trace_settings(call.model, update)))

    async def logging(self, call: Call) -> web.StreamResponse:
        update = None
        if call.request.method == "POST":
            update = tr.log_update(await self.json_body(call))
        return json_response(self.dp.log_settings(update))

    # ---- inference -------------------------------------------------------------------------
    async def infer(self, call: Call) -> web.StreamResponse:
        request = call.request
        loop = asyncio.get_running_loop()
        body = await self.body(request, inflate=False)
        header_length = _header_length(request)
        future: asyncio.Future[InferResult] = loop.create_future()
        args = (loop, future, body, header_length, call, request)
        if len(body) < OFF_LOOP_BYTES and not _content_encoding(request):
            plan = self._parse_and_submit(*args)
        else:
            # Inflating and parsing a large body (JSON `data` especially: a 60 MB array
            # took 3 s) would stall every other connection on this event loop, health
            # checks included; it runs on the bounded parse pool instead.
            plan = await loop.run_in_executor(self._pool, self._parse_and_submit, *args)
        result = await future
        size = sum(memoryview(raw).nbytes for raw in result.raws)
        if size < OFF_LOOP_BYTES:
            return _encode(request, result, plan)
        return await loop.run_in_executor(self._pool, _encode, request, result, plan)

    def _parse_and_submit(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[InferResult],
        body: bytes,
        header_length: int | None,
        call: Call,
        request: web.BaseRequest,
    ) -> tr.InferPlan:
        """Inflate and translate the body, then hand it to the data plane (which validates
        it on this thread and queues it); `future` is settled on `loop` when it completes.
        Runs on the loop for small bodies, on the parse pool for large ones."""
        encoding = _content_encoding(request)
        if encoding:
            body = _decompress(body, _WBITS[encoding], self.max_input_size)
        message, raws, plan = tr.infer_request(
            memoryview(body), header_length, call.model, call.version
        )

        def settle(result: InferResult | None, error: InferenceError | None) -> None:
            if future.done():  # the handler went away (server shutdown cancelled it)
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def done(result: InferResult | None, error: InferenceError | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed (shutdown past its drain time): nobody waits

        transport = request.transport
        carrier = {  # read only while tracing is on, as on gRPC
            key: request.headers[key]
            for key in ("traceparent", "tracestate")
            if self.dp.tracing and key in request.headers
        }
        self.dp.submit(
            message,
            raws,
            done,
            is_active=lambda: transport is not None and not transport.is_closing(),
            carrier=carrier or None,
            rpc="HTTP infer",
        )
        return plan


# ---- helpers ---------------------------------------------------------------------------------

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_INFLATE_STEP = 1 << 20


def _content_encoding(request: web.BaseRequest) -> str:
    """The body's Content-Encoding ("" for none or identity); anything but gzip or deflate
    is a 400."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return ""
    if encoding not in _WBITS:
        raise InvalidArgument(
            f"unsupported Content-Encoding '{encoding[:64]}'; expected gzip or deflate"
        )
    return encoding


def _encode(request: web.BaseRequest, result: InferResult, plan: tr.InferPlan) -> web.Response:
    """The infer reply: JSON head plus binary outputs, compressed if the client asked."""
    head, binaries = tr.infer_response(result.response, result.raws, plan)
    headers = {}
    if binaries:
        headers[HEADER_LENGTH] = str(len(head))
        payload = b"".join([head, *binaries])
        content_type = BINARY
    else:
        payload, content_type = head, JSON
    return _compressed(request, payload, content_type, headers)


def _decompress(data: bytes, wbits: int, limit: int) -> bytes:
    """Inflate at most `limit` bytes: a small body that inflates to gigabytes (a "zip bomb")
    is refused once it passes the limit, having cost at most the limit in memory."""
    inflater = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    total = 0
    pending = data
    try:
        while pending:
            chunk = inflater.decompress(pending, min(_INFLATE_STEP, limit + 1 - total))
            total += len(chunk)
            if total > limit:
                raise _too_large(total, limit, at_least=True, decompressed=True)
            parts.append(chunk)
            pending = inflater.unconsumed_tail
            if not chunk and pending:
                break  # no progress: corrupt input
        if not inflater.eof:
            raise InvalidArgument("compressed request body is truncated or corrupt")
    except zlib.error as exc:
        raise InvalidArgument(f"compressed request body cannot be decompressed: {exc}") from None
    return b"".join(parts)


def _too_large(
    size: int, limit: int, *, at_least: bool = False, decompressed: bool = False
) -> InvalidArgument:
    what = "decompressed request body" if decompressed else "request body"
    amount = f"more than {limit}" if at_least else str(size)
    return InvalidArgument(
        f"{what} of {amount} bytes exceeds the maximum allowed value of {limit} bytes; use "
        "--http-max-input-size to increase the limit"
    )


def _header_length(request: web.BaseRequest) -> int | None:
    values = request.headers.getall(HEADER_LENGTH, [])
    if not values:
        return None
    text = values[0].strip() if len(values) == 1 else ""
    # ASCII digits only (str.isdigit also takes other scripts' digits, and "²", which int()
    # then refuses)
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise InvalidArgument(f"{HEADER_LENGTH} must be one non-negative integer")
    return int(values[0])


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=tr.dumps(value), status=status, content_type=JSON)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": clip_message(message)}, status)


def _status_only(ok: bool) -> web.Response:
    """Health answers are the status alone: 200 yes, 400 no (as tritonserver answers)."""
    return web.Response(status=200 if ok else 400)


def _empty() -> web.Response:
    return web.Response(status=200)


async def _off_loop(function: Callable[..., Any], *args: Any) -> Any:
    """A call that may block (load, unload, a repository scan, a shm map) runs on the loop's
    default executor, so other requests on this loop go on meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _accepted_encoding(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Accept-Encoding", "")
    offered = set()
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if params.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        offered.add(name.strip().lower())
    for encoding in ("gzip", "deflate"):
        if encoding in offered:
            return encoding
    return None


def _compressed(
    request: web.BaseRequest, payload: bytes, content_type: str, headers: dict[str, str]
) -> web.Response:
    """The response body, compressed when the client accepts gzip or deflate
    (Inference-Header-Content-Length still counts the uncompressed JSON head)."""
    encoding = _accepted_encoding(request)
    if encoding is not None:
        compressor = zlib.compressobj(6, zlib.DEFLATED, _WBITS[encoding])
        payload = compressor.compress(payload) + compressor.flush()
        headers["Content-Encoding"] = encoding
    return web.Response(body=payload, content_type=content_type, headers=headers)
