"""Scale-out on Redis (SPEC §10), end to end: `stream serve` nodes as subprocesses on their own
ports, one real redis-server, real WebSocket / SSE / HTTP clients, and a loopback upstream."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from starlette.responses import Response
from websockets.asyncio.client import connect

from .support import AUTH, KEYS, Server, SSEReader, publish, wait_for
from .test_resume import Publisher, recv, ws_events
from .upstream import Upstream

pytestmark = pytest.mark.slow


def cluster_config(redis_url: str, extra: str = "", lease_ttl: float = 2.0) -> str:
    return KEYS + f'\n[server]\nbroker = "{redis_url}"\nlease_ttl = {lease_ttl}\n{extra}'


def nodes(redis_url: str, count: int, extra: str = "", toml: str | None = None) -> list[Server]:
    return [Server(toml or cluster_config(redis_url, extra)) for _ in range(count)]


class Cluster:
    """Starts the given nodes and stops every one on the way out, whatever happened."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers

    def __enter__(self) -> list[Server]:
        for server in self.servers:
            server.start()
        return self.servers

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            if server.proc is not None:
                server.stop()


async def subscribed(reader: SSEReader) -> SSEReader:
    """Once the stream's position has come (it is sent when the subscription is in place), so
    what is published from now on reaches it."""
    while reader.position is None:
        reader.position = (await asyncio.wait_for(anext(reader.iterator), 10)).id or None
    return reader


async def ws_ids(ws, count: int) -> list[str]:
    return [message["id"] for message in await ws_events(ws, count)]


async def test_a_publish_on_one_node_reaches_every_node_in_one_order_with_the_same_ids(redis_server):
    """Publishes on A and B: WebSocket subscribers on B and C and an SSE subscriber on C receive
    every event, in the same order, with identical ids."""
    with Cluster(nodes(redis_server.url, 3)) as (a, b, c):
        async with httpx.AsyncClient(timeout=10) as client, connect(b.ws_url + "?topics=x.>") as on_b, connect(c.ws_url + "?topics=x.>") as on_c:
            await recv(on_b), await recv(on_b), await recv(on_c), await recv(on_c)  # welcome, subscribed
            async with aconnect_sse(client, "GET", f"{c.url}/sse?topics=x.>") as source:
                sse = await subscribed(SSEReader(source))
                published: list[str] = []

                async def feed(node: Server, name: str) -> None:
                    for n in range(0, 60, 3):
                        published.extend(await publish(client, node, [{"topic": f"x.{name}", "data": {"n": m}} for m in range(n, n + 3)]))

                await asyncio.gather(feed(a, "a"), feed(b, "b"))
                seen_b, seen_c = await ws_ids(on_b, 120), await ws_ids(on_c, 120)
                seen_sse = [orjson.loads(message.data)["id"] for message in await sse.take(120)]
    assert seen_b == seen_c == seen_sse
    assert sorted(seen_b) == sorted(published) and len(set(seen_b)) == 120
    seqs = [int(i.rsplit("-", 1)[1]) for i in seen_b]
    assert seqs == sorted(seqs)


async def test_resume_on_another_node_while_publishing_goes_on(redis_server):
    """Read on A, disconnect, reconnect to C with since (WebSocket) and with Last-Event-ID (SSE)
    while B keeps publishing: every event exactly once, in order, then live."""
    total = 600
    with Cluster(nodes(redis_server.url, 3)) as (a, b, c):
        async with httpx.AsyncClient(timeout=10) as client:
            ws = await connect(a.ws_url + "?topics=r.ws")
            await recv(ws), await recv(ws)
            with Publisher(client, b, "r.ws", total):
                first = await ws_events(ws, 100)
                await ws.close()
                async with connect(c.ws_url + f"?topics=r.ws&since={first[-1]['id']}") as again:
                    rest = await ws_events(again, total - 100)
            numbers = [m["data"]["n"] for m in first + rest]
            assert numbers == list(range(total))

            publisher = Publisher(client, b, "r.sse", 300)
            try:
                async with aconnect_sse(client, "GET", f"{a.url}/sse?topics=r.sse") as source:
                    reader = await subscribed(SSEReader(source))
                    publisher.__enter__()
                    head = await reader.take(50)
                    position = reader.position
                headers = {"Last-Event-ID": position}
                async with aconnect_sse(client, "GET", f"{c.url}/sse?topics=r.sse", headers=headers) as source:
                    tail = await SSEReader(source).take(250)
            finally:
                if publisher.task is not None:
                    publisher.__exit__()
            numbers = [orjson.loads(m.data)["data"]["n"] for m in head + tail]
            assert numbers == list(range(300))


