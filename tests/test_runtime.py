"""Connection admission (stream/runtime.py): capacity limits per process, client and key, and
the turns of an address over its op share."""

from __future__ import annotations

import asyncio
import heapq

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect

from stream.app import build
from stream.settings import ServerSettings, Settings

from .support import PUBLISH_KEY, Server, metric_now, wait_for

LIMITED = f"""
[server]
max_connections = 5
max_connections_per_client = 3

[[keys]]
name = "bot"
key = "{PUBLISH_KEY}"
subscribe = [">"]
max_connections = 1
"""


async def test_over_capacity_websocket_is_closed_1013_and_sse_gets_200_with_retry():
    """Past max_connections_per_client: WS closes with 1013, SSE answers 200 + retry and ends."""
    with Server(LIMITED) as server:
        held = [await connect(server.ws_url) for _ in range(3)]
        async with connect(server.ws_url) as extra:
            messages = []
            try:
                async for frame in extra:
                    messages.append(orjson.loads(frame))
            except websockets.ConnectionClosed:
                pass
        assert extra.close_code == 1013
        assert messages[-1]["code"] == "over_capacity"
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{server.url}/sse?topics=x")
        assert response.status_code == 200
        assert response.text.startswith("retry: ") and "over capacity" in response.text
        await held[0].close()
        await wait_for(lambda: metric_now(server, 'stream_connections{transport="ws"}') == 2)  # its slot is free
        async with connect(server.ws_url) as again:
            assert orjson.loads(await again.recv())["type"] == "welcome"
        for ws in held[1:]:
            await ws.close()


async def test_a_key_with_max_connections_gets_no_more():
    """A key's max_connections caps its open streams; anonymous clients are not affected."""
    with Server(LIMITED) as server:
        async with connect(server.ws_url + f"?token={PUBLISH_KEY}") as first:
            assert orjson.loads(await first.recv())["type"] == "welcome"
            async with connect(server.ws_url + f"?token={PUBLISH_KEY}") as second:
                await second.recv()
                await asyncio.wait_for(second.wait_closed(), 5)
            assert second.close_code == 1013
            async with connect(server.ws_url) as anonymous:
                assert orjson.loads(await anonymous.recv())["type"] == "welcome"


class _FakeStream:
    """Just enough of a Connection for the runtime's bookkeeping."""

    transport_name = "ws"
    client_host = client_group = "127.0.0.9"
    forwarded = False

    def __init__(self, expires_in: float) -> None:
        import time

        from stream.auth import Principal

        self.principal = Principal("bot", (), (), kind="token", expires=time.time() + expires_in)
        self.expired = 0

    def expire(self) -> None:
        self.expired += 1


async def test_token_expiry_timer_fires_once_and_release_cancels_it():
    """A JWT connection is told once when its token expires; one released before then never is,
    and the runtime keeps no timer for either afterwards."""
    from stream.app import build
    from stream.settings import Settings

    runtime = build(Settings()).runtime
    kept, released = _FakeStream(0.2), _FakeStream(0.2)
    runtime.admit(kept)
    runtime.admit(released)
    runtime.release(released)
    await wait_for(lambda: kept.expired == 1, 5)
    assert (kept.expired, released.expired) == (1, 0)
    runtime.release(kept)
    assert runtime._expiries == {} and runtime.connections == set()


def test_an_address_over_its_op_share_is_served_at_the_share_with_about_one_wake_per_op():
    """50 connections of one address, 4 ops each, past a share of 100 ops/s (burst 10): read the
    way WebSocketProtocol does (an op, then the debt; in debt, sleep until ops_turn), they finish
    when the share allows (190 ops after the burst: 1.9 s) and wake about once per op, where
    sleeping a random part of the debt woke ~30 times per op."""
    runtime = build(Settings(server=ServerSettings(ws_ops_rate_per_client=100, ws_ops_burst_per_client=10))).runtime
    host, ops_left = "10.0.0.1", [4] * 50
    asleep = [(0.0, connection) for connection in range(50)]  # (wakes at, connection), a fake clock
    wakes, finished = 0, 0.0
    while asleep:
        now, connection = heapq.heappop(asleep)
        wakes += 1
        wait = runtime.ops_debt(host, now)
        while not wait and ops_left[connection]:
            ops_left[connection] -= 1
            runtime.charge_ops(host)
            wait = runtime.ops_debt(host, now)
        if ops_left[connection]:
            heapq.heappush(asleep, (now + runtime.ops_turn(host, now, wait), connection))
        else:
            finished = max(finished, now)
    assert finished == pytest.approx(1.9, abs=0.05)
    assert wakes <= 1.5 * 200, wakes
    # Another address's turns are its own.
    assert runtime.ops_turn("10.0.0.2", finished, 0.005) == pytest.approx(0.005)
