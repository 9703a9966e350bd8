"""Resume without loss (SPEC §2.2-2.3): since / Last-Event-ID across a reconnect, and gaps when
history or the server's life no longer reaches back."""

from __future__ import annotations

import asyncio

import httpx
import orjson
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from .support import KEYS, Server, SSEReader, publish


async def recv(ws, timeout: float = 10.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def ws_events(ws, count: int) -> list[dict]:
    found = []
    while len(found) < count:
        message = await recv(ws)
        if message["type"] in ("event", "gap"):
            found.append(message)
    return found


class Publisher:
    """Publishes ``total`` numbered events in small batches until done, like a live feed."""

    def __init__(self, client: httpx.AsyncClient, server: Server, topic: str, total: int) -> None:
        self.client, self.server, self.topic, self.total = client, server, topic, total
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        for start in range(0, self.total, 5):
            batch = [{"topic": self.topic, "data": {"n": n}} for n in range(start, min(start + 5, self.total))]
            await publish(self.client, self.server, batch)
            await asyncio.sleep(0.005)

    def __enter__(self) -> Publisher:
        self.task = asyncio.create_task(self.run())
        return self

    def __exit__(self, *exc) -> None:
        assert self.task is not None
        self.task.cancel()


async def test_ws_resume_while_publishing_continues(server, client):
    """Read some, disconnect, reconnect with since=<last id>: every event once, in order, across the seam."""
    total = 800
    ws = await connect(server.ws_url + "?topics=resume.ws.live")
    await recv(ws), await recv(ws)
    with Publisher(client, server, "resume.ws.live", total) as publisher:
        first = await ws_events(ws, 150)
        await ws.close()
        await asyncio.sleep(0.3)  # disconnected while the publisher keeps going
        async with connect(server.ws_url + f"?topics=resume.ws.live&since={first[-1]['id']}") as ws:
            await recv(ws)
            assert (await recv(ws))["position"] == first[-1]["id"]
            rest = await ws_events(ws, total - len(first))
        await publisher.task
    assert all(e["type"] == "event" for e in rest)
    assert [e["data"]["n"] for e in first + rest] == list(range(total))


async def test_ws_resume_gets_exactly_the_missed_events_then_live(server, client):
    """N events published while away arrive first after reconnecting, then live ones."""
    async with connect(server.ws_url + "?topics=resume.ws.exact") as ws:
        await recv(ws), await recv(ws)
        await publish(client, server, [{"topic": "resume.ws.exact", "data": n} for n in range(5)])
        last_id = (await ws_events(ws, 5))[-1]["id"]
    missed = await publish(client, server, [{"topic": "resume.ws.exact", "data": n} for n in range(5, 45)])
    async with connect(server.ws_url) as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"op": "subscribe", "topics": ["resume.ws.exact"], "since": last_id}).decode())
        assert (await recv(ws))["type"] == "subscribed"
        replayed = await ws_events(ws, 40)
        live_ids = await publish(client, server, [{"topic": "resume.ws.exact", "data": n} for n in range(45, 48)])
        live = await ws_events(ws, 3)
    assert [e["id"] for e in replayed] == missed
    assert [e["id"] for e in live] == live_ids


async def test_sse_resume_with_last_event_id_while_publishing_continues(server, client):
    """The same seam over SSE, resuming with the Last-Event-ID header."""
    total = 800
    url = f"{server.url}/sse?topics=resume.sse.live"
    async with aconnect_sse(client, "GET", url) as source:
        reader = SSEReader(source)
        await reader.take(0)
        await asyncio.sleep(0.1)
        publisher = Publisher(client, server, "resume.sse.live", total).__enter__()
        first = await reader.take(150)
    try:
        await asyncio.sleep(0.3)  # disconnected while the publisher keeps going
        async with aconnect_sse(client, "GET", url, headers={"Last-Event-ID": reader.position}) as source:
            rest = await SSEReader(source).take(total - len(first))
        await publisher.task
    finally:
        publisher.__exit__()
    assert all(e.event == "message" for e in rest)
    assert [orjson.loads(e.data)["data"]["n"] for e in first + rest] == list(range(total))


async def test_sse_quiet_stream_resumes_from_its_position(server, client):
    """A stream that saw no event still holds a position (an id-only block): nothing is missed."""
    url = f"{server.url}/sse?topics=resume.sse.quiet"
    await publish(client, server, {"topic": "resume.other", "data": 0})
    async with aconnect_sse(client, "GET", url) as source:
        async for sse in source.aiter_sse():
            if sse.id:  # the position block: no data, so EventSource dispatches nothing
                assert sse.data == ""
                position = sse.id
                break
    missed = await publish(client, server, [{"topic": "resume.sse.quiet", "data": n} for n in range(3)])
    async with aconnect_sse(client, "GET", url, headers={"Last-Event-ID": position}) as source:
        got = await SSEReader(source).take(3)
    assert [e.id for e in got] == missed


async def test_since_older_than_history_gives_a_gap_then_what_history_holds():
    """history_size=20: resuming from an evicted id yields gap(history) first, then the 20 kept events."""
    with Server(KEYS + "\n[server]\nhistory_size = 20\n") as small:
        async with httpx.AsyncClient() as http:
            ids = await publish(http, small, [{"topic": "gap.a", "data": n} for n in range(50)])
            async with connect(small.ws_url + f"?topics=gap.>&since={ids[4]}") as ws:
                await recv(ws), await recv(ws)
                ws_got = await ws_events(ws, 21)
            async with aconnect_sse(http, "GET", f"{small.url}/sse?topics=gap.>", headers={"Last-Event-ID": ids[4]}) as source:
                sse_got = await SSEReader(source).take(21)
    assert ws_got[0] == {"type": "gap", "after": ids[4], "reason": "history"}
    assert [e["id"] for e in ws_got[1:]] == ids[30:]
    assert sse_got[0].event == "gap" and orjson.loads(sse_got[0].data) == {"after": ids[4], "reason": "history"}
    assert [e.id for e in sse_got[1:]] == ids[30:]


async def test_id_from_a_previous_run_gives_an_epoch_gap_then_what_history_holds():
    """Restart the server: a Last-Event-ID from its earlier life yields gap(epoch), then everything kept."""
    first = Server(KEYS).start()
    try:
        async with httpx.AsyncClient() as http:
            [old_id] = await publish(http, first, {"topic": "epoch.a", "data": "old"})
    finally:
        first.stop()
    second = Server(KEYS)
    second.port, second.url, second.ws_url = first.port, first.url, first.ws_url
    with second:
        async with httpx.AsyncClient() as http:
            new_ids = await publish(http, second, [{"topic": "epoch.a", "data": n} for n in range(3)])
            async with aconnect_sse(http, "GET", f"{second.url}/sse?topics=epoch.>", headers={"Last-Event-ID": old_id}) as source:
                sse_got = await SSEReader(source).take(4)
            async with connect(second.ws_url + f"?topics=epoch.>&since={old_id}") as ws:
                await recv(ws), await recv(ws)
                ws_got = await ws_events(ws, 4)
            history = (await http.get(f"{second.url}/api/events", params={"topics": "epoch.>", "since": old_id})).json()
    assert sse_got[0].event == "gap" and orjson.loads(sse_got[0].data) == {"after": None, "reason": "epoch"}
    assert [e.id for e in sse_got[1:]] == new_ids
    assert ws_got[0] == {"type": "gap", "after": None, "reason": "epoch"}
    assert [e["id"] for e in ws_got[1:]] == new_ids
    assert history["gap"] is True and [e["id"] for e in history["events"]] == new_ids
