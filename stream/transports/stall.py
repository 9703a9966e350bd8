"""Write-stall detection shared by every socket the server writes to (SPEC §6).

Flow control pauses a connection's output when its buffer passes the high-water mark; a client
that then accepts no bytes at all for ``timeout`` seconds is holding our memory for nothing, so
it is dropped — SSE, WebSocket and plain HTTP alike, whatever the overflow policy. A client that
reads slowly keeps its connection: any progress restarts the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Callable

__all__ = ["STREAM_HIGH_WATER", "StallWatch", "beneath", "drop", "drop_stalled", "limit_unsent_time", "over_tls", "peer_gone", "waiting"]

log = logging.getLogger("stream")

_LINGER_ZERO = struct.pack("ii", 1, 0)


# stream's own TLS: each TLS transport's plain one beneath it (HttpProtocol._handshake). asyncio's
# TLS transport forgets its socket on a second close (abort then does nothing, get_extra_info
# raises), and what waits in the plain transport is not in its write buffer size.
_BENEATH: weakref.WeakKeyDictionary[asyncio.BaseTransport, asyncio.Transport] = weakref.WeakKeyDictionary()

# The write buffer's high-water mark of a streaming socket (SSE, WebSocket): asyncio's default for
# a plain socket, given explicitly because a TLS transport's default is eight times as much.
STREAM_HIGH_WATER = 64 * 1024


def over_tls(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport`` is stream's own TLS over a plain one (see ``beneath``)."""
    return transport in _BENEATH


def beneath(tls: asyncio.BaseTransport, raw: asyncio.Transport) -> None:
    """``tls`` runs over ``raw``: dropping it drops ``raw``, and what waits there counts as waiting."""
    _BENEATH[tls] = raw


def drop(transport: asyncio.BaseTransport) -> None:
    """Close at once and let the kernel forget the unsent output too: with SO_LINGER 0 the close
    is a reset. A plain abort only closes our descriptor; the kernel would keep the socket and
    its full send buffer in FIN-WAIT-1, probing the stalled peer for minutes."""
    plain = _BENEATH.get(transport, transport)
    sock = plain.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    plain.abort()  # type: ignore[attr-defined]
    if plain is not transport:
        with contextlib.suppress(AttributeError):  # a TLS transport closed twice has no protocol left
            transport.abort()  # type: ignore[attr-defined]


def waiting(transport: asyncio.BaseTransport) -> int:
    """Bytes written to ``transport`` that its peer has not taken yet, TLS's plain transport included."""
    plain = _BENEATH.get(transport)
    try:
        size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    except AttributeError:  # a TLS transport closed twice: only the plain one knows
        size = 0
    return size + (plain.get_write_buffer_size() if plain is not None else 0)


_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # tcpi_state values (linux/tcp_states.h)


def peer_gone(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer reset or closed the connection, seen without reading it: a connection
    whose reading is paused learns of that only after it has read everything queued before."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def limit_unsent_time(transport: asyncio.BaseTransport, timeout: float | None) -> None:
    """Have the kernel reset the connection once output has waited ``timeout`` seconds on a peer
    that takes none of it (TCP_USER_TIMEOUT, which Linux applies to a zero window too). The
    StallWatch sees what waits in the transport; this covers what waits in the kernel, also
    after the socket was closed: a closed socket lingers (FIN-WAIT-1) until its output is read,
    holding a send buffer of kernel memory, and a peer that never reads would make that for ever."""
    sock = transport.get_extra_info("socket")
    if timeout is None or sock is None or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout * 1000)))
    except OSError:
        pass


def drop_stalled(transport: asyncio.Transport, closed: Counter[str], who: str, timeout: float | None) -> None:
    """Drop a client that accepted no output for ``timeout`` seconds: one log line, one count."""
    log.info("dropping %s: accepted no output for %g s", who, timeout)
    closed["write_stall"] += 1
    drop(transport)


class StallWatch:
    __slots__ = ("loop", "mark", "on_stall", "timeout", "timer", "transport")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        timeout: float | None,
        on_stall: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.timeout = timeout
        self.on_stall = on_stall
        self.timer: asyncio.TimerHandle | None = None
        self.mark = 0

    def paused(self) -> None:
        """Output is waiting: start the clock (once)."""
        if self.timeout is None or self.timer is not None:
            return
        self.mark = waiting(self.transport)
        self.timer = self.loop.call_later(self.timeout, self._check)

    def resumed(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        size = waiting(self.transport)
        if self.transport.is_closing() and size == 0:
            return
        if size < self.mark:  # the client took some bytes: it is slow, not stalled
            self.mark = size
            assert self.timeout is not None
            self.timer = self.loop.call_later(self.timeout, self._check)
            return
        self.on_stall()
