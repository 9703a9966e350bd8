"""The WebSocket transport (stream/transports/ws.py) against a real server with real clients."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect

from .support import (
    AUTH,
    KEYS,
    PUBLISH_KEY,
    RawWebSocket,
    Server,
    metric_now,
    publish,
    rss_mb,
    wait_for,
)


async def recv(ws, timeout: float = 5.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until(ws, kind: str, timeout: float = 5.0) -> dict:
    while True:
        message = await recv(ws, timeout)
        if message["type"] == kind:
            return message


async def test_welcome_frame_comes_first(server):
    """The first frame is welcome with version, heartbeat and limits."""
    async with connect(server.ws_url) as ws:
        welcome = await recv(ws)
    assert welcome["type"] == "welcome" and welcome["version"] == 1 and welcome["heartbeat"] == 20
    assert welcome["limits"]["max_frame_bytes"] == 65536 and welcome["limits"]["max_patterns"] == 100


async def test_pattern_subscribe_receives_exactly_the_matching_events_in_order(server, client):
    """news.> and quotes.AAPL receive their events, in publish order, nothing else."""
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"op": "subscribe", "topics": ["wsorder.news.>", "wsorder.quotes.AAPL"], "ref": "s1"}).decode())
        subscribed = await recv(ws)
        assert subscribed["type"] == "subscribed" and subscribed["ref"] == "s1"
        assert subscribed["topics"] == ["wsorder.news.>", "wsorder.quotes.AAPL"]
        topics = ["wsorder.news.sec", "wsorder.quotes.MSFT", "wsorder.quotes.AAPL", "wsorder.news", "wsorder.news.a.b"] * 20
        ids = await publish(client, server, [{"topic": t, "data": {"n": n}} for n, t in enumerate(topics)])
        expected = [(i, t) for i, t in zip(ids, topics, strict=False) if t != "wsorder.quotes.MSFT" and t != "wsorder.news"]
        got = [(m["id"], m["topic"]) for m in [await recv(ws) for _ in expected]]
    assert got == expected


async def test_query_string_subscribes_at_once(server, client):
    """/ws?topics=… subscribes without an op, for wscat-style clients."""
    async with connect(server.ws_url + "?topics=wsq.>") as ws:
        assert (await recv(ws))["type"] == "welcome"
        assert (await recv(ws))["type"] == "subscribed"
        [event_id] = await publish(client, server, {"topic": "wsq.a", "data": 1})
        event = await recv(ws)
    assert event["type"] == "event" and event["id"] == event_id and event["data"] == 1


async def test_snapshot_delivers_retained_values_first_marked(server, client):
    """snapshot=true sends each matching topic's latest event, marked, before live events."""
    await publish(client, server, [{"topic": "wssnap.A", "data": 1}, {"topic": "wssnap.A", "data": 2}, {"topic": "wssnap.B", "data": 3}])
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"op": "subscribe", "topics": ["wssnap.*"], "snapshot": True}).decode())
        assert (await recv(ws))["type"] == "subscribed"
        first, second = await recv(ws), await recv(ws)
        await publish(client, server, {"topic": "wssnap.B", "data": 4})
        live = await recv(ws)
    assert (first["topic"], first["data"], first["snapshot"]) == ("wssnap.A", 2, True)
    assert (second["topic"], second["data"], second["snapshot"]) == ("wssnap.B", 3, True)
    assert live["data"] == 4 and "snapshot" not in live


async def test_symbols_filter(server, client):
    """symbols=AAPL passes events sharing a symbol and events without symbols."""
    async with connect(server.ws_url + "?topics=wssym.>&symbols=aapl") as ws:
        await recv(ws), await recv(ws)
        await publish(
            client,
            server,
            [
                {"topic": "wssym.a", "data": {"symbols": ["TSLA"], "n": 1}},
                {"topic": "wssym.a", "data": {"symbols": ["AAPL", "MSFT"], "n": 2}},
                {"topic": "wssym.a", "data": {"n": 3}},
            ],
        )
        got = [(await recv(ws))["data"]["n"] for _ in range(2)]
    assert got == [2, 3]


