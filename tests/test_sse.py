"""The SSE transport (stream/transports/sse.py) against a real server with httpx / httpx-sse."""

from __future__ import annotations

import asyncio
import os

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from .support import KEYS, Server, SSEReader, metric_now, publish, rss_mb, wait_for


async def test_headers_retry_and_position_come_first(server, client):
    """text/event-stream, no-store, no buffering; the stream begins with retry: 3000 and an id position."""
    async with client.stream("GET", f"{server.url}/sse?topics=ssehead.>") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        first = b""
        async for chunk in response.aiter_bytes():
            first += chunk
            if first.count(b"\n\n") >= 2:
                break
    retry, position = first.decode().split("\n\n")[:2]
    assert retry == "retry: 3000"
    assert position.startswith("id: ")


async def test_pattern_subscribe_receives_exactly_the_matching_events_in_order(server, client):
    """Each event is id + one JSON data line, no event: field; only matching topics, in order."""
    async with aconnect_sse(client, "GET", f"{server.url}/sse?topics=sseorder.news.>,sseorder.quotes.AAPL") as source:
        reader = SSEReader(source)
        await asyncio.sleep(0.1)
        topics = ["sseorder.news.sec", "sseorder.quotes.MSFT", "sseorder.quotes.AAPL", "sseorder.news"] * 25
        ids = await publish(client, server, [{"topic": t, "data": {"n": n}} for n, t in enumerate(topics)])
        expected = [(i, t) for i, t in zip(ids, topics, strict=False) if t in ("sseorder.news.sec", "sseorder.quotes.AAPL")]
        got = await reader.take(len(expected))
    assert [(e.id, orjson.loads(e.data)["topic"]) for e in got] == expected
    assert all(e.event == "message" for e in got)
    assert orjson.loads(got[0].data) == {"id": ids[0], "topic": "sseorder.news.sec", "ts": orjson.loads(got[0].data)["ts"], "data": {"n": 0}}


async def test_snapshot_first_without_ids_then_live(server, client):
    """snapshot=1 sends retained values marked snapshot, with no id line (Last-Event-ID must not move)."""
    await publish(client, server, [{"topic": "ssesnap.A", "data": 1}, {"topic": "ssesnap.B", "data": 2}])
    async with aconnect_sse(client, "GET", f"{server.url}/sse?topics=ssesnap.*&snapshot=1") as source:
        reader = SSEReader(source)
        snaps = await reader.take(2)
        [live_id] = await publish(client, server, {"topic": "ssesnap.A", "data": 3})
        [live] = await reader.take(1)
    assert [orjson.loads(s.data)["data"] for s in snaps] == [1, 2]
    assert all(orjson.loads(s.data)["snapshot"] is True for s in snaps)
    assert live.id == live_id and "snapshot" not in orjson.loads(live.data)


async def test_symbols_filter(server, client):
    """symbols=MSFT passes events sharing a symbol and events without symbols."""
    async with aconnect_sse(client, "GET", f"{server.url}/sse?topics=ssesym.>&symbols=MSFT") as source:
        reader = SSEReader(source)
        await asyncio.sleep(0.1)
        await publish(
            client,
            server,
            [
                {"topic": "ssesym.a", "data": {"symbols": ["AAPL"], "n": 1}},
                {"topic": "ssesym.a", "data": {"symbols": ["msft"], "n": 2}},
                {"topic": "ssesym.a", "data": {"n": 3}},
            ],
        )
        got = await reader.take(2)
    assert [orjson.loads(e.data)["data"]["n"] for e in got] == [2, 3]


async def test_heartbeat_comments():
    """A ': ping' comment arrives every sse_heartbeat seconds."""
    with Server(KEYS + "\n[server]\nsse_heartbeat = 0.2\n") as quick:
        async with httpx.AsyncClient() as http, http.stream("GET", f"{quick.url}/sse?topics=x") as response:
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if body.count(b": ping\n\n") >= 2:
                    break
    assert b": ping\n\n" in body


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("topics=news..x", 400, "bad_topic"),
        ("topics=news.>.x", 400, "bad_topic"),
        ("", 400, "bad_topic"),
        ("topics=a&since=garbage", 400, "bad_request"),
        ("topics=a&snapshot=perhaps", 400, "bad_request"),
        ("topics=a&token=wrong", 401, "unauthorized"),
        ("topics=" + ",".join(f"t{n}" for n in range(101)), 400, "too_many_subscriptions"),
    ],
)
async def test_errors_before_streaming_are_plain_http_errors(server, client, query, status, code):
    """Bad patterns, bad since, bad token, too many patterns: an HTTP error with the error JSON."""
    response = await client.get(f"{server.url}/sse?{query}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def test_since_from_the_future_is_a_bad_request(server, client):
    """A Last-Event-ID of this epoch newer than anything sent is refused before streaming."""
    welcome = (await client.get(f"{server.url}/api/events?topics=>&limit=1")).json()
    epoch = welcome["next"].rsplit("-", 1)[0]
    response = await client.get(f"{server.url}/sse?topics=a", headers={"Last-Event-ID": f"{epoch}-999999999"})
    assert response.status_code == 400 and "newer" in response.json()["error"]["message"]


async def _open_idle_streams(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` /sse subscribers that read their first chunk (headers and retry:) and then sit
    idle. They arrive ten at a time: hundreds of simultaneous requests would leave the server's
    allocator holding their transient memory (routing, ~20 KB a request), which is not what a
    stream costs once it runs."""
    batch = 10

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /sse?topics=memory.> HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"retry: ")
        assert head.startswith(b"HTTP/1.1 200"), head
        return writer

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, batch):
        writers += await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
    return writers


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
async def test_an_idle_stream_costs_the_server_at_most_10_kb():
    """1,500 idle SSE subscribers grow the server's resident memory by at most 10 KB each (a
    WebSocket costs ~10 KB; an SSE stream once held its whole ASGI middleware chain, ~26 KB)."""
    warm, count = 200, 1500
    toml = KEYS + "\n[server]\nlog_level = \"warning\"\nmax_connections = 5000\nmax_connections_per_client = 5000\n"
    with Server(toml) as server:
        sse = 'stream_connections{transport="sse"}'
        writers = await _open_idle_streams(server.port, warm)  # first-use allocations are not per stream
        await wait_for(lambda: metric_now(server, sse) == warm)
        before = rss_mb(server.proc.pid) * 1024
        writers += await _open_idle_streams(server.port, count)
        await wait_for(lambda: metric_now(server, sse) == warm + count)
        per_stream = (rss_mb(server.proc.pid) * 1024 - before) / count
        for writer in writers:
            writer.close()
    assert per_stream <= 10, f"{per_stream:.1f} KB of RSS per idle SSE stream"
