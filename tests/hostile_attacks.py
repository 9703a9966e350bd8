"""Misbehaving peers for tests/test_hostile.py. Every socket goes to 127.0.0.1 from 127.0.0.2 and
up, so per-address limits fall on the attacker and never on the canary (127.0.0.1).

Each helper is bounded in bytes and in time: it returns when the server closed the socket or
when its time is up, never later.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import connect

from .support import RawWebSocket

__all__ = [
    "ATTACKERS",
    "AttackWebSocket",
    "Held",
    "Response",
    "allow_open_files",
    "churn",
    "closed_by_peer",
    "endless_head",
    "exchange",
    "hold_requests",
    "open_stream",
    "oversized_head",
    "parse_response",
    "silent",
    "stalled_body",
    "stalled_socket",
    "trickle",
    "wait_closed",
]

ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# Linux TCP states (tcp_states.h): an aborted socket is CLOSE, one the peer shut with FIN is CLOSE_WAIT.
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8


def allow_open_files(count: int) -> None:
    """Raise this process' soft RLIMIT_NOFILE so it can hold ``count`` sockets (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def error_code(self) -> str | None:
        """``error.code`` of a JSON error body, or None."""
        try:
            return orjson.loads(self.body)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None


def parse_response(data: bytes) -> Response | None:
    """The first HTTP response in ``data`` (body cut to Content-Length when given), or None."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found or not head.startswith(b"HTTP/1."):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        body = body[: int(length)]
    return Response(int(lines[0].split(" ", 2)[1]), headers, body)


async def open_stream(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def wait_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float | None]:
    """Read until the server closes (EOF or reset): (what it sent, seconds it took), or
    (what it sent, None) when ``timeout`` passed first."""
    started = time.monotonic()
    received = bytearray()
    deadline = started + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
            if not chunk:
                return bytes(received), time.monotonic() - started
            received += chunk
    except TimeoutError:  # before OSError: TimeoutError is one
        return bytes(received), None
    except (ConnectionError, OSError):
        return bytes(received), time.monotonic() - started
    return bytes(received), None


async def exchange(port: int, source: str, request: bytes, timeout: float) -> Response | None:
    """Send one request and read one response head and body (None if none came in time)."""
    reader, writer = await open_stream(port, source)
    try:
        writer.write(request)
        return await read_response(reader, timeout)
    finally:
        writer.transport.abort()


async def read_response(reader: asyncio.StreamReader, timeout: float) -> Response | None:
    """One response from ``reader``: its head, then Content-Length bytes of body (or up to EOF)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        response = parse_response(head)
        if response is None:
            return None
        length = response.headers.get("content-length")
        if length is not None and length.isdigit():
            response.body = await asyncio.wait_for(reader.readexactly(int(length)), timeout)
        return response
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        return None


async def oversized_head(port: int, source: str, size: int, timeout: float) -> tuple[Response | None, bool]:
    """A GET whose one header grows to ``size`` bytes; return (the server's answer, closed?).

    Paced in 16 KiB pieces, each sent only once the server has had a moment to answer the last:
    a server that closes a socket with unread input resets it, and the reset destroys an answer
    the client has not read yet; pacing keeps the answer readable without changing the attack.
    """
    reader, writer = await open_stream(port, source)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    closing = asyncio.ensure_future(wait_closed(reader, timeout))
    sent, piece = 0, b"a" * 16384
    try:
        while sent < size and not closing.done():
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            await asyncio.wait([closing], timeout=0.05)
        if not closing.done():
            writer.write(b"\r\n\r\n")
    except (ConnectionError, OSError):
        pass
    data, closed_after = await closing
    writer.transport.abort()
    return parse_response(data), closed_after is not None


