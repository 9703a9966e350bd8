"""What an anonymous client can make the server hold (SPEC §6), attacked the ways the first
hostile suite (test_hostile.py) did not: batched fan-out to readers that stopped, long-polls
whose sockets left, endless empty frames, publish bodies sent without credentials, and
subscribes refused for their size. Attackers connect from 127.0.0.2 and up."""

from __future__ import annotations

import httpx
import pytest

from .hostile_attacks import ATTACKERS, AttackWebSocket, allow_open_files
from .support import AUTH, KEYS, Server, rss_mb

pytestmark = pytest.mark.slow

MB = 1 << 20


@pytest.fixture(scope="module")
def server():
    with Server("[server]\nwrite_stall_timeout = 60\n" + KEYS) as running:
        yield running


async def test_a_batch_to_readers_that_stopped_is_held_once_not_copied_per_subscriber(server):
    """200 WebSocket subscribers that never read, then one publish of 16 events of 60 KB in a
    batch: the frames are shared, each subscriber writes at most a socket's worth and keeps the
    rest by reference, so the server grows by well under 50 MB (a private copy of the batch per
    subscriber was +188 MB)."""
    allow_open_files(1000)
    sockets = [AttackWebSocket(server.port, "/ws?topics=batch.>", source=ATTACKERS[i % 4], rcvbuf=4096) for i in range(200)]
    try:
        for ws in sockets:
            ws.messages_until(lambda message: message.get("type") == "subscribed", 10)
        before = rss_mb(server.proc.pid)
        async with httpx.AsyncClient(timeout=30) as client:
            batch = [{"topic": "batch.x", "data": {"n": n, "pad": "b" * 60_000}} for n in range(16)]
            response = await client.post(f"{server.url}/api/publish", json=batch, headers=AUTH)
            assert response.status_code == 202, response.text
        grown = rss_mb(server.proc.pid) - before
    finally:
        for ws in sockets:
            ws.close()
    assert grown < 50, f"the server grew by {grown:.0f} MB for one batch to 200 stalled readers"