async def test_unsubscribe_ping_and_publish_answer_with_ref(server):
    """Every op is answered with its ref echoed; publish needs a key and returns the id."""
    async with connect(server.ws_url + f"?token={PUBLISH_KEY}") as ws:
        await recv(ws)
        await ws.send('{"op":"subscribe","topics":["wspub.x"],"ref":1}')
        assert (await recv(ws))["ref"] == 1
        await ws.send('{"op":"ping","ref":"p"}')
        assert await recv(ws) == {"type": "pong", "ref": "p"}
        await ws.send('{"op":"publish","topic":"wspub.x","data":{"k":1},"ref":2}')
        frames = [await recv(ws), await recv(ws)]
        published = next(f for f in frames if f["type"] == "published")
        event = next(f for f in frames if f["type"] == "event")
        assert published["ref"] == 2 and published["id"] == event["id"]
        await ws.send('{"op":"unsubscribe","topics":["wspub.x"],"ref":3}')
        assert await recv(ws) == {"type": "unsubscribed", "topics": ["wspub.x"], "ref": 3}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"text"', "bad_request"),
        ('{"op": "dance", "ref": 9}', "unknown_op"),
        ('{"ref": 9}', "unknown_op"),
        ('{"op": [], "ref": 9}', "unknown_op"),
        ('{"op": {"a": 1}, "ref": 9}', "unknown_op"),
        ('{"op": "subscribe", "topics": ["news..x"], "ref": 9}', "bad_topic"),
        ('{"op": "subscribe", "topics": "news.>.x", "ref": 9}', "bad_topic"),
        ('{"op": "subscribe", "topics": [], "ref": 9}', "bad_topic"),
        ('{"op": "subscribe", "topics": ["a"], "since": "yesterday-ish", "ref": 9}', "bad_request"),
        ('{"op": "subscribe", "topics": ["a"], "snapshot": "maybe", "ref": 9}', "bad_request"),
        ('{"op": "publish", "topic": "a", "data": 1, "ref": 9}', "forbidden"),
        ('{"op": "publish", "topic": "_system.x", "data": 1, "ref": 9}', "forbidden"),
        ('{"op": "publish", "topic": "a.*", "data": 1, "ref": 9}', "bad_topic"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_stays_open(server, frame, code):
    """Each bad frame is answered with its error code and message; a ping afterwards still works."""
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == code, error
        assert error["message"]
        if "ref" in frame:
            assert error["ref"] == 9
        await ws.send('{"op":"ping"}')
        assert (await recv(ws))["type"] == "pong"


async def test_too_many_patterns(server):
    """More than 100 patterns on one connection is too_many_subscriptions; the first 100 stay."""
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"op": "subscribe", "topics": [f"many.t{n}" for n in range(100)]}).decode())
        assert (await recv(ws))["type"] == "subscribed"
        await ws.send(orjson.dumps({"op": "subscribe", "topics": ["many.extra"], "ref": "x"}).decode())
        error = await recv(ws)
    assert error["code"] == "too_many_subscriptions" and error["ref"] == "x"


async def test_frame_over_the_limit_closes_with_1009(server):
    """A message over max_frame_bytes (64 KiB) closes the connection with 1009, counted in
    stream_sockets_closed_total{reason="frame_too_large"}."""
    before = metric_now(server, 'stream_sockets_closed_total{reason="frame_too_large"}')
    async with connect(server.ws_url, max_size=None) as ws:
        await recv(ws)
        await ws.send("x" * (64 * 1024 + 1))
        with pytest.raises(websockets.ConnectionClosedError):
            await recv(ws)
    assert ws.close_code == 1009
    assert metric_now(server, 'stream_sockets_closed_total{reason="frame_too_large"}') == before + 1


async def test_publish_over_max_event_bytes_is_refused():
    """With max_event_bytes below the frame limit, an oversized publish is payload_too_large, connection open."""
    with Server(KEYS + "\n[server]\nmax_event_bytes = 1000\n") as small:
        async with connect(small.ws_url, additional_headers=AUTH) as ws:
            await recv(ws)
            await ws.send(orjson.dumps({"op": "publish", "topic": "big", "data": "x" * 2000, "ref": 1}).decode())
            error = await recv(ws)
            await ws.send('{"op":"ping"}')
            assert (await recv(ws))["type"] == "pong"
    assert error["code"] == "payload_too_large" and "max_event_bytes" in error["message"]


async def test_wrong_path_and_bad_token_are_refused_before_upgrade(server):
    """Only /ws upgrades; an unknown token is a 401 with the error JSON."""
    with pytest.raises(websockets.InvalidStatus) as info:
        async with connect(server.ws_url.replace("/ws", "/other")):
            pass
    assert info.value.response.status_code == 404
    with pytest.raises(websockets.InvalidStatus) as info:
        async with connect(server.ws_url + "?token=nope"):
            pass
    assert info.value.response.status_code == 401
    assert orjson.loads(info.value.response.body)["error"]["code"] == "unauthorized"


async def test_flooding_is_rate_limited_then_closed_with_1008(server):
    """Past 100 ops at once a connection gets rate_limited errors; a sustained flood is closed with 1008."""
    raw = RawWebSocket(server.port)
    raw.frame()  # welcome
    for _ in range(400):
        raw.send_text('{"op":"ping"}')
    messages, code = await asyncio.to_thread(raw.messages_until_close, 10)
    raw.close()
    kinds = [m.get("code", m["type"]) for m in messages]
    assert kinds[:100] == ["pong"] * 100
    assert "rate_limited" in kinds
    assert code == 1008


async def test_keepalive_closes_a_peer_that_never_answers_pings():
    """No pong within ws_ping_timeout: the server closes with 1011."""
    with Server(KEYS + "\n[server]\nws_ping_interval = 0.3\nws_ping_timeout = 0.3\n") as quick:
        raw = RawWebSocket(quick.port)
        started = time.monotonic()
        frames = []
        while True:
            opcode, payload = await asyncio.to_thread(raw.frame, 5)
            frames.append(opcode)
            if opcode == 0x8:
                break
        raw.close()
    assert 0x9 in frames  # the server pinged
    assert int.from_bytes(payload[:2], "big") == 1011
    assert time.monotonic() - started < 3


