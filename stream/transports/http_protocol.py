"""uvicorn's httptools protocol, plus what a server facing the open internet needs around it.

uvicorn parses requests and runs the ASGI app; this subclass adds, per socket:
- the connection limits (SPEC §6): every socket is counted when it opens (``Runtime.sockets``);
  one past the limits is answered "over capacity" once its head arrives (see ``gate``), and
  past the file-descriptor margin it is closed at once;
- bounds on what a client can make us hold before the app even runs: the request head is at
  most ``max_head_bytes`` (431) and must arrive within ``head_timeout``; a body that stops
  arriving for ``body_timeout`` is abandoned; output nobody reads for ``write_stall_timeout``
  closes the socket;
- a hook that lets ``/sse`` write to the socket directly: the ASGI scope gets
  ``extensions["stream.http"]`` = this protocol; an event stream registers itself as
  ``stream_sink`` and then hears about flow control and about the connection going away.

What it relies on in uvicorn is touchpoint 1 of ``stream.uvicorn_seam``; after a WebSocket
upgrade the transport's protocol is the WebSocket one and this object hears nothing more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from ..errors import HeadTimeout, HeadTooLarge, StreamError
from ..limits import Admission
from ..uvicorn_seam import HttpToolsProtocol
from .stall import StallWatch, drop

__all__ = ["HttpProtocol", "StreamSink"]

log = logging.getLogger("stream.http")

# Requests a client may pipeline behind the one being answered: uvicorn queues every request of
# a received chunk, and 256 KiB of 18-byte requests would be 14,000 queued cycles per socket.
MAX_PIPELINED = 16

# An over-capacity socket only has to say what it wants (a health check is still answered):
# it gets this long for its head, not the full head_timeout.
OVER_CAPACITY_HEAD_TIMEOUT = 1.0


class StreamSink(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def lost(self) -> None: ...


class HttpProtocol(HttpToolsProtocol):
    stream_sink: StreamSink | None = None
    admission: Admission = Admission.SERVE
    runtime: Any = None
    head_bytes: int | None = None  # bytes of the head so far, None once it is complete
    head_timer: asyncio.TimerHandle | None = None
    body_timer: asyncio.TimerHandle | None = None
    body_seen = 0.0
    stall: StallWatch | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        runtime = self.runtime = self.app_state.get("stream")
        if runtime is None:
            return
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else ""
        self.admission = runtime.sockets.opened(transport, host, counted_by_address=not runtime.proxies.trusts(host))
        if self.admission is Admission.REFUSE:
            transport.abort()
            return
        server = runtime.settings.server
        self.stall = StallWatch(self.loop, transport, server.write_stall_timeout, self._stalled)
        self.head_bytes = 0
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        sink, self.stream_sink = self.stream_sink, None
        self._cancel_timers()
        if self.runtime is not None:
            self.runtime.sockets.closed(self.transport)
        super().connection_lost(exc)
        if sink is not None:
            sink.lost()

    def data_received(self, data: bytes) -> None:
        if self.admission is Admission.REFUSE:
            return
        super().data_received(data)
        if self.head_bytes is not None and self.runtime is not None and self.transport.get_protocol() is self:
            # The head is still incomplete after this chunk: count it against the limit.
            self.head_bytes += len(data)
            if self.head_bytes > self.runtime.settings.server.max_head_bytes:
                limit = self.runtime.settings.server.max_head_bytes
                self._refuse(HeadTooLarge(f"request head: over {limit} bytes (request line and headers)"), "head_too_large")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall is not None:
            self.stall.paused()
        if self.stream_sink is not None:
            self.stream_sink.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stall is not None:
            self.stall.resumed()
        if self.stream_sink is not None:
            self.stream_sink.resume()

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"stream.http": self}  # type: ignore[dict-item]
        if self.runtime is not None:
            self.head_bytes = 0
            if self.head_timer is None:  # a keep-alive socket's next request
                self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.transport.is_closing():
            return  # refused: the rest of the received chunk is ignored
        if len(self.pipeline) >= MAX_PIPELINED and self.runtime is not None:
            log.info("closing HTTP connection from %s: over %d pipelined requests", self._host(), MAX_PIPELINED)
            self.runtime.closed["pipelining"] += 1
            self._cancel_timers()
            self.transport.close()
            return
        super().on_headers_complete()
        server = self.runtime.settings.server if self.runtime is not None else None
        if server is not None and server.body_timeout is not None and not self.parser.should_upgrade():
            self.body_seen = self.loop.time()
            self.body_timer = self.loop.call_later(server.body_timeout, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        self.body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        super().on_message_complete()

    # -- limits ---------------------------------------------------------------------------

    @property
    def over_capacity(self) -> bool:
        return self.admission is Admission.OVER

    @property
    def chunked(self) -> bool:
        cycle: Any = self.cycle
        return bool(cycle is not None and cycle.chunked_encoding)

    def _arm_head_timer(self) -> None:
        timeout = self.runtime.settings.server.head_timeout
        if self.admission is Admission.OVER:
            timeout = OVER_CAPACITY_HEAD_TIMEOUT if timeout is None else min(timeout, OVER_CAPACITY_HEAD_TIMEOUT)
        if timeout is not None:
            self.head_timer = self.loop.call_later(timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self.head_timer = None
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A request is still being answered (uvicorn reads no further meanwhile): the next
            # head's clock starts again once it can arrive.
            self._arm_head_timer()
            return
        if self.head_bytes == 0:
            # Not a byte of a request: nobody to answer (saves a write per idle socket).
            self.runtime.closed["head_timeout"] += 1
            self._cancel_timers()
            self.transport.close()
            return
        self._refuse(HeadTimeout("request head: not received in time"), "head_timeout")

    def _body_timeout(self) -> None:
        self.body_timer = None
        timeout = self.runtime.settings.server.body_timeout
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        idle = self.loop.time() - self.body_seen
        if idle < timeout:
            self.body_timer = self.loop.call_later(timeout - idle, self._body_timeout)
            return
        log.info("closing HTTP connection from %s: request body stalled for %g s", self._host(), timeout)
        self.runtime.closed["body_timeout"] += 1
        drop(self.transport)

    def _stalled(self) -> None:
        if self.transport.get_protocol() is not self:
            return
        log.info("closing HTTP connection from %s: accepted no output for %g s", self._host(), self.stall.timeout)  # type: ignore[union-attr]
        self.runtime.closed["write_stall"] += 1
        drop(self.transport)  # connection_lost follows: the request's cycle and any stream end there

    def _refuse(self, exc: StreamError, reason: str) -> None:
        """Answer a request that never got as far as the app, and close."""
        self.runtime.closed[reason] += 1
        log.info("closing HTTP connection from %s: %s", self._host(), exc.message)
        body = orjson.dumps({"error": exc.to_dict()})
        head = (
            f"HTTP/1.1 {exc.status} {_REASONS[exc.status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.head_bytes = None
        self._cancel_timers()
        self.transport.write(head.encode() + body)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None
        if self.stall is not None:
            self.stall.cancel()

    def _host(self) -> str:
        return self.client[0] if self.client else "?"


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
