"""What an anonymous client can make the server hold (SPEC §6), attacked the ways the first
hostile suite (test_hostile.py) did not: batched fan-out to readers that stopped, long-polls
whose sockets left, endless empty frames, publish bodies sent without credentials, and
subscribes refused for their size. Attackers connect from 127.0.0.2 and up."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import httpx
import pytest

from .hostile_attacks import ATTACKERS, AttackWebSocket, allow_open_files, exchange, open_stream, read_response
from .support import AUTH, KEYS, Server, metric_now, rss_mb, wait_for
from .test_hostile import eventually

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


async def test_a_head_over_the_limit_gets_431_however_its_bytes_arrive(server):
    """A 100 KiB header sent in one write often reaches the server in the very read that
    completes the head, where a count of the incomplete head never sees it: 20 such requests all
    get 431 head_too_large, none reaches the app."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 100 * 1024 + b"\r\n\r\n"
    answers = await asyncio.gather(*(exchange(server.port, ATTACKERS[i % 4], head, 10) for i in range(20)))
    statuses = [answer.status if answer else None for answer in answers]
    assert statuses == [431] * 20, statuses
    assert all(answer.error_code() == "head_too_large" for answer in answers if answer)


async def test_a_url_that_arrives_in_many_pieces_is_counted_once_against_the_head_bound(server):
    """A 60,000-byte URL (under max_head_bytes, 64 KiB) sent in 600 pieces, each read on its own:
    the request line is counted once, not 16 bytes more per piece, so it is answered, not 431."""
    url = b"/healthz?pad=" + b"u" * (60_000 - 13)
    reader, writer = await open_stream(server.port, ATTACKERS[2])
    try:
        request = b"GET " + url + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        for start in range(0, len(request), 100):
            writer.write(request[start : start + 100])
            await writer.drain()
            await asyncio.sleep(0.001)  # pacing: each piece is its own read on the server
        answer = await read_response(reader, 10)
    finally:
        writer.transport.abort()
    assert answer is not None and answer.status == 200, answer and answer.status


async def test_a_long_poll_ends_when_its_socket_does(server):
    """500 long-polls of 100 patterns each (wait=60) that connect, send and close at once: the
    server lets go of their 50,000 subscriptions within seconds, not after 60."""
    patterns = ",".join(f"gone.p{n}" for n in range(100))
    request = f"GET /api/events?topics={patterns}&wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    async def hit_and_run(source: str) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))
        writer.write(request)
        await writer.drain()
        writer.close()

    before = metric_now(server, "stream_subscriptions ")
    for start in range(0, 500, 50):
        await asyncio.gather(*(hit_and_run(ATTACKERS[i % 4]) for i in range(start, start + 50)))
    await wait_for(lambda: metric_now(server, "stream_sockets ") <= 2, 10)  # the sockets are gone ...
    await wait_for(lambda: metric_now(server, "stream_subscriptions ") <= before, 5)  # ... and so are their waits


async def test_empty_continuation_frames_cost_ops_and_a_flood_of_them_is_closed(server):
    """A fragmented message then 200,000 empty continuation frames on one anonymous socket: each
    costs an op, so the flood is closed with 1008 instead of being parsed for free."""
    ws = AttackWebSocket(server.port, source=ATTACKERS[1])
    try:
        ws.messages_until(lambda message: message.get("type") == "welcome", 10)
        mask = b"\x00\x00\x00\x00"
        ws.sock.sendall(b"\x01\x80" + mask)  # TEXT, not final, empty
        empty = b"\x00\x80" + mask  # CONT, not final, empty
        code = None
        for _ in range(40):
            try:
                ws.sock.sendall(empty * 5000)
            except OSError:
                break
            code = ws.close_code(timeout=0.05) if code is None else code
            if code is not None:
                break
        code = code if code is not None else ws.close_code(timeout=5)
    finally:
        ws.close()
    assert code == 1008, f"closed with {code}"


