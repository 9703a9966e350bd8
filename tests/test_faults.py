"""Faults on a real Redis cluster (SPEC §2, §10): a node that falls behind, a lease that lapses
mid-poll, a hung Redis, a slow link. Whatever happens, every subscriber ends up with every
accepted event once, or with a gap notice that covers what it did not get; the ids accepted
(the 202s) and the Redis stream itself are the reference."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from starlette.responses import Response

from stream.errors import LeaseLost
from stream.poller import Poller
from stream.provider_settings import ProviderSettings
from stream.redis_leases import RedisLeases

from .faults import Link, RawSSE, Received, delivery_problems, stopped
from .support import AUTH, Server, metric_now, publish, wait_for
from .test_poller import Script, items
from .test_redis_broker import node
from .test_scaleout import Cluster, cluster_config, nodes
from .upstream import Upstream

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
    covers it, and what it got after the gap matches the Redis stream. A subscriber of a quiet
    topic on B is told of the hole after the last event B had read, not after its own last
    event: it missed nothing before that."""
    with Cluster(nodes(redis_server.url, 2, "history_size = 100")) as (a, b):
        async with (
            httpx.AsyncClient(timeout=10) as client,
            sse_subscriber(client, f"{b.url}/sse?topics=lag.>") as received,
            sse_subscriber(client, f"{b.url}/sse?topics=calm.>") as calm,
        ):
            calm_ids = await publish(client, a, {"topic": "calm.x", "data": {"n": 0}})
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
            calm_ids += await publish(client, a, {"topic": "calm.x", "data": {"n": 1}})
            await wait_for(lambda: calm_ids[-1] in calm.ids, 10)
    assert delivery_problems(calm_ids, calm) == []
    assert delivery_problems(accepted, received) == []
    assert received.gaps, "events were trimmed before B read them, and B's subscriber was not told"
    [gap] = received.gaps
    assert [notice.after for notice in calm.gaps] == [gap.after], "the quiet topic's gap starts where B stopped reading"
    assert gap.after == gap.before, "the gap starts right after the last event the subscriber got"
    after_gap = received.ids[received.ids.index(gap.upto) :]
    assert after_gap == in_redis[in_redis.index(after_gap[0]) :]


async def test_a_node_that_joined_an_empty_stream_and_lost_its_link_sends_a_gap_for_what_was_trimmed(redis_server):
    """Node B joins while the stream is empty (a fresh hub, or one trimmed by age), then its link
    to Redis is cut off while A publishes 1,000 events with history_size 100. Back, B has no
    entry id to look for, but it knows the entry count it started from: its subscriber gets a gap
    for the 900 trimmed events, then the rest, instead of the rest alone."""
    with Link(redis_server.port) as link, Cluster([Server(cluster_config(redis_server.url, "history_size = 100")), Server(cluster_config(link.url, "history_size = 100"))]) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client, sse_subscriber(client, f"{b.url}/sse?topics=cut.>") as received:
            link.blackhole()
            await wait_for(lambda: "the Redis reader lost the stream" in b.output(), 10)
            accepted = []
            for start in range(0, 1000, 100):
                accepted += await publish(client, a, [{"topic": "cut.x", "data": {"n": n}} for n in range(start, start + 100)])
            link.heal()
            await wait_for(lambda: accepted[-1] in received.ids, 15)
    assert delivery_problems(accepted, received) == []
    assert len(received.ids) < 500, "Redis trimmed nothing: the test proves nothing"
    assert [gap.reason for gap in received.gaps] == ["history"]


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


