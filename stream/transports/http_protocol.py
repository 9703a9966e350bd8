"""uvicorn's httptools protocol, plus what a server facing the open internet needs around it.

uvicorn parses requests and runs the ASGI app; this subclass adds, per socket:
- the connection limits (SPEC §6): every socket is counted when it opens (``Runtime.sockets``);
  one past the limits is answered "over capacity" once its head arrives (see ``gate``), and
  past the file-descriptor margin it is closed at once;
- bounds on what a client can make us hold before the app even runs: the request head is at
  most ``max_head_bytes`` (431) and must arrive within ``head_timeout``; a body that stops
  arriving for ``body_timeout`` is abandoned; output nobody reads for ``write_stall_timeout``
  closes the socket;
- a close that cannot finish: a close (ours, or uvicorn's own: keep-alive, 400, Connection:
  close) waits until what was written before it is read, so the write-stall watch runs whenever
  any output waits (the transport's high-water mark is 0) and is never cancelled before the
  socket is gone: whoever closed it, a peer that stopped reading loses it within
  ``write_stall_timeout``;
- a way for ``/sse`` to own its socket: the ASGI scope gets ``extensions["stream.http"]`` =
  this protocol; once its headers are out, an event stream calls ``hand_over`` and from then on
  writes to the socket itself, hearing about flow control and the connection going away from a
  ``StreamingProtocol``.

What it relies on in uvicorn is touchpoint 1 of ``stream.uvicorn_seam``. After a WebSocket
upgrade or a ``hand_over`` the transport has another protocol and this object hears nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Protocol

import orjson

from ..errors import HeadTimeout, HeadTooLarge, StreamError
from ..limits import Admission
from ..uvicorn_seam import HttpToolsProtocol
from .stall import STREAM_HIGH_WATER, StallWatch, beneath, drop, drop_stalled, limit_unsent_time

__all__ = ["HttpProtocol", "StreamSink", "StreamingProtocol"]

log = logging.getLogger("stream.http")

# Requests a client may pipeline behind the one being answered: uvicorn queues every request of
# a received chunk, and 256 KiB of 18-byte requests would be 14,000 queued cycles per socket.
MAX_PIPELINED = 16

# An over-capacity socket only has to say what it wants (a health check is still answered):
# it gets this long for its head, not the full head_timeout.
OVER_CAPACITY_HEAD_TIMEOUT = 1.0

# The chunk that ends a chunked response body.
LAST_CHUNK = b"0\r\n\r\n"


class StreamSink(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def lost(self) -> None: ...


class HttpProtocol(HttpToolsProtocol):
    admission: Admission = Admission.SERVE
    runtime: Any = None
    via_proxy = False  # the peer is a trusted proxy (forwarded_allow_ips)
    head_bytes: int | None = None  # bytes received since the head began, None once it is complete
    head_size = 0  # bytes of request line and headers the parser has found so far
    refused = False  # answered (or closed) before the app: the parser's later callbacks do nothing
    head_timer: asyncio.TimerHandle | None = None
    body_timer: asyncio.TimerHandle | None = None
    body_seen = 0.0
    stall: StallWatch | None = None
    handshake: asyncio.Task[None] | None = None  # stream's own TLS: the handshake under way
    early: list[bytes] | None = None  # decrypted bytes that arrived before the handshake's end was seen

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        runtime = self.app_state.get("stream")
        if runtime is not None and runtime.tls is not None:
            # Counted from accept, served once the handshake is done (in its time).
            if self._admit(runtime, transport):
                transport.pause_reading()  # the ClientHello is for start_tls, not the parser
                self.early = []
                self.handshake = self.loop.create_task(self._handshake(runtime, transport))
            return
        super().connection_made(transport)
        self.runtime = runtime
        if runtime is not None and self._admit(runtime, transport):
            self._guard(runtime, transport)

    def _admit(self, runtime: Any, transport: asyncio.Transport) -> bool:
        """Count the new socket against the limits; False: it was refused (and aborted)."""
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else ""
        # A trusted proxy's socket is not limited by its address: the clients behind it are, per
        # request and per stream (Runtime.enter_forwarded).
        self.via_proxy = runtime.proxies.trusts(host)
        self.admission, evicted = runtime.sockets.opened(transport, runtime.group(host), counted_by_address=not self.via_proxy)
        if evicted is not None:
            runtime.closed["evicted"] += 1
            drop(evicted)
        if self.admission is Admission.REFUSE:
            transport.abort()
            return False
        return True

    async def _handshake(self, runtime: Any, raw: asyncio.Transport) -> None:
        server = runtime.settings.server
        try:
            transport = await self.loop.start_tls(
                raw,
                self,
                runtime.tls,
                server_side=True,
                ssl_handshake_timeout=server.ssl_handshake_timeout,
                # A close waits this long for the peer's close_notify (asyncio's default: 30 s).
                ssl_shutdown_timeout=server.close_timeout,
            )
        except OSError as exc:  # ssl.SSLError, a reset, and the timeout (ConnectionAbortedError) are
            runtime.sockets.closed(raw)
            drop(raw)
            runtime.closed["tls_handshake"] += 1
            log.debug("TLS handshake from %s failed: %s", (raw.get_extra_info("peername") or ("?",))[0], exc)
            return
        except BaseException:  # shutting down (cancelled), or anything else: never left counted
            runtime.sockets.closed(raw)
            drop(raw)
            raise
        finally:
            self.handshake = None
        if transport is None or transport.is_closing() or runtime.stopping:
            # Gone meanwhile, or done after uvicorn told every connection to go: it would not be told.
            runtime.sockets.closed(raw)
            drop(raw)
            return
        runtime.sockets.moved(raw, transport)
        beneath(transport, raw)
        raw.set_write_buffer_limits(high=0)  # what waits below TLS pauses it, and so the app (_guard)
        super().connection_made(transport)
        self.runtime = runtime
        self._guard(runtime, transport)
        early, self.early = self.early, None
        for data in early or ():
            if transport.is_closing():
                break
            protocol: Any = transport.get_protocol()  # a WebSocket's, once a chunk upgraded it
            protocol.data_received(data)

    def _guard(self, runtime: Any, transport: asyncio.Transport) -> None:
        """Arm the bounds on what this socket may make us hold (see the module's docstring)."""
        server = runtime.settings.server
        self.stall = StallWatch(self.loop, transport, server.write_stall_timeout, self._stalled)
        # Any output that waits pauses writing, so the stall watch runs: a close waits for it.
        # (A TLS transport pauses at size >= high, a plain one at size > high.)
        transport.set_write_buffer_limits(high=1 if runtime.tls is not None else 0)
        limit_unsent_time(transport, server.write_stall_timeout)
        self.head_bytes = 0
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # gone during its TLS handshake, which cleans up after itself
        self._cancel_timers()
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None  # it calls back into this protocol: a reference cycle
        if self.runtime is not None:
            self.runtime.sockets.closed(self.transport)
        super().connection_lost(exc)
        if self.cycle is not None and self.cycle.response_complete:
            self.cycle = None  # type: ignore[assignment]  # it too calls back (on_response)

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            # What came with the end of the handshake, before _handshake resumed.
            self.early.append(data)
            return
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

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stall is not None:
            self.stall.resumed()

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A weak reference: the scope outlives nothing of ours, and a strong one would make every
        # connection a reference cycle, freed only by a full garbage collection. The request's
        # ASGI cycle holds this protocol for as long as the app runs.
        self.scope["extensions"] = {"stream.http": weakref.proxy(self)}
        self.head_size = 16  # the request line's method, version and spaces
        if self.runtime is not None:
            self.head_bytes = 0
            if self.head_timer is None:  # a keep-alive socket's next request
                self._arm_head_timer()

    # The head's size is counted as the parser finds its parts, so the bound holds however the
    # bytes arrive: data_received alone sees a head only while it is incomplete after a read,
    # and a head that ends in the read that crosses the limit would pass.
    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.head_size += len(url)  # called once per piece of the URL that arrived

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self.head_size += len(name) + len(value) + 4  # ": " and the line end

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        if self.runtime is not None:
            self.runtime.sockets.engaged(self.transport)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.transport.is_closing() or self.refused:
            return  # refused: the rest of the received chunk is ignored
        limit = self.runtime.settings.server.max_head_bytes if self.runtime is not None else None
        if limit is not None and self.head_size > limit:
            self._refuse(HeadTooLarge(f"request head: over {limit} bytes (request line and headers)"), "head_too_large")
            return
        if len(self.pipeline) >= MAX_PIPELINED and self.runtime is not None:
            log.info("closing HTTP connection from %s: over %d pipelined requests", self._host(), MAX_PIPELINED)
            self.runtime.closed["pipelining"] += 1
            self.refused = True
            self._cancel_timers()
            self.transport.close()
            return
        super().on_headers_complete()
        server = self.runtime.settings.server if self.runtime is not None else None
        if server is not None and server.body_timeout is not None and not self.parser.should_upgrade():
            self.body_seen = self.loop.time()
            self.body_timer = self.loop.call_later(server.body_timeout, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if not self.refused:
            super().on_message_complete()

    # -- streams --------------------------------------------------------------------------

    @property
    def chunked(self) -> bool:
        """The response being sent is chunked. False too while a request is pipelined behind it:
        ``cycle`` is then the queued request's, and a stream cannot have the socket."""
        cycle: Any = self.cycle
        return bool(cycle is not None and cycle.chunked_encoding)

    def hand_over(self, sink: StreamSink) -> StreamingProtocol:
        """Give the socket to a response that writes its own body chunks (``/sse``), once its
        headers are out; the app may then return.

        As after a WebSocket upgrade, the socket gets a protocol of its own, and this object,
        with its parser, request scope, ASGI cycle and task, is dropped: most of what an idle
        stream would otherwise cost (~25 KB with the app's suspended middleware, ~5 KB here).
        The end of the stream closes the socket: no further request is read from it."""
        self._cancel_timers()
        if self.stall is not None:
            self.stall.cancel()  # the streaming protocol watches its own stalls
        self.transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)  # events wait in the subscriber past it
        # uvicorn closes the socket of an app that returns before its response is complete;
        # this one is the streaming protocol's to complete now.
        self.cycle.response_complete = True
        self.connections.discard(self)
        streaming = StreamingProtocol(self.transport, sink, self.runtime, self.connections, paused=self.flow.write_paused)
        self.transport.set_protocol(streaming)
        self.transport.resume_reading()  # paused by uvicorn if a request was pipelined behind this one
        self._let_go()
        return streaming

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        self._cancel_timers()
        self._let_go()

    def _let_go(self) -> None:
        """The socket has another protocol: break this object's reference cycles (the parser's
        callbacks, the stall watch's), so it is freed now rather than by a full garbage
        collection, which under attack would free thousands at once and stall the loop."""
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        self.parser = None  # type: ignore[assignment]

    # -- limits ---------------------------------------------------------------------------

    @property
    def over_capacity(self) -> bool:
        return self.admission is Admission.OVER

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
        # connection_lost follows: the request's cycle and any stream end there.
        drop_stalled(self.transport, self.runtime.closed, f"HTTP connection from {self._host()}", self.stall.timeout)  # type: ignore[union-attr]

    def _refuse(self, exc: StreamError, reason: str) -> None:
        """Answer a request that never got as far as the app, and close. Behind an answer still
        being written the refusal is not answered (it would land inside that answer): closed."""
        self.runtime.closed[reason] += 1
        log.info("closing HTTP connection from %s: %s", self._host(), exc.message)
        self.refused = True
        self.head_bytes = None
        self._cancel_timers()
        if self.cycle is None or self.cycle.response_complete:
            body = orjson.dumps({"error": exc.to_dict()})
            head = (
                f"HTTP/1.1 {exc.status} {_REASONS[exc.status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self.transport.close()

    def _cancel_timers(self) -> None:
        """The head and body timers; the stall watch stays until the socket is gone."""
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None

    def _host(self) -> str:
        return self.client[0] if self.client else "?"


class StreamingProtocol(asyncio.Protocol):
    """A socket whose response body a stream writes itself (see ``HttpProtocol.hand_over``):
    it passes flow control and the connection's end on to the stream, drops a client that
    accepts no output (``write_stall_timeout``), and ends the response with ``end``. Nothing
    is read from the client any more: what it sends is discarded, but reading goes on so that
    its leaving is noticed at once."""

    __slots__ = ("abort_timer", "connections", "paused", "runtime", "sink", "stall", "transport")

    def __init__(self, transport: asyncio.Transport, sink: StreamSink, runtime: Any, connections: set[Any], *, paused: bool) -> None:
        self.transport = transport
        self.sink = sink
        self.runtime = runtime
        self.connections = connections  # uvicorn's: its shutdown calls ``shutdown`` and waits for the close
        connections.add(self)
        self.paused = paused
        self.abort_timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.stall = StallWatch(loop, transport, runtime.settings.server.write_stall_timeout, self._stalled)
        if paused:
            self.stall.paused()

    def end(self, last: bytes, abort_after: float | None) -> None:
        """Write ``last`` (framed chunks, may be empty) and the end of the body, then close.
        The end may never drain to a stalled client: after ``abort_after`` seconds it is dropped."""
        self.transport.write(last + LAST_CHUNK)
        self.transport.close()
        if abort_after is not None:
            self.abort_timer = asyncio.get_running_loop().call_later(abort_after, drop, self.transport)

    def shutdown(self) -> None:
        """uvicorn's server shutdown, after ``Runtime.drain`` has ended every stream it could."""
        if not self.transport.is_closing():  # a TLS transport closed twice forgets its socket
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pass

    def pause_writing(self) -> None:
        self.paused = True
        self.stall.paused()
        self.sink.pause()

    def resume_writing(self) -> None:
        self.paused = False
        self.stall.resumed()
        self.sink.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stall.cancel()
        if self.abort_timer is not None:
            self.abort_timer.cancel()
        self.connections.discard(self)
        self.runtime.sockets.closed(self.transport)
        self.sink.lost()

    def _stalled(self) -> None:
        peer = self.transport.get_extra_info("peername")
        drop_stalled(self.transport, self.runtime.closed, f"HTTP stream to {peer[0] if peer else '?'}", self.stall.timeout)


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
