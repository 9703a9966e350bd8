"""Write coalescing (``write_delay``): events accepted inside the write window share one socket
write per subscriber, without changing order, replies' places, overflow or gaps.

The hub tests drive one real event loop with a recording sink; the server tests run a real
``stream serve`` and count the writes in ``stream_event_writes_total``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from stream.hub import Hub, HubConfig, Policy
from tests.support import AUTH, KEYS, PUBLISH_KEY, RawWebSocket, Server, metric_now, wait_for, wait_until

WINDOW = 0.2  # long enough that a loaded machine still publishes a burst inside one window


class Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def encode(self, event) -> bytes:
        return f"E {event.seq}\n".encode()

    encode_snapshot = encode

    def encode_gap(self, after, reason) -> bytes:
        return f"G {reason}\n".encode()

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def overflowed(self) -> None:
        self.writes.append(b"CLOSED\n")

    def lines(self) -> list[str]:
        return b"".join(self.writes).decode().splitlines()


def subscribed(hub: Hub, patterns: list[str]) -> tuple:
    sink = Sink()
    sub = hub.new_subscriber(sink, transport="test")
    hub.subscribe(sub, patterns)
    return sub, sink


def test_events_inside_the_window_leave_in_one_write_in_order():
    """The first event goes at once; the ones after it in the window wait and share one write."""

    async def run():
        hub = Hub(HubConfig(write_load=0, write_delay=WINDOW))
        sub, sink = subscribed(hub, ["a.>"])
        events = [await hub.publish(f"a.{n % 3}", n) for n in range(6)]
        assert len(sink.writes) == 1  # only the first so far: the rest are held
        await wait_for(lambda: len(sink.writes) == 2)
        assert sink.lines() == [f"E {event.seq}" for event in events]
        assert (sub.sent, sub.merged) == (6, 4)  # 6 events in 2 writes
        await hub.close()

    asyncio.run(run())


def test_without_a_window_every_event_is_its_own_write():
    async def run():
        hub = Hub(HubConfig(write_delay=0))
        sub, sink = subscribed(hub, ["a"])
        for n in range(5):
            await hub.publish("a", n)
        assert len(sink.writes) == 5 and sub.merged == 0

    asyncio.run(run())


class SlowSink(Sink):
    """A socket whose every write costs the loop 2 ms of CPU, as writes to many sockets do."""

    def write(self, data: bytes) -> None:
        until = time.thread_time() + 0.002
        while time.thread_time() < until:
            pass
        super().write(data)


def test_windows_open_only_when_writing_keeps_the_loop_busy():
    """With the default ``write_load``: events far apart are each written at once; events that
    come faster than their writes take are held and share writes."""

    async def run():
        hub = Hub(HubConfig(write_delay=0.001))
        sink = SlowSink()
        sub = hub.new_subscriber(sink, transport="test")
        hub.subscribe(sub, ["a"])
        for n in range(5):
            await hub.publish("a", n)
            await asyncio.sleep(0.05)  # writes take 2 ms of every 50: the loop keeps up
        assert (len(sink.writes), sub.merged) == (5, 0)
        for n in range(20):
            await hub.publish("a", n)  # back to back: writing is all the loop does
            await asyncio.sleep(0)
        await wait_for(lambda: sub.sent == 25 and hub.window.holding is None)
        assert sub.merged > 0 and len(sink.writes) < 25
        assert [int(line.split()[1]) for line in sink.lines()] == sorted(int(line.split()[1]) for line in sink.lines())
        await hub.close()

    asyncio.run(run())


def test_anything_else_the_subscriber_writes_releases_the_held_events_first():
    """A pause, a gap or a reply never overtakes events already held for the window."""

    async def run():
        hub = Hub(HubConfig(write_load=0, write_delay=WINDOW, subscriber_buffer=2, default_overflow=Policy.DROP))
        sub, sink = subscribed(hub, ["a"])
        first = [await hub.publish("a", n) for n in range(3)]  # one written, two held
        sub.pause()  # the socket's buffer filled: what comes next waits in the subscriber
        later = [await hub.publish("a", n) for n in range(3)]  # buffer of 2: the oldest is dropped
        sub.resume()  # held frames first, then the gap for the drop, then what is pending
        assert sink.lines() == [
            f"E {first[0].seq}", f"E {first[1].seq}", f"E {first[2].seq}", "G overflow", f"E {later[1].seq}", f"E {later[2].seq}"
        ]
        await asyncio.sleep(0)
        more = await hub.publish("a", 9)  # the window is still open: held ...
        sub.release()  # ... until the transport writes a reply, which releases it first
        sink.write(b"REPLY\n")
        await wait_for(lambda: hub.window.holding is None)
        assert sink.lines()[-2:] == [f"E {more.seq}", "REPLY"]
        await hub.close()

    asyncio.run(run())


def test_a_full_buffer_inside_the_window_still_closes_a_slow_consumer():
    async def run():
        hub = Hub(HubConfig(write_load=0, write_delay=WINDOW, subscriber_buffer=2))
        sub, sink = subscribed(hub, ["a"])
        await hub.publish("a", 0)
        sub.pause()
        for n in range(3):
            await hub.publish("a", n)
        assert sink.lines()[-1] == "CLOSED" and hub.stats.slow_consumers == 1
        await hub.close()

    asyncio.run(run())


def test_a_closed_subscriber_gets_nothing_it_held():
    async def run():
        hub = Hub(HubConfig(write_load=0, write_delay=WINDOW))
        sub, sink = subscribed(hub, ["a"])
        await hub.publish("a", 0)
        await hub.publish("a", 1)
        sub.close()
        await wait_for(lambda: hub.window.holding is None)
        assert len(sink.writes) == 1 and sub.sent == 1  # the held one was never delivered
        # What the hub books for a closed subscriber is what it wrote, not what it held then.
        transport = sub.transport_name
        assert hub.stats.sent_by_closed[transport] == 1 and hub.stats.writes_by_closed[transport] == 1

    asyncio.run(run())


# -- a real server -------------------------------------------------------------------------


def pipelined_publishes(server: Server, count: int) -> list[str]:
    """``count`` publish requests, one event each, written in one go on one connection."""
    body = b'{"topic":"c.x","data":{"n":%d}}'
    requests = b"".join(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + PUBLISH_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body % n) + body % n
        for n in range(count)
    )
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(requests)
        sock.settimeout(10)
        buffer, ids = b"", []
        while len(ids) < count:
            head, separator, rest = buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) if separator else -1
            if separator and len(rest) >= length:
                assert head.startswith(b"HTTP/1.1 202"), head
                ids += orjson.loads(rest[:length])["ids"]
                buffer = rest[length:]
                continue
            chunk = sock.recv(65536)
            assert chunk, buffer
            buffer += chunk
    return ids


def ws_events(ws: RawWebSocket, count: int) -> list[dict]:
    found = []
    while len(found) < count:
        opcode, payload = ws.frame()
        message = orjson.loads(payload) if opcode == 0x1 else {}
        if "topic" in message:
            found.append(message)
    return found


def writes_for(delay: float, count: int) -> tuple[list[str], list[str], float, float]:
    with Server(KEYS, env={"STREAM_WRITE_DELAY": str(delay), "STREAM_WRITE_LOAD": "0"}) as server:
        ws = RawWebSocket(server.port, "/ws?topics=c.>")
        wait_until(lambda: metric_now(server, "stream_subscriptions ") == 1)
        ids = pipelined_publishes(server, count)
        received = [event["id"] for event in ws_events(ws, count)]
        ws.close()
        wait_until(lambda: metric_now(server, "stream_connections{") == 0)
        return ids, received, metric_now(server, 'stream_deliveries_total{transport="ws"}'), metric_now(
            server, 'stream_event_writes_total{transport="ws"}'
        )


def test_a_burst_inside_the_window_reaches_a_subscriber_in_fewer_writes_than_events():
    """Ten publish requests in a row: with the window, all ten arrive in order in fewer socket
    writes (``stream_event_writes_total``); without it, one write each."""
    ids, received, delivered, writes = writes_for(WINDOW, 10)
    assert received == ids and delivered == 10
    assert writes < 10
    ids, received, delivered, writes = writes_for(0, 10)
    assert received == ids and (delivered, writes) == (10, 10)


def test_a_publish_reply_follows_its_own_event_inside_the_window():
    """A WebSocket that publishes to a topic it reads gets the event before its "published" reply."""
    with Server(KEYS, env={"STREAM_WRITE_DELAY": str(WINDOW), "STREAM_WRITE_LOAD": "0"}) as server:
        ws = RawWebSocket(server.port, f"/ws?topics=c.>&token={PUBLISH_KEY}")
        wait_until(lambda: metric_now(server, "stream_subscriptions ") == 1)
        httpx.post(f"{server.url}/api/publish", json={"topic": "c.first", "data": 0}, headers=AUTH)  # opens the window
        ws.send_text(orjson.dumps({"op": "publish", "topic": "c.mine", "data": 1, "ref": "r"}).decode())
        order = []
        while "published" not in order:
            opcode, payload = ws.frame()
            message = orjson.loads(payload) if opcode == 0x1 else {}
            order.append(message.get("topic") or message.get("type"))
        ws.close()
    assert order[-3:] == ["c.first", "c.mine", "published"]


def test_a_failing_observer_neither_stops_the_fan_out_nor_leaves_frames_held():
    async def run():
        hub = Hub(HubConfig(write_load=0, write_delay=WINDOW))
        sub, sink = subscribed(hub, ["a.>"])

        def fail(event) -> None:
            if event.topic == "a.1":
                raise RuntimeError("an observer's bug")

        hub.observe(fail)
        events = await hub.publish_many([hub.draft(f"a.{n}", n) for n in range(3)])  # one batch
        assert sub.held is None and sink.lines() == [f"E {event.seq}" for event in events]
        later = await hub.publish("a.1", 3)  # inside the window now
        await wait_for(lambda: hub.window.holding is None)
        assert sink.lines()[-1] == f"E {later.seq}"
        await hub.close()

    asyncio.run(run())


@pytest.mark.slow
def test_resume_and_overflow_suites_pass_with_a_window_after_every_fan_out():
    """The resume and slow-consumer suites again, with every server they start holding events
    in a 50 ms window after every fan-out (write_load 0): order, resume, overflow and gaps hold.
    (Not the 15-second latency comparison with 50 readers: a window there measures the window.)"""
    env = {**os.environ, "STREAM_WRITE_DELAY": "0.05", "STREAM_WRITE_LOAD": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_resume.py", "tests/test_slow_consumer.py",
         "-k", "not does_not_delay_50_others"],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_a_batch_to_a_transport_that_paused_is_written_frame_by_frame_and_in_order():
    """A batch to a subscriber whose transport pauses after its first write: the rest is not
    joined (a private copy per subscriber) but written a shared frame at a time, so nothing
    stays held to be overtaken by a reply; what comes next waits for the transport to drain."""

    class PausingSink(Sink):
        def encode(self, event) -> bytes:
            return f"E {event.seq} {'x' * 40_000}\n".encode()  # a frame of 40 KB

        def write(self, data: bytes) -> None:
            self.writes.append(data)
            if paused:
                sub.pause()  # as a transport does, synchronously inside write

    async def run():
        hub = Hub(HubConfig())
        sink = PausingSink()
        nonlocal sub
        sub = hub.new_subscriber(sink, transport="test")
        hub.subscribe(sub, [">"])
        events = await hub.publish_many([hub.draft("a", {"n": n}) for n in range(6)])
        assert sub.held is None and sink.writes == [sink.encode(event) for event in events]
        later = await hub.publish("a", {"n": 6})  # paused: queued in the subscriber
        sink.write(b"REPLY\n")  # as a transport's reply: after the batch, before what waits
        assert len(sink.writes) == 7
        nonlocal paused
        paused = False
        sub.resume()
        return [*events, later], sink

    sub, paused = None, True
    events, sink = asyncio.run(run())
    lines = [line.split(" ")[:2] for line in sink.lines()]
    assert lines == [["E", str(event.seq)] for event in events[:6]] + [["REPLY"]] + [["E", str(events[6].seq)]]