async def publish_timed(client: httpx.AsyncClient, node, data: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.post(f"{node.url}/api/publish", json={"topic": "hang.x", "data": data}, headers=AUTH)
    return response, time.monotonic() - started


async def until_status(client: httpx.AsyncClient, url: str, status: int, timeout: float) -> float:
    """Poll ``url`` every 20 ms until it answers ``status``; the seconds that took."""
    started = time.monotonic()
    while (await client.get(url)).status_code != status:
        assert time.monotonic() - started < timeout, f"{url} did not answer {status} within {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until_accepted(client: httpx.AsyncClient, node, accepted: list[str], timeout: float) -> float:
    """Publish every 20 ms until one is accepted (202); the seconds that took."""
    started = time.monotonic()
    while True:
        response = await client.post(f"{node.url}/api/publish", json={"topic": "hang.x", "data": {"back": True}}, headers=AUTH)
        if response.status_code == 202:
            accepted += response.json()["ids"]
            return time.monotonic() - started
        assert response.status_code == 503, response.text
        assert time.monotonic() - started < timeout, f"publishes still refused {timeout} s after Redis came back"
        await asyncio.sleep(0.02)


async def test_a_hung_redis_is_noticed_within_two_seconds_and_forgotten_within_two_of_its_return(redis_server):
    """redis-server frozen with SIGSTOP (a hung Redis: it refuses nothing): a publish answers 503
    with Retry-After within 1.5 s and /readyz turns 503 within 2 s; after SIGCONT both are back
    within 2 s, and the subscriber on the other node has every accepted event once, with no gap."""
    with Cluster(nodes(redis_server.url, 2)) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client, sse_subscriber(client, f"{b.url}/sse?topics=hang.>") as received:
            accepted = await publish(client, a, [{"topic": "hang.x", "data": {"n": n}} for n in range(5)])
            with stopped(redis_server.proc):
                frozen = time.monotonic()
                refused, took = await publish_timed(client, a, {"n": "frozen"})
                await until_status(client, f"{a.url}/readyz", 503, 5)
                not_ready = time.monotonic() - frozen
                await until_status(client, f"{b.url}/readyz", 503, 5)
                still, _ = await publish_timed(client, b, {"n": "frozen"})
            back = await until_accepted(client, a, accepted, 5)
            ready = await until_status(client, f"{b.url}/readyz", 200, 5)
            accepted += await publish(client, b, [{"topic": "hang.x", "data": {"n": n}} for n in range(5, 10)])
            await wait_for(lambda: accepted[-1] in received.ids, 10)
    assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
    assert took < 1.5, f"a publish to a hung Redis took {took:.2f} s to be refused"
    assert not_ready < 2.0, f"/readyz turned 503 {not_ready:.2f} s after Redis hung"
    assert still.status_code == 503
    assert back < 2.0 and ready < 2.0, f"publishes back after {back:.2f} s, /readyz after {ready:.2f} s"
    assert delivery_problems(accepted, received) == [] and not received.gaps


async def test_a_partition_that_drops_packets_is_noticed_like_a_hung_redis_and_loses_nothing(redis_server):
    """Node A reaches Redis through a link that is then blackholed (nothing refused, nothing
    answered): A refuses publishes within 1.5 s and is not ready within 2 s, while node B goes on
    publishing; once the link heals A is back within 2 s and its subscriber has everything B
    accepted meanwhile, once."""
    with Link(redis_server.port) as link, Cluster([Server(cluster_config(link.url)), Server(cluster_config(redis_server.url))]) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client, sse_subscriber(client, f"{a.url}/sse?topics=hang.>") as received:
            accepted = await publish(client, b, [{"topic": "hang.x", "data": {"n": n}} for n in range(5)])
            link.blackhole()
            cut_off = time.monotonic()
            refused, took = await publish_timed(client, a, {"n": "partitioned"})
            await until_status(client, f"{a.url}/readyz", 503, 5)
            not_ready = time.monotonic() - cut_off
            for n in range(5, 25):
                accepted += await publish(client, b, {"topic": "hang.x", "data": {"n": n}})
            link.heal()
            back = await until_accepted(client, a, accepted, 5)
            await wait_for(lambda: accepted[-1] in received.ids, 10)
    assert refused.status_code == 503 and took < 1.5, (refused.status_code, took)
    assert not_ready < 2.0 and back < 2.0, (not_ready, back)
    assert delivery_problems(accepted, received) == [] and not received.gaps


class GatedFeed:
    """A JSON news upstream whose headlines the test sets, and which can hold its next answer
    until released (the upstream runs in a thread of its own)."""

    def __init__(self) -> None:
        self.upstream = Upstream()
        self.items: list[dict] = []
        self.gate: threading.Event | None = None
        self.held = threading.Event()  # a request is being held
        self.url = self.upstream.route("/news.json", self.answer)

    async def answer(self, request, hit: int) -> Response:
        items = list(self.items)  # what upstream has at the moment the request arrives
        gate = self.gate
        if gate is not None:
            self.gate = None
            self.held.set()
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return Response(orjson.dumps({"items": items}), media_type="application/json")

    def headline(self, n: int) -> dict:
        return {"id": f"h{n}", "title": f"Headline {n}", "symbols": ["AAPL"]}


def provider_block(url: str, name: str = "wire", interval: float = 1, timeout: float = 30) -> str:
    return f"""
[[providers]]
name = "{name}"
kind = "json"
url = "{url}"
topic = "news.{name}"
interval = {interval}
jitter = 0
timeout = {timeout}
items = "items"
"""


def status_of(node, name: str = "wire") -> dict:
    return next(p for p in httpx.get(f"{node.url}/api/providers").json() if p["name"] == name)


def holder_of(servers, name: str = "wire"):
    node_id = status_of(servers[0], name)["node"]
    return next(s for s in servers if node_id and node_id.split(":")[1] == str(s.proc.pid)), node_id


def headline_ids(node) -> list[str]:
    events = httpx.get(f"{node.url}/api/events", params={"topics": "news.>", "since": "-1h", "limit": 1000}).json()["events"]
    return [event["data"]["id"] for event in events]


async def test_a_poll_that_outlives_its_lease_publishes_nothing_the_new_holder_published(redis_server):
    """The holder A is frozen (SIGSTOP) mid-poll, with upstream's answer (a new headline) already
    on its socket; B takes the lease and publishes the headline; A wakes and finishes its poll:
    Redis refuses A's publish (its fence is old), and the headline is in history once."""
    feed = GatedFeed()
    feed.items = [feed.headline(0)]
    feed.upstream.start()
    try:
        with Cluster(nodes(redis_server.url, 2, toml=cluster_config(redis_server.url) + provider_block(feed.url))) as servers:
            await wait_for(lambda: status_of(servers[0])["polls"] >= 1 and status_of(servers[0])["node"], 20)
            a, _ = holder_of(servers)
            b = next(s for s in servers if s is not a)
            feed.items = [feed.headline(0), feed.headline(1)]
            gate = feed.gate = threading.Event()
            await wait_for(feed.held.is_set, 10)  # A's next poll is waiting for its answer
            with stopped(a.proc):
                gate.set()  # the answer goes to A's socket; A is frozen
                await wait_for(lambda: "h1" in headline_ids(b), 20)  # B took over and published it
            await wait_for(lambda: "result is discarded" in a.output() or headline_ids(b).count("h1") > 1, 20)
            published = headline_ids(b)
    finally:
        feed.upstream.stop()
    assert published.count("h1") == 1, f"h1 published {published.count('h1')} times: {published}"
    assert "result is discarded" in a.output()


async def test_lease_renewals_do_not_wait_for_each_other_or_for_publishes(redis_server):
    """Eight providers, a 150 ms link to Redis each way and 64 publishes always in flight on that
    node: no lease lapses (each renews on its own, on a pool of its own), so the node keeps
    every lease it took."""
    feed = GatedFeed()
    feed.upstream.start()
    providers = "".join(provider_block(feed.url, f"p{n}", interval=60) for n in range(8))
    try:
        with Link(redis_server.port) as link, Cluster([Server(cluster_config(link.url, lease_ttl=9) + providers)]) as (node,):
            await wait_for(lambda: metric_now(node, "stream_lease_changes_total") >= 8, 20)
            link.delay(0.15)
            stop = asyncio.Event()
            async with httpx.AsyncClient(timeout=30) as client:

                async def keep_publishing() -> None:
                    while not stop.is_set():
                        await client.post(f"{node.url}/api/publish", json={"topic": "load.x", "data": {}}, headers=AUTH)

                load = [asyncio.create_task(keep_publishing()) for _ in range(64)]
                started = time.monotonic()
                while time.monotonic() - started < 9:  # three renewal periods (lease_ttl / 3 = 3 s)
                    assert metric_now(node, "stream_lease_changes_total") == 8, "a lease lapsed"
                    await asyncio.sleep(0.25)
                stop.set()
                await asyncio.gather(*load, return_exceptions=True)
            link.heal()
    finally:
        feed.upstream.stop()


async def test_every_node_shows_the_holders_status_and_none_claims_a_lease_it_lost(redis_server):
    """A standby node shows the status the holder saved (its polls, node = holder), not its own
    idle poller; a holder cut off from Redis stops naming itself (node null and why) while the
    other node takes over; once healed, it shows the new holder's status."""
    feed = GatedFeed()
    feed.items = [feed.headline(0)]
    feed.upstream.start()
    try:
        with Link(redis_server.port) as link:
            toml = provider_block(feed.url)
            with Cluster([Server(cluster_config(link.url) + toml)]) as (a,):
                await wait_for(lambda: status_of(a)["polls"] >= 2, 20)  # A holds it: the only node
                with Cluster([Server(cluster_config(redis_server.url) + toml)]) as (b,):
                    await wait_for(lambda: status_of(b)["polls"] >= 3, 20)
                    on_b, on_a = status_of(b), status_of(a)
                    assert on_b["node"] == on_a["node"] and on_a["node"].split(":")[1] == str(a.proc.pid)
                    link.blackhole()
                    await wait_for(lambda: (status_of(b)["node"] or "").split(":")[1:2] == [str(b.proc.pid)], 20)
                    cut_off = status_of(a)
                    link.heal()
                    await wait_for(lambda: status_of(a)["node"] == status_of(b)["node"], 20)
                    await wait_for(lambda: status_of(a)["polls"] == status_of(b)["polls"], 20)
    finally:
        feed.upstream.stop()
    assert cut_off["node"] is None and "no node is known" in cut_off["last_error"], cut_off


async def test_a_keys_publish_rate_holds_for_the_cluster_not_per_node(redis_server):
    """A key allowed 5 events/s (burst 5) publishing on two nodes in turn gets about 5 events/s
    accepted in all, not 5 on each node."""
    key = '\n[[keys]]\nname = "slow"\nkey = "slow-publisher-key"\npublish = [">"]\npublish_rate = 5\npublish_burst = 5\n'
    with Cluster(nodes(redis_server.url, 2, toml=cluster_config(redis_server.url) + key)) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client:
            started = time.monotonic()
            answers = []
            for n in range(40):
                node = (a, b)[n % 2]
                response = await client.post(f"{node.url}/api/publish", json={"topic": "rate.x", "data": {"n": n}},
                                             headers={"Authorization": "Bearer slow-publisher-key"})
                answers.append(response)
            elapsed = time.monotonic() - started
    accepted = sum(1 for r in answers if r.status_code == 202)
    refused = [r for r in answers if r.status_code != 202]
    assert all(r.status_code == 429 and r.headers.get("retry-after") for r in refused)
    assert accepted <= 5 + 5 * elapsed + 1, f"{accepted} accepted in {elapsed:.2f} s: the rate is per node"


async def test_a_publish_whose_answer_was_lost_on_a_slow_link_is_not_published_again(redis_server):
    """The link to Redis turns slow (0.55 s each way) as the poller publishes headline b: Redis
    runs the publish before its deadline, but the answer comes after ``redis_timeout``, so the
    poller hears 503. Its next poll first reads the stream to its end, finds b there and does
    not publish it again: b is in the Redis stream once."""
    script = Script((200, items("a"), {}), (200, items("b", "a"), {}))
    with Link(redis_server.port) as link:
        async with node(link.url) as hub:
            await wait_for(lambda: hub.broker.link.offset is not None, 5)  # publishes carry a deadline
            # Pooled connections open now: a connection opened over the slow link would time out
            # in its handshake, before the publish is even sent.
            await asyncio.gather(*(hub.publish("warm.x", {}) for _ in range(4)))
            poller = Poller(ProviderSettings(name="p", kind="json", url="https://upstream.example/items"), httpx.AsyncClient(transport=httpx.MockTransport(script)), hub)
            pauses, lost = 0, None

            async def between_polls(delay: float) -> None:
                nonlocal pauses, lost
                pauses += 1
                if pauses == 2:  # a was primed: b's publish goes out over the slow link
                    link.delay(0.55)
                elif pauses == 3:  # b's publish was answered (503, or 202 if the link was not slow enough)
                    lost = poller.items_skipped
                    link.heal()
                elif "b" in poller.seen or pauses > 200:
                    raise asyncio.CancelledError
                else:  # polls again as soon as Redis answers
                    await wait_for(lambda: hub.broker.problem() is None, 10)

            with pytest.raises(asyncio.CancelledError):
                await poller.run(sleep=between_polls)
    with redis_server.client() as redis:
        stored = [orjson.loads(fields[b"d"]).get("id") for _, fields in redis.xrange("stream:events") if b"p" not in fields]
    assert lost == 1, "b's publish was answered (the link was not slow enough to lose its answer)"
    assert "b" in poller.seen
    assert stored.count("b") == 1, f"b is in the stream {stored.count('b')} times"


async def test_a_fence_is_never_shared_by_two_takings_of_a_lease_even_after_redis_lost_its_data(redis_server):
    """Node A takes a lease; Redis then loses its data (FLUSHALL) and node B takes the lease: B's
    fence is not A's, though both are the first taking since, so a publish carrying A's old fence
    is refused. A holder whose fence key is deleted gets a new fence at its next renewal instead
    of having every publish refused."""
    async with node(redis_server.url) as hub:
        a = RedisLeases(hub.broker.link.client(2), "node-a", ttl=1.5, timeout=1.0)
        a.start(["p"])
        try:
            await wait_for(lambda: a.holds("p"), 5)
            with redis_server.client() as redis:
                redis.delete("stream:fence:p")
                await wait_for(lambda: redis.exists("stream:fence:p"), 5)  # A's next renewal
            await hub.publish_many([hub.draft("fenced.x", {"n": 1})], fence=a.fence("p"))
            taken_by_a = a.fence("p")
        finally:
            await a.stop()
        before = hub.epoch
        with redis_server.client() as redis:
            redis.flushall()
        await wait_for(lambda: hub.epoch != before and hub.broker.problem() is None, 5)  # the new epoch
        b = RedisLeases(hub.broker.link.client(2), "node-b", ttl=1.5, timeout=1.0)
        b.start(["p"])
        try:
            await wait_for(lambda: b.holds("p"), 5)
            assert b.fence("p").key == taken_by_a.key
            with pytest.raises(LeaseLost):
                await hub.publish_many([hub.draft("fenced.x", {"n": 2})], fence=taken_by_a)
            await hub.publish_many([hub.draft("fenced.x", {"n": 3})], fence=b.fence("p"))
        finally:
            await b.stop()
