"""``/ws``: a uvicorn WebSocket protocol that serves stream's protocol itself.

uvicorn hands an upgrade request to ``ws_protocol_class``; this class parses frames with the
``websockets`` Sans-I/O ``ServerProtocol`` and answers ops directly from ``data_received``. There
is no ASGI task per connection: the connection is this object, its subscriber and its
transport, and the hub writes pre-built frames straight into the transport.

Lifecycle (``ServerProtocol.state`` drives it):
    CONNECTING --101--> OPEN --close sent/received--> CLOSING --TCP closed--> CLOSED
A close we start (slow consumer, shutdown, keepalive) is followed by an abort if the client has
not finished the closing handshake within ``close_timeout``: a stalled client cannot drain.

Over 400 lines, for now: one connection's whole life is here — handshake, frames, keepalive,
closing, and the limits on what a client may make it do (op rate, flood, its address's share,
write stalls), which all act on the same reading and writing state. The ops themselves are in
``ws_ops`` and the framing in ``wire``; the limits are the next candidate to move out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import orjson
from websockets.datastructures import Headers
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

from .. import wire
from ..auth import Principal, bearer_token
from ..errors import BadRequest, RateLimited, StreamError, Unauthorized, Unavailable
from ..hub import Subscriber
from ..limits import Admission, TokenBucket
from ..providers import DemoMarket
from ..runtime import Runtime
from . import ws_ops
from .demo import demo_feed
from .params import check_origin
from .stall import STREAM_HIGH_WATER, StallWatch, drop, drop_stalled, over_tls, peer_gone

__all__ = ["WebSocketProtocol"]

log = logging.getLogger("stream.ws")
access_log = logging.getLogger("uvicorn.access")
# websockets logs every open/close at INFO; one line per connection is the access log's job.
_protocol_log = logging.getLogger("stream.ws.protocol")
_protocol_log.setLevel(logging.WARNING)

PATH = "/ws"
DEMO_PATH = "/demo/ws"
VERSION = 1
# Replies and snapshots bypass the subscriber's event buffer; past this much unread output the
# client is treated as a slow consumer.
WRITE_BUFFER_CAP = 4 * 1024 * 1024
MAX_REF_LENGTH = 200
FEED_BYTES = 16 * 1024

# Close codes (SPEC §5).
NORMAL, GOING_AWAY, BAD_DATA, POLICY, TOO_BIG, INTERNAL, TRY_AGAIN, SLOW = 1000, 1001, 1007, 1008, 1009, 1011, 1013, 4008


class WebSocketProtocol(asyncio.Protocol):
    """uvicorn's ``ws_protocol_class``: built and handed the transport as touchpoint 2 of
    ``stream.uvicorn_seam`` describes."""

    transport_name = "ws"

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.server_state = server_state
        self.loop = _loop or asyncio.get_event_loop()
        self.runtime: Runtime | None = app_state.get("stream")
        self.market: DemoMarket | None = app_state.get("demo")
        self.market_feed = False  # this socket is /demo/ws: it is sent the demo market, and reads nothing
        max_size = self.runtime.settings.server.max_frame_bytes if self.runtime else 64 * 1024
        self.conn = ServerProtocol(max_size=max_size, logger=_protocol_log)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client_host = ""
        self.client_group = ""  # what per-address limits count it under
        self.forwarded = False  # came through a trusted proxy (forwarded_allow_ips)
        self.sub: Subscriber | None = None
        self.principal: Principal | None = None
        self.admitted = False
        self.fragments: list[bytes] | None = None
        self.fragments_binary = False
        self.ping_timer: asyncio.TimerHandle | None = None
        self.pong_timer: asyncio.TimerHandle | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.ping_payload = b""
        self.bucket: TokenBucket | None = None
        # Refusals the connection may earn before it counts as flooding: one token each, back at the op rate.
        self.tolerance: TokenBucket | None = None
        self.stall: StallWatch | None = None
        self.flooded = False  # closed for flooding: nothing more it sends is read
        self.broken = False  # closed because a frame could not be parsed (too big, malformed)
        self.write_paused = False
        self.throttle: asyncio.TimerHandle | None = None  # reading paused for the address's op share
        self.unread: list[bytes] = []  # received while throttled (at most one read's worth)
        self.held: list[Any] = []  # frames parsed but not yet handled while throttled
        self.op_debt_checked = True  # whether the ops since the last check were charged
        # The Sink interface the subscriber uses; ``write`` is bound to the transport itself.
        self.encode = wire.ws_event
        self.encode_snapshot = wire.ws_snapshot
        self.encode_gap = wire.ws_gap
        self.write = self._write_before_open

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_host = peer[0] if peer else ""
        if self.runtime is not None:
            timeout = self.runtime.settings.server.write_stall_timeout
            self.stall = StallWatch(self.loop, self.transport, timeout, self._stalled)
        self.transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)  # the HTTP protocol's are for requests (see http_protocol)
        # Answers to requests sent before the upgrade may still wait: the transport is paused and
        # tells no new protocol so until it resumes. This connection starts paused, as it is. A
        # TLS transport, though, re-weighs its pause against the new limits at once (telling the
        # HTTP protocol, still in place): below the low-water mark (a quarter) it is resumed.
        if self.transport.get_write_buffer_size() > (STREAM_HIGH_WATER // 4 if over_tls(self.transport) else 0):
            self.pause_writing()

    def data_received(self, data: bytes) -> None:
        # Fed in slices: websockets parses all it is given at once, and 256 KiB of 6-byte PING
        # frames would be 40,000 frames parsed (and pongs queued) before the flood check runs.
        for start in range(0, len(data), FEED_BYTES):
            if self.flooded:
                return
            if self.throttle is not None:  # its address spent its share: the rest waits for it
                self.unread.append(data[start:])
                return
            self.conn.receive_data(data[start : start + FEED_BYTES] if len(data) > FEED_BYTES else data)
            self._handle_events()

    def _throttle_if_due(self) -> None:
        """Past its address's share of op work (``ws_ops_rate_per_client``), stop reading this
        connection until the debt is paid: ops wait in the kernel, costing nothing, instead of
        being answered at the expense of everyone else's deliveries."""
        if self.op_debt_checked or self.runtime is None or self.flooded:
            return
        self.op_debt_checked = True
        wait = self.runtime.ops_debt(self.client_group, self.loop.time())
        if wait > 0 and self.throttle is None and not self.transport.is_closing():
            self.runtime.ops_throttled += 1
            self.transport.pause_reading()
            self._wait_for_share(self.runtime, wait)

    def _wait_for_share(self, runtime: Runtime, wait: float) -> None:
        # An address's connections share one debt: each waits for a turn of its own, so they wake
        # one by one as the share allows, not all at once (the very burst the share prevents),
        # and few wake only to find the debt back and sleep again.
        self.throttle = self.loop.call_later(runtime.ops_turn(self.client_group, self.loop.time(), wait), self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttle = None
        if self.transport.is_closing() or self.runtime is None:
            return
        if peer_gone(self.transport):
            self._vanished()
            return
        wait = self.runtime.ops_debt(self.client_group, self.loop.time())
        if wait > 0:  # others of its address spent the share meanwhile
            self._wait_for_share(self.runtime, wait)
            return
        if not self.write_paused:
            self.transport.resume_reading()
        if self.held:
            self._handle_events()
        pending, self.unread = self.unread, []
        for data in pending:
            self.data_received(data)

    def _handle_events(self) -> None:
        events = self.conn.events_received()
        if self.held:
            events, self.held = self.held + events, []
        for index, event in enumerate(events):
            if self.flooded:
                break
            if self.throttle is not None:
                self.held = events[index:]  # at most one slice's frames, handled when the share allows
                break
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
            self._throttle_if_due()
        self._flush()
        if self.conn.parser_exc is not None and not self.broken:
            # websockets already queued the close frame (1009 too big, 1002, 1007); stop here.
            self.broken = True
            if self.runtime is not None:
                self.runtime.closed["frame_too_large" if isinstance(self.conn.parser_exc, PayloadTooBig) else "bad_frame"] += 1
            self._stop_delivery()
            self._flush()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.fragments_binary = opcode is Opcode.BINARY
            if frame.fin:
                self._message(bytes(frame.data))
            else:
                self.fragments = []
                self._fragment(frame)
        elif opcode is Opcode.CONT:
            self._fragment(frame)
        elif opcode is Opcode.PONG:
            if self._control_allowed():
                self._pong(bytes(frame.data))
        elif opcode is Opcode.PING:
            self._control_allowed()  # websockets has queued the pong; a flood is closed
        elif opcode is Opcode.CLOSE:
            if self.sub is not None:
                self.sub.release()  # events of the write window go before websockets' close reply
            self._stop_delivery()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_delivery()
        for timer in (self.ping_timer, self.pong_timer, self.close_timer, self.throttle):
            if timer is not None:
                timer.cancel()
        self.ping_timer = self.pong_timer = self.close_timer = self.throttle = None
        self.held, self.unread = [], []
        for task in self.tasks:
            task.cancel()
        if self.stall is not None:
            self.stall.cancel()
        self.server_state.connections.discard(self)
        if self.runtime is not None:
            self.runtime.sockets.closed(self.transport)
            if self.admitted:
                self.runtime.release(self)
                self.admitted = False
        self._unlink()

    def _unlink(self) -> None:
        """Break the reference cycles of a closed connection (websockets' parser and the error
        that ended it, the subscriber and its sink, the stall watch): its memory is freed now, by
        reference counting, not by a full garbage collection that under attack would free
        thousands of them at once and stall the loop for 100 ms and more."""
        error = self.conn.parser_exc
        if error is not None:
            error.__traceback__ = None
        self.conn.parser = None  # type: ignore[assignment]
        self.sub = None
        self.stall = None

    def pause_writing(self) -> None:
        # A client that does not read gets no more of our attention either: stop reading its
        # ops (and pings) until it drains, so it cannot grow our buffers with replies.
        self.write_paused = True
        if not self.transport.is_closing():
            self.transport.pause_reading()
        if self.stall is not None:
            self.stall.paused()
        if self.sub is not None:
            self.sub.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.transport.is_closing() and not self.flooded and self.throttle is None:
            self.transport.resume_reading()
        if self.stall is not None:
            self.stall.resumed()
        if self.sub is not None:
            self.sub.resume()

    def _stalled(self) -> None:
        assert self.runtime is not None and self.stall is not None
        self._stop_delivery()
        drop_stalled(self.transport, self.runtime.closed, f"WebSocket {self.client_host}", self.stall.timeout)

    # -- called by uvicorn and the runtime ------------------------------------------------

    def shutdown(self) -> None:
        if self.conn.state is OPEN:
            self.close(GOING_AWAY, "server shutting down", self._shutdown_timeout())
        elif self.conn.state is State.CONNECTING and not self.transport.is_closing():
            self.transport.close()

    def tick(self, now: float) -> None:
        """Keepalive runs on per-connection timers instead."""

    def expire(self) -> None:
        if self.conn.state is OPEN:
            self.send_error(Unauthorized("token: expired; reconnect with a fresh one"), None)
            self.close(POLICY, "token expired")

    # -- Sink -----------------------------------------------------------------------------

    def overflowed(self) -> None:
        log.info("closing slow WebSocket consumer %s (buffer full)", self.client_host)
        self.close(SLOW, "slow consumer")

    def _write_before_open(self, data: bytes) -> None:
        raise RuntimeError("write before the WebSocket handshake completed")

    # -- handshake ------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        try:
            self._accept(request)
        except Exception as exc:  # a header websockets parsed but we cannot use; never a traceback
            malformed = isinstance(exc, LookupError)  # e.g. a repeated Authorization header
            if not malformed:
                log.exception("WebSocket handshake failed")
            if self.conn.state is State.CONNECTING and not self.transport.is_closing():
                error = BadRequest(f"request headers: {exc}") if malformed else StreamError("internal error; it has been logged")
                self._reject(error, request.path)

    def _accept(self, request: Request) -> None:
        response = self.conn.accept(request)
        path, _, query = request.path.partition("?")
        params = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
        runtime = self.runtime
        if response.status_code != 101:
            self._log_access(request.path, response.status_code)
            self._respond(response)
            return
        if runtime is None:
            self._reject(Unavailable("the server is starting; retry in a moment"), request.path)
            return
        if path == DEMO_PATH and self.market is not None:
            self._serve_demo(response, request)
            return
        if path != PATH:
            self._reject(StreamError(f"no WebSocket endpoint at {path!r}; use {PATH}", code="not_found"), request.path, 404)
            return
        self.forwarded = runtime.proxies.trusts(self.client_host)
        self.client_host = runtime.proxies.client(self.client_host, request.headers.get_all("X-Forwarded-For"))
        self.client_group = runtime.group(self.client_host)
        try:
            check_origin(request.headers.get("Origin"), runtime.settings.server.allowed_origins)
            authorization = request.headers.get_all("Authorization")
            if len(authorization) > 1:
                raise BadRequest("Authorization: send one Authorization header, not several")
            token = bearer_token(authorization[0] if authorization else None, params.get("token"))
            self.principal = runtime.auth.identify(token)
        except StreamError as exc:
            self._reject(exc, request.path)
            return

        self.conn.send_response(response)
        self._flush()
        self._log_access(request.path, 101)
        self.write = self.transport.write
        try:
            if runtime.sockets.admission(self.transport) is Admission.OVER:
                # Past the socket limits: tell it in the protocol (1013 means "try again later").
                raise Unavailable("over capacity: too many connections; retry later", code="over_capacity")
            runtime.admit(self)
        except Unavailable as exc:
            self.send_json({"type": "error", "code": exc.code, "message": exc.message, "ref": None})
            self._flush()
            self.close(GOING_AWAY if runtime.stopping else TRY_AGAIN, exc.code)
            return
        self.admitted = True
        runtime.limit_send_buffer(self.transport)
        server = runtime.settings.server
        self.bucket = TokenBucket(server.ws_ops_rate, server.ws_ops_burst, self.loop.time())
        self.tolerance = TokenBucket(server.ws_ops_rate, server.ws_ops_burst, self.loop.time())
        self.sub = runtime.hub.new_subscriber(self, transport=self.transport_name)
        if self.write_paused:
            self.sub.pause()
        self.send_json(
            {
                "type": "welcome",
                "version": VERSION,
                "heartbeat": _seconds(server.ws_ping_interval),
                "epoch": runtime.hub.epoch,
                "limits": {
                    "max_frame_bytes": server.max_frame_bytes,
                    "max_event_bytes": server.max_event_bytes,
                    "max_patterns": server.max_patterns,
                    "subscriber_buffer": server.subscriber_buffer,
                },
            }
        )
        self._schedule_ping()
        if params.get("topics"):
            # At the loop's next turn: uvicorn makes this object the transport's protocol only
            # after the handshake returns, and until then flow control (pause_writing) would go
            # to the HTTP protocol, unheard by this connection's subscriber.
            self.loop.call_soon(self._subscribe_from_query, params)

    def _serve_demo(self, response: Response, request: Request) -> None:
        """``/demo/ws``: the demo market pushed (transports/demo.py). What it is sent is ignored;
        its pings count against the op rate like any socket's."""
        assert self.runtime is not None and self.market is not None
        self.client_host = self.runtime.proxies.client(self.client_host, request.headers.get_all("X-Forwarded-For"))
        self.client_group = self.runtime.group(self.client_host)
        self.market_feed = True
        self.conn.send_response(response)
        self._flush()
        self._log_access(request.path, 101)
        self.write = self.transport.write
        if self.runtime.sockets.admission(self.transport) is Admission.OVER:
            self.close(TRY_AGAIN, "over_capacity")
            return
        server = self.runtime.settings.server
        self.bucket = TokenBucket(server.ws_ops_rate, server.ws_ops_burst, self.loop.time())
        self.tolerance = TokenBucket(server.ws_ops_rate, server.ws_ops_burst, self.loop.time())
        self._schedule_ping()
        scheme = "https" if over_tls(self.transport) else "http"
        task = self.loop.create_task(self._push_demo(self.market, f"{scheme}://{request.headers.get('Host', '127.0.0.1')}"))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _push_demo(self, market: DemoMarket, base_url: str) -> None:
        async for _, message, _ in demo_feed(market, base_url):
            if self.conn.state is not OPEN:
                return
            if self.transport.get_write_buffer_size() > WRITE_BUFFER_CAP:
                self.overflowed()
                return
            self.conn.send_text(orjson.dumps(message or {"type": "heartbeat"}))
            self._flush()

    def _subscribe_from_query(self, params: dict[str, str]) -> None:
        if self.conn.state is OPEN and self.sub is not None:
            self._run_op(ws_ops.subscribe, params, None)

    def _reject(self, exc: StreamError, target: str, status: int | None = None) -> None:
        status = status or exc.status
        body = orjson.dumps({"error": exc.to_dict()})
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
        )
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        self._log_access(target, status)
        self._respond(Response(status, _reason(status), headers, body))

    def _respond(self, response: Response) -> None:
        self.conn.send_response(response)
        self._flush()
        if not self.transport.is_closing():  # _flush closes it when websockets asks for the end
            self.transport.close()
        self._arm_abort(self._close_timeout())  # the refusal may wait behind output nobody reads

    def _log_access(self, target: str, status: int) -> None:
        # The request target as sent (percent-encoded, as uvicorn logs HTTP requests): a decoded
        # %0A would forge a log line. Control characters are escaped all the same, and the
        # logging filter redacts token= however its name is encoded.
        if access_log.isEnabledFor(logging.INFO):
            shown = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", target)
            access_log.info('%s - "WebSocket %s" %d', self.client_host, shown, status)

    # -- messages -------------------------------------------------------------------------

    def _message(self, data: bytes) -> None:
        if self.sub is None or self.conn.state is not OPEN:
            if self.market_feed:
                self._control_allowed()  # /demo/ws reads nothing, but a flood of it is a flood
            return
        if self.fragments_binary:
            self.send_error(BadRequest("frame: binary frames are not accepted; send JSON text frames"), None)
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if not _utf8(data):
                log.info("closing WebSocket %s: a text frame that is not UTF-8", self.client_host)
                if self.runtime is not None:
                    self.runtime.closed["invalid_utf8"] += 1
                self.close(BAD_DATA, "invalid UTF-8")
                return
            self.send_error(BadRequest(f"frame: not valid JSON ({exc})"), None)
            return
        if not isinstance(message, dict):
            self.send_error(BadRequest('frame: expected a JSON object like {"op": "subscribe", ...}'), None)
            return
        ref = message.get("ref")
        if not (ref is None or isinstance(ref, (int, float)) or (isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH)):
            self.send_error(BadRequest(f"ref: expected a number or a string of at most {MAX_REF_LENGTH} characters"), None)
            return
        if not self._allowed(ref):
            return
        op = message.get("op")
        handler = ws_ops.OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            self.send_error(
                StreamError(f"op: expected one of {', '.join(ws_ops.OPS)}; got {op!r}", code="unknown_op"), ref
            )
            return
        self._run_op(handler, message, ref)

    def _allowed(self, ref: Any) -> bool:
        """Spend one op from the bucket; refuse when empty, close 1008 on a sustained flood."""
        if self._spend():
            return True
        if self.conn.state is not OPEN:
            return False
        assert self.bucket is not None
        wait = self.bucket.wait_time()
        self.send_error(RateLimited(f"op: over {self.bucket.rate:g} ops/s; retry in {wait:.2f} s", retry_after=wait), ref)
        return False

    def _fragment(self, frame: Frame) -> None:
        """One frame of a fragmented message. Every frame is work, an empty continuation too: each
        costs an op, and the message its op when it is complete. Past the rate the message is
        dropped (said once) and its later fragments are only charged."""
        allowed = self._control_allowed()
        if self.fragments is not None and not allowed:
            self.fragments = None
            self.send_error(RateLimited("frame: a fragmented message past the op rate was dropped; send it again", retry_after=1), None)
        if self.fragments is None:
            return
        self.fragments.append(bytes(frame.data))
        if frame.fin:
            data, self.fragments = b"".join(self.fragments), None
            self._message(data)

    def _control_allowed(self) -> bool:
        """Control frames cost an op too (a PING flood is a flood); refused ones get no answer
        of ours beyond the pong websockets already queued."""
        return self.bucket is None or self._spend()

    def _spend(self) -> bool:
        assert self.bucket is not None
        if self.runtime is not None:
            self.runtime.charge_ops(self.client_group)
            self.op_debt_checked = False
        now = self.loop.time()
        if self.bucket.take(now):
            return True
        # Refusals leak away at the op rate: a client at most twice the rate is only refused, one
        # further over it is flooding once they pass the burst, even if an op gets through now and
        # then (its address's share reads it slower, so some always do).
        if self.runtime is not None:
            self.runtime.ops_refused += 1
        assert self.tolerance is not None
        if not self.tolerance.take(now) and not self.flooded:
            log.info("closing WebSocket %s: sustained flooding past the op rate limit", self.client_host)
            self.flooded = True
            if self.runtime is not None:
                self.runtime.closed["flooding"] += 1
            self.close(POLICY, "too many messages")
            if not self.transport.is_closing():
                self.transport.pause_reading()  # its close frame, if any, is not awaited: the abort timer ends it
        return False

    def _run_op(self, handler, message: dict[str, Any], ref: Any) -> None:
        try:
            handler(self, message, ref)
        except StreamError as exc:
            self.send_error(exc, ref)
        except Exception:
            log.exception("WebSocket op %r failed", message.get("op"))
            self.send_error(StreamError("internal error; the connection stays open"), ref)

    def send_json(self, message: dict[str, Any]) -> None:
        if self.conn.state is OPEN and not self.transport.is_closing():
            if self.sub is not None:
                self.sub.release()  # events of the write window go first: replies keep their place
            self.transport.write(wire.ws_message(message))
            if self.transport.get_write_buffer_size() > WRITE_BUFFER_CAP:
                log.info("closing WebSocket %s: %d bytes of replies unread", self.client_host, WRITE_BUFFER_CAP)
                self.close(SLOW, "slow consumer")

    def send_error(self, exc: StreamError, ref: Any) -> None:
        # Over WebSocket a missing credential is reported as forbidden (SPEC §5 error codes).
        code = "forbidden" if isinstance(exc, Unauthorized) else exc.code
        self.send_json({"type": "error", "code": code, "message": exc.message, "ref": ref})

    # -- keepalive and closing ------------------------------------------------------------

    def _schedule_ping(self) -> None:
        interval = self.runtime.settings.server.ws_ping_interval if self.runtime else None
        if interval is not None:
            self.ping_timer = self.loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self.ping_timer = None
        if self.conn.state is not OPEN:
            return
        self.ping_payload = os.urandom(4)
        # A control frame may go between messages, before events held for the write window.
        self.conn.send_ping(self.ping_payload)
        self._flush()
        timeout = self.runtime.settings.server.ws_ping_timeout if self.runtime else None
        if timeout is not None:
            self.pong_timer = self.loop.call_later(timeout, self._keepalive_timeout)
        else:
            self._schedule_ping()

    def _pong(self, payload: bytes) -> None:
        # Only the answer to our own ping counts: unsolicited pongs prove nothing.
        if self.pong_timer is not None and payload == self.ping_payload:
            self.pong_timer.cancel()
            self.pong_timer = None
            self._schedule_ping()

    def _keepalive_timeout(self) -> None:
        self.pong_timer = None
        if self.throttle is not None and peer_gone(self.transport):
            self._vanished()
            return
        if self.throttle is not None:
            # Its pong may be waiting unread behind its address's op share: not its fault.
            timeout = self.runtime.settings.server.ws_ping_timeout if self.runtime else None
            if timeout is not None:
                self.pong_timer = self.loop.call_later(timeout, self._keepalive_timeout)
                return
        log.info("closing WebSocket %s: no pong within the keepalive timeout", self.client_host)
        self.close(INTERNAL, "keepalive ping timeout")

    def close(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Start the closing handshake; abort if the client has not completed it in time."""
        if self.sub is not None and self.conn.state is OPEN and not self.transport.is_closing():
            self.sub.release()
        self._stop_delivery()
        if self.conn.state is OPEN:
            self.conn.send_close(code, reason)
            self._flush()
        self._arm_abort(self._close_timeout() if timeout is None else timeout)

    def _shutdown_timeout(self) -> float:
        if self.runtime is None:
            return 1.0
        server = self.runtime.settings.server
        return min(server.close_timeout, server.shutdown_timeout / 2)

    def _close_timeout(self) -> float:
        return self.runtime.close_grace if self.runtime else 5.0

    def _arm_abort(self, timeout: float) -> None:
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(timeout, self._abort)

    def _vanished(self) -> None:
        """The peer reset or closed while this connection was read slower: what it queued
        before it left is not worth reading."""
        self.held, self.unread = [], []
        drop(self.transport)

    def _abort(self) -> None:
        self.close_timer = None
        drop(self.transport)

    def _stop_delivery(self) -> None:
        if self.sub is not None:
            self.sub.close()
        for timer in (self.ping_timer, self.pong_timer):
            if timer is not None:
                timer.cancel()
        self.ping_timer = self.pong_timer = None

    def _flush(self) -> None:
        for data in self.conn.data_to_send():
            if data:
                self.transport.write(data)
            elif not self.transport.is_closing():
                # websockets asks for end-of-stream: the server closes the TCP connection,
                # and drops it if unread data keeps it from closing (a peer that stopped reading).
                self.transport.close()
                self._arm_abort(self._close_timeout())


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _seconds(value: float | None) -> float | int | None:
    return int(value) if value is not None and value == int(value) else value


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
