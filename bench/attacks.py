"""What each hostile socket of bench/attacker.py does, and how its group counts what happened.

A ``Group`` is the sockets of one attack: how many, from which 127.0.0.x addresses, what each
socket is (``factory``), how often each is nudged (``every`` seconds: its ``tick``) and how soon
it is reopened once gone. An ``Attack`` is one socket, an asyncio protocol. bench/attacker.py
keeps every group's sockets open and ticks them; this module says what a socket sends and how
it reads the server's answers.

The ``attack`` scenario's sockets, numbered like the defences they probe:

    (5)  StalledSubscriber   a WebSocket subscribed to ``batch.>`` that stops reading once
                             subscribed (4 KiB receive buffer) while 60 KB events arrive in batches
    (6)  UnreadAnswer        asks for a ~1 MB answer it never reads, then makes the server close
                             (Connection: close, its keep-alive timeout, 20 pipelined requests,
                             a 100 KiB head, an unfinished head (408), garbage, a refused WebSocket)
    (7)  hit_and_run         a 60 s long-poll of 100 patterns whose socket closes at once
    (8)  EmptyContinuation   a fragmented message, then endless empty continuation frames
    (9)  AnonymousPublish    a 1 MiB publish body without credentials, a byte now and then
    (10) BigHead             a 100 KiB header in one write
    (11) ForwardedLongPoll   30 s long-polls from a trusted proxy for one forwarded client
                             (and the fd_flood group: idle sockets up to the descriptor cap)
    (16) GiantSubscribe      subscribes of 5,000 patterns, over and over
    (17) WebSocketAttack     plain WebSockets that hold a place (the fill group)

A socket the server lets go of is reopened by the attacker, after ``Group.reopen`` seconds, or
``Group.backoff`` if the server said "try again later" (503, 1013).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import re
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

__all__ = [
    "PING",
    "SOURCES",
    "AnonymousPublish",
    "Attack",
    "BigHead",
    "EmptyContinuation",
    "ForwardedLongPoll",
    "GiantSubscribe",
    "Group",
    "StalledSubscriber",
    "UnreadAnswer",
    "WebSocketAttack",
    "client_socket",
    "hit_and_run",
    "ws_frame",
    "ws_request",
]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # the port is picked at connect
TCP_ESTABLISHED = 1
ZERO_MASK = b"\x00\x00\x00\x00"  # XOR with a zero key changes nothing: payloads go as they are
PING = b"\x89\x80" + ZERO_MASK  # a masked, empty WebSocket ping


def _addresses(first: int, count: int = 1) -> tuple[str, ...]:
    return tuple(f"127.0.0.{first + n}" for n in range(count))


# Where each group of the attack and fdchurn scenarios connects from (the canary uses 127.0.0.1-8,
# the hostile scenario 127.0.0.10-13), so per-address limits fall on the attacker alone.
SOURCES = {
    "batch_stalled": _addresses(20, 8),  # 25 sockets each at full size: under the crowded server's 1 % share
    "unread_close": _addresses(28, 2),
    "forwarded_v4": _addresses(30),  # the trusted proxy: the server lists it in forwarded_allow_ips
    "forwarded_v6": _addresses(30),
    "gone_long_polls": _addresses(31),
    "empty_continuation": _addresses(32),
    "anonymous_publish": _addresses(33),
    "big_head": _addresses(34),
    "giant_subscribe": _addresses(35),
    "batch_publisher": _addresses(36),
    "fill": _addresses(40, 12),
    "fd_churn": _addresses(60, 12),
    "fd_flood": _addresses(72, 12),
}


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, masked client frame (the mask key is zero)."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + ZERO_MASK + payload
    return bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", length) + ZERO_MASK + payload


def ws_request(host: str, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {os.urandom(16).hex()[:22]}==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_socket(source: str, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking TCP socket bound to ``source``; a receive buffer set now sets the window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((source, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Group:
    """The sockets of one kind of attack, from its source addresses, and what happened to them.

    ``ramp`` is the share of ``target`` that must be held before the attacker says it is ready
    (0 for sockets the server is meant to end quickly); a group with ``after`` starts that many
    seconds after the attacker said it is ready, once the others have taken their places."""

    def __init__(self, name: str, target: int, sources: tuple[str, ...], factory: Callable[[Group], Attack], *,
                 every: float | None = None, rcvbuf: int = 0, ramp: float = 0.9, reopen: float = 0.2,
                 backoff: float = 0.5, max_life: float | None = None, after: float = 0.0) -> None:
        self.name = name
        self.target = target
        self.sources = sources
        self.factory = factory
        self.every = every
        self.rcvbuf = rcvbuf
        self.ramp = ramp
        self.reopen = reopen
        self.backoff = backoff
        self.max_life = max_life
        self.after = after
        self.open: set[Attack] = set()  # connected (WebSocket groups: upgraded) and not closed
        self.peak = 0
        self.at_stop = 0
        self.samples: list[int] = []  # len(open) every 0.5 s while attacking
        self.attempts = 0
        self.connected = 0
        self.connect_failed = 0
        self.closed_by_server = 0
        self.lived: list[float] = []  # seconds from connect until the server let go (the first 10,000)
        self.statuses: Counter[str] = Counter()  # HTTP status lines the server answered with
        self.close_codes: Counter[str] = Counter()  # WebSocket close codes it sent
        self.counts: Counter[str] = Counter()  # group-specific: ops, answers, errors, …

    @property
    def source(self) -> str:
        first, last = self.sources[0], self.sources[-1]
        return first if first == last else f"{first}-{last.rsplit('.', 1)[1]}"

    def held(self, conn: Attack) -> None:
        self.open.add(conn)
        self.peak = max(self.peak, len(self.open))

    def ramped(self) -> bool:
        return self.after > 0 or (self.attempts >= self.target and len(self.open) >= self.ramp * self.target)

    def pause(self, conn: Attack) -> float:
        """Seconds before a socket of this group is reopened."""
        delay = self.backoff if conn.backoff else self.reopen
        return delay * (1 + 1.5 * random.random())

    def tick(self, tick: int) -> None:
        for conn in list(self.open):
            if conn.transport is not None and not conn.transport.is_closing():
                conn.tick(tick)

    def summary(self) -> dict:
        during = self.samples or [0]
        lived = sorted(self.lived)
        return {
            "source": self.source,
            "target": self.target,
            "held_peak": self.peak,
            "held_mean": round(sum(during) / len(during), 1),
            "held_min": min(during),
            "held_at_stop": self.at_stop,
            "connects": self.connected,
            "connect_failed": self.connect_failed,
            "closed_by_server": self.closed_by_server,
            "let_go_after_s": {"p50": round(lived[len(lived) // 2], 2), "max": round(lived[-1], 2)} if lived else {},
            "statuses": dict(self.statuses),
            "close_codes": dict(self.close_codes),
            **dict(self.counts),
        }


class Attack(asyncio.Protocol):
    """One hostile socket. ``closed`` resolves when it is gone; ``by_us`` tells who ended it, and
    ``backoff`` whether the server said to try again later."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.by_us = False
        self.backoff = False
        self.buffer = bytearray()
        self.answered = False
        self.last_status = ""
        self.head = b""
        self.bucket = random.randrange(1 << 30)
        self.opened = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.group.connected += 1

    def connection_lost(self, exc) -> None:
        group = self.group
        group.open.discard(self)
        if not self.by_us:
            group.closed_by_server += 1
            if len(group.lived) < 10_000:
                group.lived.append(time.monotonic() - self.opened)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        self.by_us = True
        if self.transport is not None:
            self.transport.abort()

    def tick(self, tick: int) -> None:
        """Called every ``Group.every`` seconds while the socket is open (if the group has ticks)."""

    def status(self, data: bytes) -> bytes | None:
        """The server's HTTP answer: counts its status once; returns the bytes after the head."""
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                del self.buffer[:-4]
            return None
        self.head = bytes(self.buffer[:end])
        parts = self.head.split(b"\r\n", 1)[0].split()
        self.last_status = parts[1].decode(errors="replace") if len(parts) > 1 else "?"
        self.group.statuses[self.last_status] += 1
        self.answered = True
        rest = bytes(self.buffer[end + 4 :])
        self.buffer.clear()
        return rest

    def check(self, probe: bytes = b"") -> int | None:
        """Notice a server that let go of a socket we do not read, which reading cannot tell us:
        its TCP state (a reset or a FIN arrived), else write ``probe`` so that a socket the
        server's kernel has forgotten answers with a reset. The bytes waiting unread, or None
        once the socket is gone (then ``connection_lost`` counts it as closed by the server)."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            unread = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            state, unread = 0, 0
        if state != TCP_ESTABLISHED:
            self.transport.abort()
            return None
        if probe:
            self.transport.write(probe)
        return unread


class WebSocketAttack(Attack):
    """A WebSocket client that reads: the handshake, then frames. It answers pings and counts the
    server's errors (``error_<code>``) and close codes; held once upgraded. As it is, it only
    holds a place (the fill group); subclasses act on the welcome and on messages."""

    def __init__(self, group: Group, request: bytes) -> None:
        super().__init__(group)
        self.request = request
        self.upgraded = False
        self.reading = True

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.reading:
            return
        if not self.upgraded:
            rest = self.status(data)
            if rest is None:
                return
            if self.last_status != "101":  # refused (503 over capacity, 4xx): the server closes it
                self.backoff = self.last_status == "503"
                self.transport.close()
                return
            self.upgraded = True
            self.group.held(self)
            data = rest
        self.buffer += data
        self.frames()

    def frames(self) -> None:
        buffer = self.buffer
        position = 0
        while self.reading and len(buffer) - position >= 2:
            first, length = buffer[position], buffer[position + 1] & 0x7F
            header = 2
            if length == 126:
                if len(buffer) - position < 4:
                    break
                (length,) = struct.unpack_from("!H", buffer, position + 2)
                header = 4
            elif length == 127:
                if len(buffer) - position < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, position + 2)
                header = 10
            if len(buffer) - position < header + length:
                break
            payload = bytes(buffer[position + header : position + header + length])
            position += header + length
            opcode = first & 0x0F
            if opcode == 0x1:
                self.message(payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.group.close_codes[str(code)] += 1
                self.backoff = self.backoff or code == 1013
                self.transport.close()
                break
            elif opcode == 0x9:
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + ZERO_MASK + payload)
        del buffer[:position]

    def message(self, payload: bytes) -> None:
        if b'"error"' in payload[:20]:
            code = payload.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode(errors="replace")
            self.group.counts[f"error_{code}"] += 1
            self.backoff = self.backoff or code == "over_capacity"
        elif b'"welcome"' in payload[:30]:
            self.group.counts["welcomed"] += 1
            self.welcome()

    def welcome(self) -> None:
        """The server admitted the connection."""


class StalledSubscriber(WebSocketAttack):
    """(5) Subscribes (``/ws?topics=batch.>`` in its request), then stops reading for good; its
    receive buffer is 4 KiB (``Group.rcvbuf``). Ticks notice when the server lets go of it."""

    def message(self, payload: bytes) -> None:
        if b'"subscribed"' in payload[:30]:
            self.group.counts["subscribed"] += 1
            self.reading = False
            self.transport.pause_reading()
        else:
            super().message(payload)

    def tick(self, tick: int) -> None:
        if not self.reading:
            self.check(PING if tick % 2 == 0 else b"")


class UnreadAnswer(Attack):
    """(6) Asks for a ~1 MB answer (``/api/events`` over the flood topics' history) and never
    reads it, with a 4 KiB receive buffer; then makes the server close the socket, in one of
    seven ways by turns: the request says ``Connection: close``; or nothing more is sent (the
    server's keep-alive timeout); or once the answer has begun to arrive, 20 more requests are
    pipelined, or a 100 KiB head (431), or the start of a head that never ends (408), or
    garbage (400), or a WebSocket upgrade to a path that does not exist (refused, 404)."""

    WAYS = ("connection_close", "keep_alive", "pipelined", "big_head", "head_timeout", "garbage", "ws_refused")
    # When ``check`` may start probing, in seconds after the answer began to arrive: a byte
    # would reset the server's keep-alive timer (5 s), so that way waits until it has run out,
    # and the unfinished head's until its head_timeout (10 s) has; there the probe is a byte
    # more of the head, not the end of it.
    PROBE_AFTER: ClassVar[dict[str, float]] = {"keep_alive": 6.0, "head_timeout": 11.0}
    turn = 0
    TARGET = "/api/events?topics=flood.%3E&since=-1h&limit=1000"

    def __init__(self, group: Group) -> None:
        super().__init__(group)
        self.way = self.WAYS[UnreadAnswer.turn % len(self.WAYS)]
        UnreadAnswer.turn += 1
        request = f"GET {self.TARGET} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        self.request = (request + ("Connection: close\r\n" if self.way == "connection_close" else "") + "\r\n").encode()
        self.then = {
            "connection_close": b"",
            "keep_alive": b"",
            "pipelined": f"GET {self.TARGET} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() * 20,
            "big_head": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100 * 1024 + b"\r\n\r\n",
            "head_timeout": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
            "garbage": b"\x00\x01 nonsense\r\n\r\n",
            "ws_refused": ws_request("x", "/nowhere"),
        }[self.way]
        self.probe = b"a" if self.way == "head_timeout" else b"\r\n"
        self.probe_from = float("inf")  # once the answer is on its way

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        transport.write(self.request)
        self.group.held(self)

    def data_received(self, data: bytes) -> None:
        self.group.counts["bytes_read"] += len(data)  # uvloop may read once before the pause holds
        self.transport.pause_reading()

    def tick(self, tick: int) -> None:
        probing = time.monotonic() >= self.probe_from and tick % 4 == 0
        unread = self.check(self.probe if probing else b"")
        if unread is None:
            return
        self.group.counts["unread_bytes_max"] = max(self.group.counts["unread_bytes_max"], unread)
        if unread > 0 and self.probe_from == float("inf"):  # the answer is on its way and waits unread
            self.probe_from = time.monotonic() + self.PROBE_AFTER.get(self.way, 0.0)
            self.transport.write(self.then)

    def connection_lost(self, exc) -> None:
        if not self.by_us:
            self.group.counts[f"let_go_{self.way}"] += 1
        super().connection_lost(exc)


async def hit_and_run(group: Group, address: tuple[str, int], request: bytes) -> None:
    """(7) Connect, send a long-poll request and close at once (a FIN: nothing was read)."""
    loop = asyncio.get_running_loop()
    group.attempts += 1
    try:
        sock = client_socket(group.sources[group.attempts % len(group.sources)])
    except OSError:
        group.connect_failed += 1
        return
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), 5)
        group.connected += 1
        sock.send(request)  # a few hundred bytes into an empty send buffer
        group.counts["requests_sent"] += 1
    except (TimeoutError, OSError):
        group.connect_failed += 1
    finally:
        sock.close()


class EmptyContinuation(WebSocketAttack):
    """(8) Once welcomed: a text frame that is not final and empty, then empty continuation
    frames, 5,000 per tick while its output drains, until the server closes it (1008)."""

    START = b"\x01\x80" + ZERO_MASK  # TEXT, not final, empty
    BURST = (b"\x00\x80" + ZERO_MASK) * 5000  # CONTINUATION, not final, empty
    MAX_BURSTS = 2000  # 10 million frames on one socket at most

    def __init__(self, group: Group, request: bytes) -> None:
        super().__init__(group, request)
        self.bursts = -1  # not welcomed yet

    def welcome(self) -> None:
        self.transport.write(self.START)
        self.bursts = 0

    def tick(self, tick: int) -> None:
        if 0 <= self.bursts < self.MAX_BURSTS and self.transport.get_write_buffer_size() < 65536:
            self.transport.write(self.BURST)
            self.bursts += 1
            self.group.counts["empty_frames_sent"] += 5000


class AnonymousPublish(Attack):
    """(9) ``POST /api/publish`` without credentials announcing a 1 MiB body, then a byte of it
    now and then (each tick) until the server answers and closes."""

    HEAD = b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.HEAD + b'[{"topic":')
        self.group.held(self)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.status(data)

    def tick(self, tick: int) -> None:
        self.transport.write(b" ")
        self.group.counts["body_bytes_trickled"] += 1


class BigHead(Attack):
    """(10) A request whose head is over 100 KiB, sent in one write; waits for the server's answer
    and close."""

    REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"h" * 100 * 1024 + b"\r\n\r\n"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.REQUEST)
        self.group.held(self)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.status(data)


class ForwardedLongPoll(Attack):
    """(11) From the trusted proxy's address, a 30 s long-poll on behalf of a forwarded client
    (``clients`` by turns: one IPv4 address, or many IPv6 addresses of one /64). Held while it
    waits; a 503 is classified by its message (the per-client limit, or the server's)."""

    def __init__(self, group: Group, clients: tuple[str, ...]) -> None:
        super().__init__(group)
        self.client = clients[group.connected % len(clients)]
        self.length = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(
            f"GET /api/events?topics=x&wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {self.client}\r\n\r\n".encode()
        )
        self.group.held(self)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            rest = self.status(data)
            if rest is None:
                return
            self.group.open.discard(self)  # answered: no longer waiting
            found = re.search(rb"(?i)content-length: *(\d+)", self.head)
            self.length = int(found.group(1)) if found else 0
            self.buffer += rest
        else:
            self.buffer += data
        if len(self.buffer) < self.length:
            return
        if self.last_status == "503":
            self.backoff = True
            self.group.counts["refused_per_client" if b"connections from" in self.buffer else "refused_over_capacity"] += 1
        self.abort()  # reopened (after the group's backoff if refused)


class GiantSubscribe(WebSocketAttack):
    """(16) Once welcomed, a subscribe of ``patterns`` patterns (far past max_patterns) each tick
    after the last one was answered."""

    def __init__(self, group: Group, request: bytes, frame: bytes) -> None:
        super().__init__(group, request)
        self.frame = frame
        self.waiting = True  # until welcomed

    def welcome(self) -> None:
        self.waiting = False

    def message(self, payload: bytes) -> None:
        super().message(payload)
        if b'"error"' in payload[:20] or b'"subscribed"' in payload[:30]:
            self.waiting = False

    def tick(self, tick: int) -> None:
        if not self.waiting:
            self.waiting = True
            self.transport.write(self.frame)
            self.group.counts["giant_subscribes_sent"] += 1