async def test_a_client_that_answers_pings_stays_connected():
    """The websockets client answers pings, so keepalive leaves it alone."""
    with Server(KEYS + "\n[server]\nws_ping_interval = 0.2\nws_ping_timeout = 0.5\n") as quick:
        async with connect(quick.ws_url) as ws:
            await recv(ws)
            await asyncio.sleep(1.5)
            await ws.send('{"op":"ping"}')
            assert (await recv(ws))["type"] == "pong"


async def test_an_oversized_ref_is_refused_not_echoed(server):
    """ref is echoed in every answer, so it is limited to a number or a short string."""
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"op": "ping", "ref": "r" * 5000}).decode())
        error = await recv(ws)
    assert error["code"] == "bad_request" and error["ref"] is None and "ref:" in error["message"]


async def test_unsolicited_pongs_do_not_defeat_the_keepalive():
    """A peer that sends pongs of its own but never answers the server's ping is closed with 1011."""
    with Server(KEYS + "\n[server]\nws_ping_interval = 0.3\nws_ping_timeout = 0.5\n") as quick:
        raw = RawWebSocket(quick.port)
        deadline = time.monotonic() + 5
        code = None
        while code is None and time.monotonic() < deadline:
            raw.send_frame(0xA, b"fake")
            try:
                opcode, payload = await asyncio.to_thread(raw.frame, 0.2)
            except TimeoutError:
                continue
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
        raw.close()
    assert code == 1011


async def test_a_client_that_sends_close_and_stops_reading_is_dropped():
    """Client-started close behind unread data: the server, which stopped reading this client, still
    drops it once the keepalive goes unanswered plus close_timeout; it does not linger forever."""
    with Server(KEYS + "\n[server]\nclose_timeout = 0.5\nws_ping_interval = 0.3\nws_ping_timeout = 0.3\n") as quick:
        async with httpx.AsyncClient() as http:
            raw = RawWebSocket(quick.port, "/ws?topics=unread.>")
            for _ in range(4):
                await publish(http, quick, [{"topic": "unread.a", "data": "x" * 60_000} for _ in range(10)])
            raw.send_frame(0x8, (1000).to_bytes(2, "big"))
            await wait_for(lambda: metric_now(quick, 'stream_connections{transport="ws"}') == 0, 10)
            raw.close()


async def test_a_client_that_never_reads_cannot_grow_server_memory():
    """Snapshot-heavy ops and pings from a client that reads nothing: the server stops reading it
    and closes it as a slow consumer; its memory stays bounded."""
    with Server(KEYS) as quick:
        async with httpx.AsyncClient() as http:
            for start in range(0, 500, 100):
                await publish(http, quick, [{"topic": f"big.t{n}", "data": "x" * 1000} for n in range(start, start + 100)])
            assert quick.proc is not None
            before = rss_mb(quick.proc.pid)
            raw = RawWebSocket(quick.port)
            raw.sock.setblocking(False)
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < 4:
                try:
                    raw.send_text('{"op":"subscribe","topics":["big.>"],"snapshot":true}')
                    raw.send_text('{"op":"unsubscribe","topics":["big.>"]}')
                    raw.send_frame(0x9, b"p" * 125)
                    sent += 1
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    await asyncio.sleep(0.05)  # the server stopped reading us
                await asyncio.sleep(0.01)
            after = rss_mb(quick.proc.pid)
            raw.close()
    assert after - before < 100, (before, after, sent)


async def test_forwarded_for_from_a_trusted_proxy_names_the_client():
    """Behind a trusted proxy (forwarded_allow_ips), per-client limits count X-Forwarded-For clients."""
    config = KEYS + '\n[server]\nmax_connections_per_client = 1\nforwarded_allow_ips = ["127.0.0.1"]\n'
    with Server(config) as limited:
        first = RawWebSocket(limited.port, headers="X-Forwarded-For: 203.0.113.1\r\n")
        second = RawWebSocket(limited.port, headers="X-Forwarded-For: 203.0.113.2\r\n")
        again = RawWebSocket(limited.port, headers="X-Forwarded-For: 203.0.113.1\r\n")
        welcome = orjson.loads((await asyncio.to_thread(second.frame))[1])
        messages, code = await asyncio.to_thread(again.messages_until_close, 5)
        for raw in (first, second, again):
            raw.close()
    assert welcome["type"] == "welcome"
    assert code == 1013 and messages[-1]["code"] == "over_capacity"


async def test_a_repeated_authorization_header_is_a_bad_request_not_a_traceback(server):
    """Two Authorization headers on /ws get 400 before the upgrade, and the log has no traceback."""
    raw = RawWebSocket(server.port, headers="Authorization: Bearer a\r\nAuthorization: Bearer b\r\n")
    raw.close()
    assert raw.status == 400
    assert "Traceback" not in server.output() and "Fatal error" not in server.output()