def flood_continuations(sockets: list[AttackWebSocket], seconds: float) -> dict[AttackWebSocket, int]:
    """Each socket: a fragmented message begun, then bursts of 5,000 empty continuation frames
    while the server takes them, for at most ``seconds``; the close codes the server sent."""
    mask = b"\x00\x00\x00\x00"
    burst = (b"\x00\x80" + mask) * 5000  # CONT, not final, empty
    for ws in sockets:
        ws.sock.sendall(b"\x01\x80" + mask)  # TEXT, not final, empty
    codes: dict[AttackWebSocket, int] = {}
    deadline = time.monotonic() + seconds
    while len(codes) < len(sockets) and time.monotonic() < deadline:
        for ws in sockets:
            if ws in codes:
                continue
            ws.sock.settimeout(0.02)
            try:
                ws.sock.send(burst)
            except (TimeoutError, BlockingIOError):
                pass  # the server reads it slower
            except OSError:
                codes[ws] = 0
                continue
            code = ws.close_code(timeout=0.02)
            if code is not None:
                codes[ws] = code
    return codes


async def test_flooders_read_slower_by_their_address_share_are_still_closed_and_dropped_when_gone(server):
    """Four sockets of one address flood empty continuation frames. The address's op share reads
    them slower, so now and then an op of theirs gets through: each is still closed with 1008 as
    a flood, since refusals count until they leak away at the op rate, not only in a row (before,
    none was ever closed). Four more flood for a second and vanish (reset) with ~100 KB of frames
    queued in the server's kernel each: they are dropped at their next turn, not held while that
    is read at the address's rate (over three minutes before)."""
    allow_open_files(1000)
    before = metric_now(server, "stream_sockets ")
    spenders = [AttackWebSocket(server.port, source="127.0.0.6") for _ in range(22)]
    flooders = [AttackWebSocket(server.port, source="127.0.0.6") for _ in range(4)]
    try:
        for ws in spenders + flooders:
            ws.messages_until(lambda message: message.get("type") == "welcome", 10)
        for ws in spenders:  # 99 PINGs each, within each connection's burst: the address's share is spent
            ws.sock.sendall((b"\x89\x80\x00\x00\x00\x00") * 99)
        codes = flood_continuations(flooders, 30)
    finally:
        for ws in spenders + flooders:
            ws.close()
    assert sorted(codes.values()) == [1008] * 4, codes
    await wait_for(lambda: metric_now(server, "stream_sockets ") <= before, 10)
    spenders = [AttackWebSocket(server.port, source="127.0.0.7") for _ in range(22)]
    vanishing = [AttackWebSocket(server.port, source="127.0.0.7") for _ in range(4)]
    try:
        for ws in spenders + vanishing:
            ws.messages_until(lambda message: message.get("type") == "welcome", 10)
        for ws in spenders:
            ws.sock.sendall((b"\x89\x80\x00\x00\x00\x00") * 99)
        flood_continuations(vanishing, 1)
    finally:
        for ws in vanishing:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.sock.close()  # a reset
        for ws in spenders:
            ws.close()
    await wait_for(lambda: metric_now(server, "stream_sockets ") <= before, 15)


async def test_a_fragmented_message_refused_at_its_first_fragment_is_reported_not_dropped_silently(server):
    """100 PINGs spend the connection's op burst; then a message in two fragments, its first
    one over the rate: the client is told (rate_limited) that its message was dropped, and is
    not left waiting for an answer that never comes."""
    ws = AttackWebSocket(server.port, source=ATTACKERS[1])
    try:
        ws.messages_until(lambda message: message.get("type") == "welcome", 10)
        mask = b"\x00\x00\x00\x00"
        first, last = b'{"op":"ping",', b'"ref":7}'
        ws.sock.sendall(
            (b"\x89\x80" + mask) * 100  # PING, empty: each costs an op
            + bytes([0x01, 0x80 | len(first)]) + mask + first  # TEXT, not final
            + bytes([0x80, 0x80 | len(last)]) + mask + last  # CONTINUATION, final
        )
        messages = ws.messages_until(lambda message: message.get("type") in ("error", "pong"), 10)
    finally:
        ws.close()
    assert messages and messages[-1]["type"] == "error", messages
    assert messages[-1]["code"] == "rate_limited" and "fragmented message" in messages[-1]["message"]


