"""stream.client.Subscriber against a real server: resume across drops and restarts."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from stream.client import Event, Gap, SubscribeError, Subscriber, ws_url

from .faults import Link
from .support import KEYS, Server, publish, wait_for


def test_urls_are_normalised():
    """http(s) and ws(s) base URLs, with or without /ws, all reach the WebSocket endpoint."""
    assert ws_url("http://h:8000") == "ws://h:8000/ws"
    assert ws_url("https://h/") == "wss://h/ws"
    assert ws_url("ws://h:1/ws") == "ws://h:1/ws"


async def collect(sub: Subscriber, count: int, into: list) -> None:
    async for item in sub:
        into.append(item)
        if sum(isinstance(i, Event) for i in into) >= count:
            return


async def test_a_dropped_connection_resumes_without_loss_or_duplicate(server):
    """The network drops twice while events keep coming: every event arrives once, in order."""
    proxy = Link(server.port, scheme="http", path="").start()
    states: list[str] = []
    received: list = []
    try:
        async with httpx.AsyncClient() as http, Subscriber(
            proxy.url, ["client.drop.>"], min_delay=0.05, max_delay=0.2, on_state=lambda s, d: states.append(s)
        ) as sub:
            reader = asyncio.create_task(collect(sub, 300, received))
            for n in range(300):
                await publish(http, server, {"topic": "client.drop.a", "data": {"n": n}})
                if n in (100, 200):
                    proxy.cut()
                await asyncio.sleep(0.002)
            await asyncio.wait_for(reader, 20)
    finally:
        proxy.stop()
    events = [item for item in received if isinstance(item, Event)]
    assert [e.data["n"] for e in events] == list(range(300))
    assert not any(isinstance(item, Gap) for item in received)
    assert sub.reconnects == 2 and states.count("reconnecting") >= 2


async def test_a_server_restart_is_surfaced_as_an_epoch_gap():
    """The server restarts (new epoch): the subscriber reconnects, yields Gap(epoch), then the new events."""
    first = Server(KEYS).start()
    received: list = []
    try:
        async with httpx.AsyncClient() as http, Subscriber(first.url, ["client.restart.>"], min_delay=0.05, max_delay=0.3) as sub:
            await publish(http, first, {"topic": "client.restart.a", "data": "before"})
            async for item in sub:
                received.append(item)
                break
            await asyncio.to_thread(first.stop)  # keep the loop free to answer the close frame
            second = Server(KEYS)
            second.port, second.url, second.ws_url = first.port, first.url, first.ws_url
            with second:
                after = await publish(http, second, [{"topic": "client.restart.a", "data": "after"}])

                async def rest():
                    async for item in sub:
                        received.append(item)
                        if isinstance(item, Event):
                            return

                await asyncio.wait_for(rest(), 20)
                await sub.close()
    finally:
        first.stop()
    assert received[0].data == "before"
    assert received[1] == Gap(None, "epoch")
    assert received[2].id == after[0] and received[2].data == "after"


async def test_a_refused_subscription_raises_instead_of_retrying(server):
    """A bad pattern is final: SubscribeError with the server's code, no reconnect loop."""
    with pytest.raises(SubscribeError) as info:
        async with Subscriber(server.url, ["bad..pattern"]):
            pass
    assert info.value.code == "bad_topic"


async def test_since_and_symbols_and_a_clean_close(server):
    """since replays from an id, symbols filters, and leaving the block closes with 1000."""
    async with httpx.AsyncClient() as http:
        ids = await publish(
            http,
            server,
            [{"topic": "client.sym.a", "data": {"n": n, "symbols": ["AAPL" if n % 2 else "MSFT"]}} for n in range(6)],
        )
        got: list = []
        async with Subscriber(server.url, "client.sym.>", since=ids[0], symbols=["aapl"]) as sub:
            await asyncio.wait_for(collect(sub, 3, got), 10)
            socket = sub._socket
        assert [e.data["n"] for e in got] == [1, 3, 5]
        assert socket is not None and socket.close_code == 1000


