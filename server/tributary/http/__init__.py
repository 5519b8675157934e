"""HTTP/REST v2 front end (Triton's HTTP API and its extensions) over the data plane.

`routes` maps each path to one `DataPlane` call, `translate` converts bodies to and from the
protocol messages, `server` runs aiohttp's low-level server on its own event loop threads.
Nothing here times, counts or retries a request: that is the data plane's (docs/architecture.md).
"""

from .server import HttpServer

__all__ = ["HttpServer"]