async def test_a_refused_subscribe_costs_its_address_one_op_not_its_pattern_count(server):
    """Three subscribes of 5,000 patterns each (refused: too_many_subscriptions) from one
    address; another connection from that address still gets its pong at once."""
    big = '{"op":"subscribe","topics":[' + ",".join(f'"many.p{n}"' for n in range(5000)) + "]}"
    first, second = AttackWebSocket(server.port, source=ATTACKERS[2]), AttackWebSocket(server.port, source=ATTACKERS[2])
    try:
        for ws in (first, second):
            ws.messages_until(lambda message: message.get("type") == "welcome", 10)
        for _ in range(3):
            first.send_text(big)
        errors = first.messages_until(lambda message: message.get("type") == "error", 10)
        assert errors and errors[-1]["code"] == "too_many_subscriptions", errors
        started = asyncio.get_running_loop().time()
        second.send_text('{"op":"ping","ref":1}')  # read at once: the debt is found only after it
        second.send_text('{"op":"ping","ref":2}')
        pong = second.messages_until(lambda message: message.get("ref") == 2, 40)
        waited = asyncio.get_running_loop().time() - started
    finally:
        first.close()
        second.close()
    assert pong and pong[-1]["type"] == "pong"
    assert waited < 2, f"a ping waited {waited:.1f} s behind refused subscribes of its address"


async def test_a_publish_without_credentials_is_answered_from_its_head_and_its_body_never_read(server):
    """100 anonymous publishes that declare 1 MiB bodies and send a few bytes of them: each is
    answered 401 at once and closed; the server holds none of the bodies."""
    head = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
    before = rss_mb(server.proc.pid)
    answers = await asyncio.gather(*(exchange(server.port, ATTACKERS[i % 4], head + b'[{"topic":', 5) for i in range(100)))
    assert [answer.status if answer else None for answer in answers] == [401] * 100
    assert all(answer.headers.get("connection") == "close" for answer in answers if answer)
    assert rss_mb(server.proc.pid) - before < 20
    with_key = await exchange(server.port, ATTACKERS[0], head.replace(b"\r\n\r\n", f"\r\nAuthorization: {AUTH['Authorization']}\r\n\r\n".encode()), 1)
    assert with_key is None, "a publish with a key waits for its body"


async def test_a_websocket_upgraded_behind_an_unread_answer_starts_paused_and_is_closed_as_slow(server):
    """On one keep-alive socket that reads nothing: a big /api/events answer (left unread), then a
    WebSocket upgrade subscribing to everything, then 2,000 events of 10 KB. The transport is
    still paused from the HTTP answer, so the connection starts paused: its events queue in its
    bounded buffer and it is closed as a slow consumer, instead of every event piling up in the
    transport (+20 MB and more, never closed)."""
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(10):  # ~1 MB of history: an answer that cannot all go to the kernel
            await client.post(f"{server.url}/api/publish", json=[{"topic": "pre.x", "data": {"pad": "h" * 1000}}] * 100, headers=AUTH)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((ATTACKERS[3], 0))
        sock.connect(("127.0.0.1", server.port))
        try:
            answered = server.output().count("/api/events?topics=pre")
            get = b"GET /api/events?topics=pre.%3E&since=-1h&limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
            for n in range(1, 4):  # more unread answer than the kernel takes: the rest waits in the transport
                sock.sendall(get)
                await wait_for(lambda n=n: server.output().count("/api/events?topics=pre") >= answered + n, 10)  # its answer went out
            sock.sendall(  # the upgrade is read right after this answer is written, while the transport is paused
                get + b"GET /ws?topics=up.%3E HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await wait_for(lambda: metric_now(server, 'stream_connections{transport="ws"}') >= 1, 10)
            slow_before = metric_now(server, "stream_slow_consumer_disconnects_total")
            before, history_before = rss_mb(server.proc.pid), metric_now(server, "stream_history_bytes ")
            for _ in range(20):
                answer = await client.post(f"{server.url}/api/publish", json=[{"topic": "up.x", "data": {"pad": "p" * 10_000}}] * 100, headers=AUTH)
                assert answer.status_code == 202
            grown = rss_mb(server.proc.pid) - before - (metric_now(server, "stream_history_bytes ") - history_before) / MB
            closed = await eventually(lambda: metric_now(server, "stream_slow_consumer_disconnects_total") > slow_before, 10)
        finally:
            sock.close()
    assert closed, "the subscriber that reads nothing was never closed as a slow consumer"
    assert grown < 10, f"the server grew by {grown:.0f} MB beyond its history for one subscriber that reads nothing"