async def endless_head(port: int, source: str, timeout: float, max_bytes: int = 16 << 20) -> float | None:
    """Header lines of junk as fast as the socket takes them, never the blank line; the seconds
    until the server closed the socket, or None if it had not when time (or bytes) ran out."""
    reader, writer = await open_stream(port, source)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    closing = asyncio.ensure_future(wait_closed(reader, timeout))
    line = b"X-Junk: " + b"j" * 1014 + b"\r\n"
    sent = 0
    try:
        while sent < max_bytes and not closing.done() and time.monotonic() - started < timeout:
            writer.write(line * 16)
            await writer.drain()
            sent += len(line) * 16
    except (ConnectionError, OSError):
        closing.cancel()
        writer.transport.abort()
        return time.monotonic() - started
    _, closed_after = await closing
    writer.transport.abort()
    return None if closed_after is None else time.monotonic() - started


async def trickle(port: int, source: str, head: bytes, every: float, timeout: float) -> float | None:
    """Send ``head`` one byte per ``every`` seconds; seconds until the server closed the socket
    (counted from connect), or None if it had not after ``timeout``."""
    reader, writer = await open_stream(port, source)
    started = time.monotonic()
    closing = asyncio.ensure_future(wait_closed(reader, timeout))
    try:
        for index in range(len(head)):
            if closing.done():
                break
            writer.write(head[index : index + 1])
            await writer.drain()
            await asyncio.wait([closing], timeout=every)
    except (ConnectionError, OSError):
        closing.cancel()
        writer.transport.abort()
        return time.monotonic() - started
    _, closed_after = await closing
    writer.transport.abort()
    return closed_after


async def silent(port: int, source: str, timeout: float) -> float | None:
    """Connect and send nothing; seconds until the server closed the socket, or None."""
    reader, writer = await open_stream(port, source)
    _, closed_after = await wait_closed(reader, timeout)
    writer.transport.abort()
    return closed_after


async def answered_then_silent(port: int, source: str, request: bytes, timeout: float) -> tuple[Response | None, float | None]:
    """Send one request, read its answer, then say nothing: the answer, and the seconds from it
    until the server closed the socket (None if it did not within ``timeout``)."""
    reader, writer = await open_stream(port, source)
    try:
        writer.write(request)
        answer = await read_response(reader, timeout)
        _, closed_after = await wait_closed(reader, timeout)
        return answer, closed_after
    finally:
        writer.transport.abort()


async def stalled_body(port: int, source: str, key: str, timeout: float) -> float | None:
    """A publish announcing 1,000 bytes of body that sends 10 and stops; seconds from then until
    the server closed the socket, or None. (With a key, so the server has to wait for the body.)"""
    reader, writer = await open_stream(port, source)
    writer.write(
        (
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"topic": '
        ).encode()
    )
    await writer.drain()
    _, closed_after = await wait_closed(reader, timeout)
    writer.transport.abort()
    return closed_after


@dataclass
class Held:
    """How sockets that each sent one request fared: answered, closed unanswered, or still held."""

    answers: list[Response]
    dropped: int  # closed by the server without an answer
    held: int  # open, no answer yet

    def __str__(self) -> str:
        return f"{self.held} held, {len(self.answers)} answered, {self.dropped} closed without an answer"


