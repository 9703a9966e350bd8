"""Faults on a real Redis cluster (SPEC §2, §10): a node that falls behind, a lease that lapses
mid-poll, a hung Redis, a slow link. Whatever happens, every subscriber ends up with every
accepted event once, or with a gap notice that covers what it did not get; the ids accepted
(the 202s) and the Redis stream itself are the reference."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse

from .faults import RawSSE, Received, delivery_problems, stopped
from .support import publish, wait_for
from .test_scaleout import Cluster, nodes

pytestmark = pytest.mark.slow


async def follow_sse(client: httpx.AsyncClient, url: str, received: Received, ready: asyncio.Event, *, since: str | None = None) -> None:
    """Read an SSE stream into ``received`` (events and gap notices) until cancelled."""
    headers = {"Last-Event-ID": since} if since else {}
    async with aconnect_sse(client, "GET", url, headers=headers) as source:
        async for message in source.aiter_sse():
            if message.event == "gap":
                gap = orjson.loads(message.data)
                received.gap(gap["after"], gap["reason"])
            elif message.data:
                received.event(orjson.loads(message.data)["id"])
            elif message.id:
                ready.set()  # the position marker: the subscription is in place


@contextlib.asynccontextmanager
async def sse_subscriber(client: httpx.AsyncClient, url: str):
    received, ready = Received(), asyncio.Event()
    task = asyncio.create_task(follow_sse(client, url, received, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task


def redis_ids(redis_server, epoch: str) -> list[str]:
    """The ids of every event still in the Redis stream (primed values are not events)."""
    with redis_server.client() as redis:
        entries = redis.xrange("stream:events")
    ids = []
    for entry_id, fields in entries:
        if b"p" not in fields:
            ms, n = entry_id.decode().split("-")
            ids.append(f"{epoch}-{int(ms) * 1_000_000 + int(n)}")
    return ids


async def test_a_node_that_falls_behind_the_trimmed_stream_sends_a_gap_not_silence(redis_server):
    """history_size 100; node B frozen (SIGSTOP) while node A publishes 1,000 events, so Redis trims
    past B's read position: B's SSE subscriber gets every accepted event once or a gap notice that
    covers it, and what it got after the gap matches the Redis stream."""
    with Cluster(nodes(redis_server.url, 2, "history_size = 100")) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client, sse_subscriber(client, f"{b.url}/sse?topics=lag.>") as received:
            accepted = await publish(client, a, [{"topic": "lag.x", "data": {"n": n}} for n in range(10)])
            await wait_for(lambda: len(received.ids) == 10, 10)
            with stopped(b.proc):
                for start in range(10, 1010, 100):
                    accepted += await publish(client, a, [{"topic": "lag.x", "data": {"n": n}} for n in range(start, start + 100)])
                with redis_server.client() as redis:
                    assert redis.xlen("stream:events") < 500, "Redis trimmed nothing: the test proves nothing"
            last = accepted[-1]
            await wait_for(lambda: last in received.ids, 15)
            epoch = last.rsplit("-", 1)[0]
            in_redis = redis_ids(redis_server, epoch)
    assert delivery_problems(accepted, received) == []
    assert received.gaps, "events were trimmed before B read them, and B's subscriber was not told"
    [gap] = received.gaps
    assert gap.after == gap.before, "the gap starts right after the last event the subscriber got"
    after_gap = received.ids[received.ids.index(gap.upto) :]
    assert after_gap == in_redis[in_redis.index(after_gap[0]) :]


async def test_a_subscriber_in_the_middle_of_a_replay_reads_on_from_where_it_was_after_a_reload(redis_server):
    """A subscriber resumes on node B from the first of 900 events and stops reading half way
    through the replay; B then falls behind the trimmed stream and reloads its store. Reading
    again, it gets every event from where its replay was, or a gap that starts there: nothing
    skipped silently, nothing twice."""
    pad = "r" * 1000
    with Cluster(nodes(redis_server.url, 2, "history_size = 1000")) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client:
            accepted = []
            for start in range(0, 900, 100):
                accepted += await publish(client, a, [{"topic": "mid.x", "data": {"n": n, "pad": pad}} for n in range(start, start + 100)])
            await wait_for(lambda: b_has(b, accepted[-1]), 10)
            reader = RawSSE(b.port, "/sse?topics=mid.>", last_event_id=accepted[0])
            try:
                reader.read(lambda got: len(got.ids) >= 20)  # then it stops reading: B's replay waits for it
                with stopped(b.proc):
                    for start in range(900, 2900, 100):
                        accepted += await publish(client, a, [{"topic": "mid.x", "data": {"n": n, "pad": pad}} for n in range(start, start + 100)])
                await wait_for(lambda: b_has(b, accepted[-1]), 15)
                reader.read(lambda got: accepted[-1] in got.ids, 30)
            finally:
                reader.close()
    assert delivery_problems(accepted, reader.received, since=accepted[0]) == []
    [gap] = reader.received.gaps
    assert gap.after == gap.before, "the gap starts right after the last event the subscriber got"


def b_has(node, event_id: str) -> bool:
    """Whether ``node`` has read ``event_id`` (it answers it as a resume point with nothing new)."""
    answer = httpx.get(f"{node.url}/api/events", params={"topics": ">", "limit": 1}).json()
    return answer["next"] == event_id
