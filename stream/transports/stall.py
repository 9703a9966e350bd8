"""Write-stall detection shared by every socket the server writes to (SPEC §6).

Flow control pauses a connection's output when its buffer passes the high-water mark; a client
that then accepts no bytes at all for ``timeout`` seconds is holding our memory for nothing, so
it is dropped — SSE, WebSocket and plain HTTP alike, whatever the overflow policy. A client that
reads slowly keeps its connection: any progress restarts the clock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable

__all__ = ["StallWatch", "drop", "drop_stalled", "limit_unsent_time", "peer_gone"]

log = logging.getLogger("stream")

_LINGER_ZERO = struct.pack("ii", 1, 0)


def drop(transport: asyncio.Transport) -> None:
    """Close at once and let the kernel forget the unsent output too: with SO_LINGER 0 the close
    is a reset. A plain abort only closes our descriptor; the kernel would keep the socket and
    its full send buffer in FIN-WAIT-1, probing the stalled peer for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    transport.abort()


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
        self.mark = self.transport.get_write_buffer_size()
        self.timer = self.loop.call_later(self.timeout, self._check)

    def resumed(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        size = self.transport.get_write_buffer_size()
        if size < self.mark:  # the client took some bytes: it is slow, not stalled
            self.mark = size
            assert self.timeout is not None
            self.timer = self.loop.call_later(self.timeout, self._check)
            return
        self.on_stall()