def test_the_example_bot_runs_against_a_demo_server():
    """examples/headline_bot.py connects to a real server and prints demo headlines for its symbols."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    bot = Path(__file__).parent.parent / "examples" / "headline_bot.py"
    with Server(None) as demo:
        process = subprocess.Popen(
            [sys.executable, str(bot), "--url", demo.url, "--symbols", "AAPL,MSFT,NVDA,TSLA,AMZN,GOOGL,META"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            first = process.stdout.readline()
            deadline = time.monotonic() + 20
            line = ""
            while not line.startswith("[") and time.monotonic() < deadline:
                line = process.stdout.readline()
        finally:
            process.terminate()
            process.wait(10)
    assert first.startswith("watching headlines about AAPL")
    assert line.startswith("[") and "Demo" in line


async def test_the_example_bot_survives_odd_events_and_a_restart_without_acting_twice():
    """Fed a string event, a headline without symbols and a server restart (epoch gap, catch-up
    from /api/news, then the replay), the bot neither crashes nor prints any headline twice."""
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    bot = Path(__file__).parent.parent / "examples" / "headline_bot.py"
    config = (Path(__file__).parent.parent / "stream" / "default.toml").read_text() + KEYS
    symbols = "AAPL,MSFT,NVDA,TSLA,AMZN,GOOGL,META"
    lines: list[str] = []

    def news_count(server: Server) -> int:
        return len(httpx.get(f"{server.url}/api/news", params={"symbols": symbols}).json()["headlines"])

    first = Server(config).start()
    process = subprocess.Popen(  # noqa: ASYNC220 - the bot runs for the whole test; nothing awaits its start
        [sys.executable, "-u", str(bot), "--url", first.url, "--symbols", symbols],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        async with httpx.AsyncClient() as http:
            await wait_for(lambda: any(line.startswith("[") for line in lines), 20)
            await publish(http, first, [{"topic": "news.odd", "data": "just a string"}, {"topic": "news.odd", "data": {"title": "No symbols here"}}])
            [marker] = await publish(http, first, {"topic": "news.odd", "data": {"title": "Marker", "symbols": ["AAPL"]}})
            await wait_for(lambda: any(marker in line for line in lines), 10)
            # The bot is held (SIGSTOP) while the server restarts, until the new server's pollers
            # have headlines in /api/news: then its catch-up and the replay overlap for certain.
            process.send_signal(signal.SIGSTOP)
            first.stop()
            with Server(config, port=first.port) as second:
                await wait_for(lambda: news_count(second) > 0, 20)
                process.send_signal(signal.SIGCONT)
                await wait_for(lambda: any("catching up" in line for line in lines), 20)
                seen = len(lines)
                await wait_for(lambda: sum(line.startswith("[") for line in lines[seen:]) >= 3, 30)
                [after] = await publish(http, second, {"topic": "news.odd", "data": {"title": "After", "symbols": ["MSFT"]}})
                await wait_for(lambda: any(after in line for line in lines), 10)
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)
        first.stop()
    assert process.returncode in (0, -15), "".join(lines)
    ids = [re.search(r"\(([0-9a-z]+-\d+)\)", line).group(1) for line in lines if line.startswith("[")]  # type: ignore[union-attr]
    assert len(ids) == len(set(ids)), [line for line in lines if line.startswith("[")]
    assert not any("Traceback" in line or "No symbols here" in line or "just a string" in line for line in lines)
    assert any("(catch-up)" in line for line in lines), "".join(lines)


async def test_a_busy_server_is_retried_not_fatal():
    """Over capacity at first (the server answers with an error and 1013): the subscriber keeps
    trying with backoff and gets its events once a slot frees up."""
    from .support import RawWebSocket

    # Every socket counts: the publisher comes from another loopback address than the two rivals.
    with Server(KEYS + "\n[server]\nmax_connections_per_client = 1\n") as server:
        blocker = RawWebSocket(server.port)
        states: list[str] = []
        publisher = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=publisher) as http, Subscriber(
            server.url, ["client.busy.>"], min_delay=0.05, max_delay=0.2, on_state=lambda s, d: states.append(s)
        ) as sub:
            await wait_for(lambda: "reconnecting" in states)  # refused with 1013, retrying
            blocker.close()
            got: list = []
            reader = asyncio.create_task(collect(sub, 1, got))
            await wait_for(lambda: "connected" in states[states.index("reconnecting") :])  # it got in
            [event_id] = await publish(http, server, {"topic": "client.busy.a", "data": 1})
            await asyncio.wait_for(reader, 10)
    assert "reconnecting" in states and got[-1].id == event_id


async def test_a_timed_out_wait_does_not_end_the_iteration(server):
    """wait_for(anext(sub), t) timing out leaves the subscriber usable (state lives on the object)."""
    async with httpx.AsyncClient() as http, Subscriber(server.url, ["client.timeout.>"], since="-60s") as sub:
        assert sub.last_id and sub.last_id != "-60s"  # a time becomes the server's position
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(sub), 0.2)
        [event_id] = await publish(http, server, {"topic": "client.timeout.a", "data": 1})
        item = await asyncio.wait_for(anext(sub), 5)
    assert item.id == event_id
