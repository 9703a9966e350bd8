"""A real upstream HTTP server on loopback whose answers each test scripts.

It runs uvicorn in a thread with its own event loop, so an upstream that stalls or drips never
blocks the test's loop. ``route(path, handler)`` installs ``handler(request, hit) -> Response``,
where ``hit`` counts requests to that path from 1; ``requests[path]`` keeps their headers.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .support import free_port

Handler = Callable[[Request, int], Response | Awaitable[Response]]

# 64 MiB of zeros compress to about 64 KiB: a classic decompression bomb.
GZIP_BOMB = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.routes: dict[str, Handler] = {}
        self.hits: dict[str, int] = defaultdict(int)
        self.requests: dict[str, list[dict[str, str]]] = defaultdict(list)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        self.hits[path] = 0
        self.requests[path] = []
        return self.url(path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        path = request.url.path
        handler = self.routes.get(path)
        if handler is None:
            response: Response = Response("no such route", status_code=404)
        else:
            self.hits[path] += 1
            self.requests[path].append(dict(request.headers))
            result = handler(request, self.hits[path])
            response = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        await response(scope, receive, send)

    def start(self) -> Upstream:
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve()), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


def text(body: str | bytes, status: int = 200, media_type: str = "application/xml", **headers: str) -> Handler:
    return lambda request, hit: Response(body, status_code=status, media_type=media_type, headers=headers)


def drip(chunks: list[bytes], every: float, media_type: str = "application/json") -> Handler:
    """A body sent a little at a time: each read is quick, the whole never finishes in time."""

    async def stream():
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(every)

    return lambda request, hit: StreamingResponse(stream(), media_type=media_type)


def stall(seconds: float, body: bytes = b"[]") -> Handler:
    async def handler(request: Request, hit: int) -> Response:
        await asyncio.sleep(seconds)
        return Response(body, media_type="application/json")

    return handler


def sequence(*handlers: Handler) -> Handler:
    """Answer the n-th request with the n-th handler (the last one repeats)."""
    return lambda request, hit: handlers[min(hit, len(handlers)) - 1](request, hit)
