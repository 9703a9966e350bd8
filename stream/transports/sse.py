"""``/sse``: Server-Sent Events written straight to the socket.

The headers go through ASGI (so uvicorn frames the response as chunked and logs it); then the
stream takes the socket over (``HttpProtocol.hand_over``, reached as ``extensions["stream.http"]``)
and the app returns. From there on the hub writes pre-framed chunks into the transport, and the
stream ends on its own: the client leaving, the subscriber overflowing (slow consumer), token
expiry or shutdown. No task, no suspended middleware: an idle stream is a few small objects.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import wire
from ..auth import Principal
from ..errors import StreamError, Unauthorized, Unavailable
from ..hub import Subscriber
from ..runtime import Runtime
from .http_protocol import StreamingProtocol
from .params import SubscribeRequest

__all__ = ["HEADERS", "EventStream"]

log = logging.getLogger("stream.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def retry_later(retry_ms: int, message: str) -> bytes:
    """The whole body for a stream that cannot start now (over capacity): EventSource gives up
    for good on a non-200, so it gets 200, a randomised ``retry:`` hint and an immediate end."""
    return wire.sse_retry(retry_ms + random.randint(0, 4 * retry_ms)) + wire.sse_comment(message)


def _chunked(encode):
    return lambda *args: wire.sse_chunk(encode(*args))


class EventStream(Response):
    """One open ``/sse`` response: a runtime Connection, the Sink of its subscriber and the
    StreamSink of its socket.

    A Response subclass only so FastAPI passes it through; it writes its own headers.
    """

    transport_name = "sse"
    media_type = "text/event-stream"
    encode = staticmethod(wire.sse_event_chunk)
    encode_snapshot = staticmethod(_chunked(wire.sse_snapshot))

    def __init__(self, runtime: Runtime, request: SubscribeRequest, principal: Principal | None, client_host: str, forwarded: bool):
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self.runtime = runtime
        self.request = request
        self.principal = principal
        self.client_host = client_host
        self.client_group = runtime.group(client_host)
        self.forwarded = forwarded
        self.sub: Subscriber | None = None
        self.socket: StreamingProtocol | None = None
        self.ended: str | None = None  # why: "lost", "slow", "shutdown", "error", "expired"

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.runtime.settings.server
        protocol = scope.get("extensions", {}).get("stream.http")
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if protocol is None or not protocol.chunked:
            raise RuntimeError("/sse needs stream's HTTP protocol (run the app with `stream serve`)")
        if protocol.transport.is_closing():
            # The client left while the request was routed: a socket that will not hear of it
            # again must not be handed over.
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            self.runtime.admit(self)
        except Unavailable as exc:
            await send({"type": "http.response.body", "body": retry_later(server.sse_retry, exc.message)})
            return
        # Nothing awaited from admit on: shutdown or token expiry find the stream ready to end.
        self.socket = protocol.hand_over(self)
        self.write = self.socket.transport.write
        self.write(wire.sse_chunk(wire.sse_retry(server.sse_retry)))
        self._subscribe(self.socket)

    def _subscribe(self, socket: StreamingProtocol) -> None:
        self.runtime.limit_send_buffer(socket.transport)
        hub = self.runtime.hub
        self.sub = hub.new_subscriber(self, transport=self.transport_name)
        if socket.paused:
            self.sub.pause()
        request = self.request
        try:
            hub.subscribe(
                self.sub,
                request.topics,
                since=request.since,
                snapshot=request.snapshot,
                symbols=request.symbols,
                announce=lambda position: self.write(wire.sse_chunk(wire.sse_position(position))),
            )
        except StreamError as exc:
            self.write(wire.sse_chunk(wire.sse_control("error", {"error": exc.to_dict()})))
            self._end("error", self.runtime.close_grace)

    def _end(self, reason: str, abort_after: float | None = None) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        if self.sub is not None:
            if reason != "lost":
                self.sub.release()  # held events of the write window go before the end
            self.sub.close()
        if reason != "lost" and self.socket is not None:
            server = self.runtime.settings.server
            last = b""
            if reason == "shutdown":
                last = wire.sse_chunk(wire.sse_retry(server.sse_retry + random.randint(0, server.sse_retry)))
            self.socket.end(last, abort_after)

    # -- Sink (called by the subscriber) ---------------------------------------------------

    write: Any = None  # the transport's write, bound once the stream has the socket

    @staticmethod
    def encode_gap(after: str | None, reason: str) -> bytes:
        return wire.sse_chunk(wire.sse_control("gap", {"after": after, "reason": reason}))

    def overflowed(self) -> None:
        log.info("ending slow SSE consumer %s (buffer full)", self.client_host)
        self._end("slow", self.runtime.close_grace)

    # -- StreamSink (called by its socket's StreamingProtocol) --------------------------------

    def pause(self) -> None:
        if self.ended is None and self.sub is not None:
            self.sub.pause()

    def resume(self) -> None:
        if self.ended is None and self.sub is not None:
            self.sub.resume()

    def lost(self) -> None:
        self._end("lost")
        self.runtime.release(self)  # counted until its socket is gone, the end written or not

    # -- Connection (called by the runtime) --------------------------------------------------

    def shutdown(self) -> None:
        server = self.runtime.settings.server
        self._end("shutdown", min(server.close_timeout, server.shutdown_timeout / 2))

    def expire(self) -> None:
        if self.ended is None:
            if self.sub is not None:  # subscribed, so the direct write path is bound
                self.sub.release()
                error = Unauthorized("token: expired; reconnect with a fresh one")
                self.write(wire.sse_chunk(wire.sse_control("error", {"error": error.to_dict()})))
            self._end("expired", self.runtime.close_grace)

    def tick(self, now: float) -> None:
        if self.ended is None and self.sub is not None and not self.sub.paused:
            self.write(_HEARTBEAT)  # a comment: it may go before events held for the write window


_HEARTBEAT = wire.sse_chunk(wire.sse_comment("ping"))
