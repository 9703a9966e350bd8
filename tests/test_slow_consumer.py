"""A slow subscriber never delays anyone else (SPEC §2.4): the overflow policies against a real
server, with a client that stops reading its socket."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from .support import KEYS, RawWebSocket, Server, publish

pytestmark = pytest.mark.slow

PAD = "x" * 180  # ~250-byte events, as in the benchmark


async def _collect(ws, count: int, latencies: list[float], seen: list[int]) -> None:
    while len(seen) < count:
        message = orjson.loads(await ws.recv())
        if message["type"] == "event":
            latencies.append(time.time() - message["ts"] / 1000)
            seen.append(message["data"]["n"])


async def _round(server: Server, http: httpx.AsyncClient, clients: list, total: int) -> tuple[list[float], list[list[int]]]:
    """Publish ``total`` events at a steady pace; every client must receive all of them."""
    latencies: list[float] = []
    seen: list[list[int]] = [[] for _ in clients]
    readers = [asyncio.create_task(_collect(ws, total, latencies, s)) for ws, s in zip(clients, seen, strict=False)]
    for start in range(0, total, 100):
        await publish(http, server, [{"topic": "load.a", "data": {"n": n, "pad": PAD}} for n in range(start, start + 100)])
        await asyncio.sleep(0.1)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    return latencies, seen


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def test_a_stalled_client_does_not_delay_50_others_and_is_closed_4008():
    """5,000 events: 50 readers get all of them with latency like a run without the stalled client;
    the stalled client's close frame (4008) is queued behind its data and arrives once it reads."""
    with Server(KEYS + "\n[server]\nclose_timeout = 60\n") as server:
        async with httpx.AsyncClient(timeout=30) as http:
            clients = [await connect(server.ws_url + "?topics=load.>", max_queue=None) for _ in range(50)]
            for ws in clients:
                await ws.recv(), await ws.recv()
            base_latency, base_seen = await _round(server, http, clients, 5000)

            stalled = RawWebSocket(server.port, "/ws?topics=load.>")
            slow_latency, slow_seen = await _round(server, http, clients, 5000)

            for seen in base_seen + slow_seen:
                assert seen == list(range(5000))
            base_p50, slow_p50 = statistics.median(base_latency), statistics.median(slow_latency)
            base_p99, slow_p99 = _p(base_latency, 99), _p(slow_latency, 99)
            print(f"\nlatency without stalled client p50 {base_p50 * 1000:.1f} ms p99 {base_p99 * 1000:.1f} ms; "
                  f"with: p50 {slow_p50 * 1000:.1f} ms p99 {slow_p99 * 1000:.1f} ms")
            # Generous: the stalled client may cost a little CPU, never a wait on it.
            assert slow_p50 <= 3 * base_p50 + 0.05
            assert slow_p99 <= 3 * base_p99 + 0.1

            messages, code = await asyncio.to_thread(stalled.messages_until_close, 30)
            stalled.close()
            for ws in clients:
                await ws.close()
    assert code == 4008
    numbers = [m["data"]["n"] for m in messages if m["type"] == "event"]
    assert numbers == list(range(len(numbers))) and len(numbers) < 5000  # in order, then cut off


async def test_a_stalled_client_that_cannot_drain_its_close_frame_is_aborted():
    """With close_timeout=1 s, a client that never reads is dropped about a second after overflowing."""
    with Server(KEYS + "\n[server]\nclose_timeout = 1\nsubscriber_buffer = 100\n") as server:
        async with httpx.AsyncClient(timeout=30) as http:
            stalled = RawWebSocket(server.port, "/ws?topics=abort.>")

            async def ws_connections() -> int:
                text = (await http.get(f"{server.url}/metrics")).text
                line = next(line for line in text.splitlines() if line.startswith('stream_connections{transport="ws"}'))
                return int(float(line.split()[-1]))

            assert await ws_connections() == 1
            for start in range(0, 3000, 100):
                await publish(http, server, [{"topic": "abort.a", "data": {"n": n, "pad": PAD}} for n in range(start, start + 100)])
            overflowed = time.monotonic()
            while await ws_connections() != 0:
                assert time.monotonic() - overflowed < 5
                await asyncio.sleep(0.1)
            metrics = (await http.get(f"{server.url}/metrics")).text
            stalled.close()
    assert "stream_slow_consumer_disconnects_total 1.0" in metrics


async def test_drop_policy_sends_a_gap_and_keeps_the_connection():
    """drop: the stalled client later reads a gap(overflow) and then the newest events; not closed."""
    with Server(KEYS + '\n[overflow]\n"lossy.>" = "drop"\n') as server:
        async with httpx.AsyncClient(timeout=30) as http:
            stalled = RawWebSocket(server.port, "/ws?topics=lossy.>")
            ids = []
            for start in range(0, 5000, 100):
                ids += await publish(http, server, [{"topic": "lossy.a", "data": {"n": n, "pad": PAD}} for n in range(start, start + 100)])
            messages = []
            while not messages or messages[-1].get("id") != ids[-1]:
                opcode, payload = await asyncio.to_thread(stalled.frame, 10)
                assert opcode == 0x1, "the connection must stay open"
                messages.append(orjson.loads(payload))
            stalled.close()
    kinds = [m["type"] for m in messages]
    assert "gap" in kinds
    gap = messages[kinds.index("gap")]
    assert gap["reason"] == "overflow" and gap["after"]
    numbers = [m["data"]["n"] for m in messages if m["type"] == "event"]
    assert numbers == sorted(numbers) and numbers[-1] == 4999 and len(numbers) < 5000


async def test_conflate_policy_delivers_the_newest_value_of_each_topic():
    """conflate: after stalling, the client reads the newest value of every topic, and no gap."""
    with Server(KEYS + '\n[overflow]\n"ticks.>" = "conflate"\n') as server:
        async with httpx.AsyncClient(timeout=30) as http:
            stalled = RawWebSocket(server.port, "/ws?topics=ticks.>")
            latest: dict[str, int] = {}
            for start in range(0, 5000, 100):
                batch = [{"topic": f"ticks.S{n % 10}", "data": {"n": n, "pad": PAD}} for n in range(start, start + 100)]
                await publish(http, server, batch)
                latest.update({item["topic"]: item["data"]["n"] for item in batch})
            last_seen: dict[str, int] = {}
            messages = []
            while last_seen != latest:
                opcode, payload = await asyncio.to_thread(stalled.frame, 10)
                assert opcode == 0x1, "the connection must stay open"
                message = orjson.loads(payload)
                messages.append(message)
                if message["type"] == "event":
                    last_seen[message["topic"]] = message["data"]["n"]
            stalled.close()
    assert all(m["type"] in ("welcome", "subscribed", "event") for m in messages)
    assert sum(m["type"] == "event" for m in messages) < 5000