async def test_restarting_every_node_loses_nothing_and_flushall_is_an_epoch_gap(redis_server):
    """SIGTERM every node and start them again: a client resuming with its last id gets no gap
    and every event published meanwhile. FLUSHALL: an epoch gap, then normal service."""
    servers = nodes(redis_server.url, 2)
    with Cluster(servers) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client:
            seen = await publish(client, a, [{"topic": "k.x", "data": {"n": n}} for n in range(5)])
            missed = await publish(client, b, [{"topic": "k.x", "data": {"n": n}} for n in range(5, 10)])
    restarted = [Server(cluster_config(redis_server.url), port=server.port) for server in servers]
    with Cluster(restarted) as (a, b):
        async with connect(b.ws_url + f"?topics=k.>&since={seen[-1]}") as ws:
            messages = await ws_events(ws, 5)
            assert [m["id"] for m in messages] == missed and all(m["type"] == "event" for m in messages)
            redis_server.flushall()
            [gap] = await ws_events(ws, 1)
            assert gap == {"type": "gap", "after": None, "reason": "epoch"}
            async with httpx.AsyncClient(timeout=10) as client:
                await wait_for(lambda: httpx.get(f"{a.url}/readyz").status_code == 200, 10)
                response = None
                for _ in range(100):  # the first publish may find the old epoch and be refused
                    response = await client.post(f"{a.url}/api/publish", json={"topic": "k.x", "data": {"n": 10}}, headers=AUTH)
                    if response.status_code == 202:
                        break
                    assert response.status_code == 503 and response.headers["retry-after"]
                    await asyncio.sleep(0.1)
                assert response is not None and response.status_code == 202
                [fresh] = response.json()["ids"]
            [event] = await ws_events(ws, 1)
            assert event["id"] == fresh and fresh.rsplit("-", 1)[0] != seen[0].rsplit("-", 1)[0]
        async with connect(a.ws_url + f"?topics=k.>&since={seen[-1]}") as ws:
            [gap] = await ws_events(ws, 1)
            assert gap["type"] == "gap" and gap["reason"] == "epoch"


