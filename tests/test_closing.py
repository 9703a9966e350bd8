"""Every socket the server decides to close is gone within ``write_stall_timeout``, however the
peer behaves (SPEC §6): a close waits for the peer to read what was written before it, so a
peer that stopped reading could otherwise keep a closed socket open, and counted, for ever.

Each test makes the server close a socket (pipelining past the limit, a 431, a 400, its own
keep-alive timeout, a Connection: close answer, a refused WebSocket handshake) while a response
it wrote sits unread, and measures when the socket is gone."""

from __future__ import annotations

import asyncio
import select
import time
from pathlib import Path

import httpx
import pytest

from .hostile_attacks import ATTACKERS, stalled_socket
from .support import AUTH, KEYS, Server, metric_now

pytestmark = pytest.mark.slow

WRITE_STALL_TIMEOUT, KEEP_ALIVE = 2, 1
SLACK = 2.5  # a timer may fire a tick late on two shared cores


@pytest.fixture(scope="module")
def server():
    """A server whose history holds 1,000 events of ~1 KB, so /api/events answers are big."""
    config = f"[server]\nwrite_stall_timeout = {WRITE_STALL_TIMEOUT}\nkeep_alive_timeout = {KEEP_ALIVE}\n" + KEYS
    with Server(config) as running:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            for start in range(0, 1000, 100):
                batch = [{"topic": "big.x", "data": {"n": n, "pad": "p" * 1000}} for n in range(start, start + 100)]
                assert http.post(f"{running.url}/api/publish", json=batch).status_code == 202
        yield running


def big(limit: int = 1000, extra: str = "") -> bytes:
    """A request whose answer is ``limit`` KB or so of events."""
    return f"GET /api/events?topics=big.%3E&since=-1h&limit={limit} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


# TCP states (tcp_states.h) in which the server's end still holds something: the connection
# open, or closed by the process with output still unsent (FIN-WAIT-1 keeps its send buffer).
# FIN-WAIT-2 and TIME-WAIT are what TCP keeps of any closed connection: no buffer, no descriptor.
_HOLDING = {"01", "04", "08", "09", "0B"}  # ESTABLISHED, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING


def server_end_exists(server_port: int, client: tuple[str, int]) -> bool:
    """Whether the kernel's end of the server's connection from ``client`` still holds anything."""
    host, port = client
    remote = f"{int.from_bytes(bytes(map(int, host.split('.'))), 'little'):08X}:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{server_port:04X}") and fields[2] == remote and fields[3] in _HOLDING:
            return True
    return False


async def gone_within(server: Server, request: bytes, limit: float, then: bytes = b"") -> float:
    """Send ``request`` from a socket that never reads (and, once the server's answer has begun
    to arrive, ``then``); the seconds until the server's end of it is gone, from the process (its
    socket count back where it was) and from the kernel. Fails if that takes over ``limit``."""
    before = metric_now(server, "stream_sockets ")
    sock = stalled_socket(server.port, ATTACKERS[0], request)
    client = sock.getsockname()
    started = time.monotonic()
    try:
        if then:
            while not select.select([sock], [], [], 0)[0]:  # the answer is on its way: it waits unread
                assert time.monotonic() - started < limit, "no answer came"
                await asyncio.sleep(0.02)
            sock.sendall(then)
        while server_end_exists(server.port, client) or metric_now(server, "stream_sockets ") > before:
            assert time.monotonic() - started < limit, f"the server still held the socket after {limit} s"
            await asyncio.sleep(0.05)
    finally:
        sock.close()
    return time.monotonic() - started


async def test_a_socket_closed_for_pipelining_past_the_limit_is_gone_though_its_answer_is_unread(server):
    """A big request, and once its answer waits unread, 20 more in one write: closed for
    pipelining, and gone in time."""
    await gone_within(server, big(), WRITE_STALL_TIMEOUT + SLACK, then=big() * 20)


async def test_a_connection_close_answer_nobody_reads_does_not_keep_the_socket(server):
    """One answer of ~60 KB (below the transport's high-water mark) with Connection: close,
    never read: the close waits on it only until write_stall_timeout."""
    await gone_within(server, big(60, "Connection: close\r\n"), WRITE_STALL_TIMEOUT + SLACK)


async def test_uvicorns_own_keep_alive_close_is_bounded_too(server):
    """An answer of ~60 KB on a keep-alive socket, never read: uvicorn closes it after
    keep_alive_timeout, and it is gone write_stall_timeout later."""
    await gone_within(server, big(60), KEEP_ALIVE + WRITE_STALL_TIMEOUT + SLACK)


async def test_a_431_after_an_unread_answer_is_gone_in_time(server):
    """A big request, and once its answer waits unread, a 100 KiB head: 431, and gone in time."""
    oversized = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100 * 1024 + b"\r\n\r\n"
    await gone_within(server, big(), WRITE_STALL_TIMEOUT + SLACK, then=oversized)


async def test_a_400_after_an_unread_answer_is_gone_in_time(server):
    """A big request, and once its answer waits unread, garbage uvicorn cannot parse: its 400,
    and gone in time."""
    await gone_within(server, big(), WRITE_STALL_TIMEOUT + SLACK, then=b"\x00\x01 nonsense\r\n\r\n")


async def test_a_refused_websocket_handshake_behind_an_unread_answer_is_gone_in_time(server):
    """A big request, and once its answer waits unread, a WebSocket upgrade to a path that does
    not exist (404): the refusal closes the socket, and it is gone in time."""
    upgrade = (
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await gone_within(server, big(), WRITE_STALL_TIMEOUT + SLACK, then=upgrade)