async def hold_requests(port: int, source: str, requests: list[bytes], *, refusals: int, timeout: float) -> Held:
    """Send each request on its own socket at once; wait until ``refusals`` of them are answered or
    closed (or ``timeout``), then half a second more for any beyond those; then close them all."""
    streams = await asyncio.gather(*(open_stream(port, source) for _ in requests))
    for (_, writer), request in zip(streams, requests, strict=False):
        writer.write(request)
    reading = {asyncio.ensure_future(read_response(reader, timeout + 1)) for reader, _ in streams}
    done: set[asyncio.Future] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(done) < refusals and (remaining := deadline - time.monotonic()) > 0:
            finished, _ = await asyncio.wait(reading - done, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            done |= finished
        # An observation window, not a wait for a condition: answers past ``refusals`` show up here.
        finished, _ = await asyncio.wait(reading - done, timeout=0.5)
        done |= finished
    finally:
        for task in reading - done:
            task.cancel()
        for _, writer in streams:
            writer.transport.abort()
    answers = [task.result() for task in done]
    return Held([a for a in answers if a is not None], answers.count(None), len(requests) - len(done))


async def churn(url: str, source: str, client: int, rate: float, seconds: float) -> Counter:
    """Subscribe and unsubscribe groups of this client's own patterns (five literal, five
    wildcard) at ``rate`` ops/s, keeping up to 8 groups live (80 of the 100 patterns a connection
    may hold); count the answers by type."""
    counts: Counter = Counter()
    async with connect(url, local_addr=(source, 0), max_queue=None, open_timeout=20) as ws:

        async def read() -> None:
            async for frame in ws:
                message = orjson.loads(frame)
                for item in message if isinstance(message, list) else [message]:
                    counts[item.get("type")] += 1
                    if item.get("type") == "error":
                        counts[f"error {item.get('code')}"] += 1

        reader = asyncio.create_task(read())
        start = time.monotonic() + (client % 10) / (10 * rate)  # spread the clients over the period
        op = 0
        while time.monotonic() < start + seconds:
            group = op // 2 if op % 2 == 0 else max(0, op // 2 - 7)
            topics = [f"churn.c{client}.p{group}.{j}" for j in range(5)] + [f"*.x{group}c{client}.{j}" for j in range(5)]
            await ws.send(orjson.dumps({"op": "subscribe" if op % 2 == 0 else "unsubscribe", "topics": topics}).decode())
            op += 1
            await asyncio.sleep(max(0.0, start + op / rate - time.monotonic()))
        counts["sent"] = op
        deadline = time.monotonic() + 10
        while counts["subscribed"] + counts["unsubscribed"] + counts["error"] < op and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return counts


def stalled_socket(port: int, source: str, request: bytes, rcvbuf: int | None = 4096) -> socket.socket:
    """A socket with a small receive buffer that sends ``request`` and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed (FIN) or aborted (RST) this socket, seen without reading it."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


class AttackWebSocket(RawWebSocket):
    """RawWebSocket from a chosen source address, with its receive buffer set before connecting."""

    def __init__(self, port: int, path: str = "/ws", *, source: str = ATTACKERS[0], rcvbuf: int | None = None) -> None:
        self.source = source
        super().__init__(port, path, rcvbuf=rcvbuf)

    def open(self, port: int, rcvbuf: int | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
        sock.bind((self.source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        return sock

    def messages_until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float) -> list[dict[str, Any]]:
        """Text messages up to and including the first ``wanted`` one; fewer if the socket closes
        or ``timeout`` passes first."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                opcode, payload = self.frame(timeout=remaining)
                if opcode == 0x8:
                    break
                if opcode == 0x1:
                    message = orjson.loads(payload)
                    for item in message if isinstance(message, list) else [message]:
                        messages.append(item)
                        if wanted(item):
                            return messages
        except (OSError, EOFError):
            pass
        return messages

    def close_code(self, timeout: float) -> int | None:
        """Read until the server's close frame and return its code; None if the socket ended
        without one or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                opcode, payload = self.frame(timeout=remaining)
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (OSError, EOFError):
            pass
        return None

    def flood_pings(self, seconds: float) -> int | None:
        """Send masked empty PINGs as fast as the socket takes them for ``seconds``, reading whatever
        comes back and not stopping at the server's close frame (a hostile client would not);
        return the close code the server sent, or None if it sent none."""
        burst = (struct.pack("!BB", 0x89, 0x80) + os.urandom(4)) * 50
        deadline = time.monotonic() + seconds
        code = None
        try:
            while time.monotonic() < deadline:
                self.sock.sendall(burst)
                while code is None and (self.buffer or select.select([self.sock], [], [], 0)[0]):
                    opcode, payload = self.frame(timeout=1)
                    if opcode == 0x8:
                        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0
        except (OSError, EOFError):
            pass
        return code if code is not None else self.close_code(timeout=2)