def metric_value(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def polls(node: Server) -> float:
    """Polls of every provider this node made (its stream_provider_polls_total)."""
    text = httpx.get(f"{node.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("stream_provider_polls_total"))


class CountingFeed:
    """A JSON news upstream: each request is counted (with when it came) and answers the
    headlines so far, one new one per request, so a duplicate publish would show."""

    def __init__(self) -> None:
        self.upstream = Upstream()
        self.times: list[float] = []
        self.url = self.upstream.route("/news.json", self.answer)

    def answer(self, request, hit: int) -> Response:
        self.times.append(time.monotonic())
        items = [{"id": f"h{n}", "title": f"Headline {n}", "symbols": ["AAPL"]} for n in range(hit)]
        return Response(orjson.dumps({"items": items[-50:]}), media_type="application/json")


async def test_pollers_run_once_per_cluster_and_a_killed_holder_is_replaced(redis_server):
    """Three nodes, one upstream polled every second: one request per interval, not three; the
    lease holder killed, another node polls within 2 × lease_ttl; no headline published twice."""
    feed = CountingFeed()
    feed.upstream.start()
    provider = f"""
[[providers]]
name = "wire"
kind = "json"
url = "{feed.url}"
topic = "news.wire"
interval = 1
jitter = 0
items = "items"
"""
    try:
        with Cluster(nodes(redis_server.url, 3, toml=cluster_config(redis_server.url) + provider)) as servers:
            async with httpx.AsyncClient(timeout=10) as client:
                await wait_for(lambda: len(feed.times) >= 2, 20)
                before = [polls(node) for node in servers]
                count = len(feed.times)
                await wait_for(lambda: len(feed.times) >= count + 4, 20)
                grew = [polls(node) - then for node, then in zip(servers, before, strict=True)]
                assert sorted(grew)[:2] == [0, 0], f"polls per node {grew}: more than one node polls"
                seen_by = [(await client.get(f"{node.url}/api/providers")).json()[0]["node"] for node in servers]
                holder = seen_by[0]
                assert holder and seen_by == [holder] * 3, f"each node names the one holder: {seen_by}"
                victim = next(s for s in servers if holder.split(":")[1] == str(s.proc.pid))
                victim.stop(signal.SIGKILL)
                killed = time.monotonic()
                count = len(feed.times)
                await wait_for(lambda: len(feed.times) >= count + 3, 20)
                resumed = next(t for t in feed.times[count:] if t > killed)
                assert resumed - killed < 2 * 2.0 + 1.0, f"taken over after {resumed - killed:.1f} s"
                survivor = next(s for s in servers if s is not victim)
                now_held_by = (await client.get(f"{survivor.url}/api/providers")).json()[0]["node"]
                assert now_held_by not in (None, holder)
                new_holder = next(s for s in servers if now_held_by.split(":")[1] == str(s.proc.pid))
                assert metric_value((await client.get(f"{new_holder.url}/metrics")).text, "stream_lease_changes_total") >= 1
                total = len(feed.times)
                await wait_for(lambda: len(headlines_on(survivor)) >= total - 2, 10)
                headlines = headlines_on(survivor)
    finally:
        feed.upstream.stop()
    assert len(headlines) == len(set(headlines)), f"a headline was published twice: {headlines}"


def headlines_on(node: Server) -> list[str]:
    """The ids of every headline in the hub's history, as one node serves them."""
    events = httpx.get(f"{node.url}/api/events", params={"topics": "news.>", "since": "-1h", "limit": 1000}).json()["events"]
    return [event["data"]["id"] for event in events]


async def test_a_redis_outage_refuses_publishes_keeps_subscribers_and_loses_nothing(redis_server):
    """Redis stops for 5 s while a publisher keeps trying: its publishes get 503 + Retry-After,
    /readyz goes 503 and back to 200, subscribers stay connected, and every event that was
    accepted (202), before and after, reaches them once."""
    with Cluster(nodes(redis_server.url, 2)) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client, connect(b.ws_url + "?topics=o.>") as ws:
            await recv(ws), await recv(ws)
            accepted: list[str] = []
            refused: list[httpx.Response] = []
            readiness: set[int] = set()

            async def keep_publishing(stop: asyncio.Event) -> None:
                n = 0
                while not stop.is_set():
                    response = await client.post(f"{a.url}/api/publish", json={"topic": "o.x", "data": {"n": n}}, headers=AUTH)
                    if response.status_code == 202:
                        accepted.extend(response.json()["ids"])
                    else:
                        refused.append(response)
                    readiness.add((await client.get(f"{b.url}/readyz")).status_code)
                    n += 1
                    await asyncio.sleep(0.02)

            stop = asyncio.Event()
            task = asyncio.create_task(keep_publishing(stop))
            await wait_for(lambda: len(accepted) >= 20, 10)
            redis_server.stop()
            await asyncio.sleep(5)  # the outage itself: Redis stays away this long (not a wait for a condition)
            redis_server.start()
            count = len(accepted)
            await wait_for(lambda: len(accepted) >= count + 20, 20)
            stop.set()
            await task
            received = await ws_ids(ws, len(accepted))
            metrics = (await client.get(f"{b.url}/metrics")).text
    assert refused and all(r.status_code == 503 and r.headers.get("retry-after") for r in refused)
    assert all(r.json()["error"]["code"] in ("broker_unavailable", "not_ready") for r in refused)
    assert {200, 503} <= readiness
    assert received == accepted
    assert "stream_broker_up 1.0" in metrics and "stream_broker_epoch_changes_total 0.0" in metrics
    assert metric_value(metrics, "stream_broker_reconnects_total") >= 1
    assert metric_value(metrics, "stream_broker_lag_seconds") < 5
