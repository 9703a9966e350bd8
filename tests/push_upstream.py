"""Real push upstreams on loopback: an SSE server and a WebSocket server, in a thread with
their own event loop, that each test scripts from its own thread.

- SSE (``sse_url``): a raw HTTP/1.1 server answering ``text/event-stream``, body delimited by
  the close. ``on_sse(headers)`` returns the frames each new stream starts with (a replay);
  ``push(frame)`` sends raw bytes to every open stream; ``drop()`` ends them all.
- WebSocket (``ws_url``), the ``websockets`` server: it answers pings by itself.
  ``on_ws_message(text)`` returns the replies to a message a client sent (a list of text, or a
  ``Close(code, reason)``); ``on_ws_connect(query)`` the messages a new connection starts with;
  ``push(text)`` sends to every open connection; ``close_all(code)``.

``sent_at`` maps a marker found in each pushed payload to ``time.time()`` at the send, for
latency measurements; ``received`` keeps what WebSocket clients sent, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from .support import free_port


@dataclass
class Close:
    code: int
    reason: str = ""


class PushUpstream:
    def __init__(self) -> None:
        self.sse_port = free_port()
        self.ws_port = free_port()
        self.sse_url = f"http://127.0.0.1:{self.sse_port}/events"
        self.ws_url = f"ws://127.0.0.1:{self.ws_port}/socket"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="push upstream", daemon=True)
        self.sse_requests: list[dict[str, str]] = []  # each stream's request headers (lower-case names)
        self.ws_requests: list[str] = []  # each WebSocket connection's path and query
        self.received: list[str] = []  # what WebSocket clients sent
        self.on_sse: Callable[[dict[str, str]], list[bytes]] = lambda headers: []
        self.on_ws_connect: Callable[[str], list[str]] = lambda path: []
        self.on_ws_message: Callable[[str], list[str] | Close] = lambda text: []
        self.sent_at: dict[str, float] = {}
        self.redirect_to: str | None = None  # answer WebSocket upgrades with a 302 to this URL
        self.sse_headers = ""  # more response header lines for SSE streams ("Content-Encoding: gzip\r\n")
        self.open_ws = 0  # WebSocket connections open now
        self.most_open_ws = 0  # the most ever open at once
        self._streams: set[asyncio.StreamWriter] = set()
        self._sockets: set[ServerConnection] = set()
        self._servers: list[Any] = []

    # -- running --------------------------------------------------------------------------

    def __enter__(self) -> PushUpstream:
        self.thread.start()
        self._call(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for writer in list(self._streams):
                writer.transport.abort()
            for server in self._servers:
                server.close()
            for socket in list(self._sockets):
                socket.transport.abort()

        try:
            self._call(stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    async def _start(self) -> None:
        self._servers.append(await asyncio.start_server(self._serve_sse, "127.0.0.1", self.sse_port))
        self._servers.append(await serve(self._serve_ws, "127.0.0.1", self.ws_port, max_size=None, process_request=self._redirect))

    def _redirect(self, connection: ServerConnection, request: Any) -> Any:
        if self.redirect_to is None:
            return None
        self.ws_requests.append(request.path)
        response = connection.respond(HTTPStatus.FOUND, "moved\n")
        response.headers["Location"] = self.redirect_to
        return response

    def _call(self, make: Callable[[], Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    # -- controls, from the test's thread ------------------------------------------------

    def push(self, payload: bytes | str, marker: str | None = None) -> None:
        """Send ``payload`` to every open SSE stream (bytes) or WebSocket (str)."""

        async def send() -> None:
            if marker is not None:
                self.sent_at[marker] = time.time()
            if isinstance(payload, bytes):
                for writer in list(self._streams):
                    writer.write(payload)
            else:
                await asyncio.gather(*(socket.send(payload) for socket in list(self._sockets)), return_exceptions=True)

        self._call(send)

    def flood(self, make: Callable[[int], bytes | str], seconds: float) -> Future[int]:
        """Send ``make(n)`` for n = 0, 1, … as fast as the links take it, for ``seconds``, to every
        open SSE stream (bytes) or WebSocket (str); returns at once, with the future of the count sent."""

        async def flood() -> int:
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline:
                payload = make(n)
                if not (self._streams if isinstance(payload, bytes) else self._sockets):
                    await asyncio.sleep(0.01)  # none open now: wait for the client to come back
                    continue
                if isinstance(payload, bytes):
                    for writer in list(self._streams):
                        writer.write(payload)
                        try:
                            await writer.drain()
                        except ConnectionError:
                            self._streams.discard(writer)  # the client dropped it: flood the next one
                else:
                    await asyncio.gather(*(socket.send(payload) for socket in list(self._sockets)), return_exceptions=True)
                n += 1
            return n

        return asyncio.run_coroutine_threadsafe(flood(), self.loop)

    def ping_flood(self, seconds: float) -> Future[int]:
        """Stop reading every open WebSocket and send it PINGs as fast as the link takes them,
        for ``seconds`` (each asks for a pong the client cannot deliver)."""

        async def flood() -> int:
            sent = 0
            deadline = time.monotonic() + seconds
            for socket in list(self._sockets):
                socket.transport.pause_reading()
            while time.monotonic() < deadline and self._sockets:
                for socket in list(self._sockets):
                    with contextlib.suppress(Exception):
                        for _ in range(200):  # the largest pings (125 bytes): each asks a pong as large
                            socket.protocol.send_ping(b"%08d" % sent + b"p" * 117)
                            sent += 1
                        for data in socket.protocol.data_to_send():
                            socket.transport.write(data)
                await asyncio.sleep(0)
            return sent

        return asyncio.run_coroutine_threadsafe(flood(), self.loop)

    def drop(self) -> None:
        """End every SSE stream (a clean close of the connection)."""

        async def drop() -> None:
            for writer in list(self._streams):
                writer.close()
            self._streams.clear()

        self._call(drop)

    def close_all(self, code: int = 1000, reason: str = "") -> None:
        async def close() -> None:
            await asyncio.gather(*(socket.close(code, reason) for socket in list(self._sockets)), return_exceptions=True)

        self._call(close)

    @property
    def open_sse(self) -> int:
        return len(self._streams)


    # -- SSE ------------------------------------------------------------------------------

    async def _serve_sse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        headers[":path"] = lines[0].split(" ")[1]
        self.sse_requests.append(headers)
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n{self.sse_headers}\r\n"
        writer.write(head.encode())
        for frame in self.on_sse(headers):
            writer.write(frame)
        self._streams.add(writer)
        try:
            await reader.read()  # until the client goes: the body is ours to write
        except ConnectionError:
            pass
        finally:
            self._streams.discard(writer)
            writer.transport.abort()

    # -- WebSocket ------------------------------------------------------------------------

    async def _serve_ws(self, socket: ServerConnection) -> None:
        self.ws_requests.append(socket.request.path if socket.request else "")
        self._sockets.add(socket)
        self.open_ws += 1
        self.most_open_ws = max(self.most_open_ws, self.open_ws)
        try:
            for text in self.on_ws_connect(socket.request.path if socket.request else ""):
                await socket.send(text)
            async for message in socket:
                text = message if isinstance(message, str) else message.decode()
                self.received.append(text)
                replies = self.on_ws_message(text)
                if isinstance(replies, Close):
                    await socket.close(replies.code, replies.reason)
                    return
                for reply in replies:
                    await socket.send(reply)
        except Exception:
            pass
        finally:
            self.open_ws -= 1
            self._sockets.discard(socket)


def sse_frame(data: str, *, event: str | None = None, ident: str | None = None) -> bytes:
    lines = ([f"event: {event}"] if event else []) + ([f"id: {ident}"] if ident is not None else [])
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()
