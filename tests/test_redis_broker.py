"""The Redis broker (stream/hub/redis_broker.py) under hubs in this process, on a real Redis:
one order and the same ids on every node, a new node loads history and retained values, FLUSHALL
starts a new epoch, an outage refuses publishes and the reader goes on where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from stream.errors import BadRequest, BrokerUnavailable
from stream.events import parse_since
from stream.hub import Hub, HubConfig
from stream.hub.redis_broker import RedisBroker, seq_of
from stream.hub.store import Store

from .support import wait_for
from .test_hub import Sink


@contextlib.asynccontextmanager
async def node(url: str, **config):
    config = {"history_size": 1000, "history_ttl": 3600.0, **config}
    store = Store(config["history_size"], config["history_ttl"])
    hub = Hub(HubConfig(**config), RedisBroker(url, store, history_size=config["history_size"], history_ttl=config["history_ttl"]))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.close()


def listen(hub: Hub, patterns: list[str], **options) -> Sink:
    sink = Sink()
    hub.subscribe(hub.new_subscriber(sink, transport="test"), patterns, **options)
    return sink


async def test_two_nodes_see_one_order_with_identical_ids(redis_server):
    """Publishes on two nodes at once: both nodes' subscribers get all of them, in one order, with
    the same ids, strictly increasing."""
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        assert a.epoch == b.epoch
        on_a, on_b = listen(a, [">"]), listen(b, [">"])

        async def burst(hub: Hub, name: str) -> None:
            for n in range(40):
                await hub.publish(f"t.{name}", {"n": n})

        await asyncio.gather(burst(a, "a"), burst(b, "b"))
        await wait_for(lambda: len(on_a.ids()) == 80 and len(on_b.ids()) == 80, 10)
        assert on_a.frames == on_b.frames
        seqs = [parse_since(i).seq for i in on_a.ids()]
        assert seqs == sorted(seqs) and len(set(seqs)) == 80


async def test_a_publish_is_read_back_on_its_own_node_before_it_returns(redis_server):
    """Read-your-writes: once publish returns, the node's own history holds the event."""
    async with node(redis_server.url) as a:
        event = await a.publish("t.x", {"v": 1})
        found, _, _ = a.reader.read(["t.x"], None, 10)
        assert [e.id for e in found] == [event.id]
        assert a.store.retained["t.x"].id == event.id


async def test_a_new_node_loads_history_and_retained_values_and_resumes_without_gap(redis_server):
    """A node started later (or restarted) keeps the epoch, and serves replay and snapshots of
    events published before it existed."""
    async with node(redis_server.url) as a:
        events = [await a.publish(f"q.{n % 3}", {"n": n}) for n in range(20)]
        await a.prime([a.draft("q.primed", {"p": 1})])
    async with node(redis_server.url) as c:
        assert c.epoch == events[0].id.rsplit("-", 1)[0]
        resumed = listen(c, ["q.>"], since=parse_since(events[9].id))
        assert resumed.ids() == [e.id for e in events[10:]]
        assert not [f for f in resumed.frames if f[0] == "G"]
        snapshot = listen(c, ["q.>"], snapshot=True)
        assert {f[2] for f in snapshot.frames if f[0] == "S"} == {"q.0", "q.1", "q.2", "q.primed"}
        assert c.store.retained["q.2"].id == events[-1].id if events[-1].topic == "q.2" else True


async def test_a_since_newer_than_this_node_has_read_is_accepted(redis_server):
    """An id from another node that this node's reader has not seen yet is a start point, not a
    400; one far beyond any clock is (a client could otherwise mute its own stream)."""
    async with node(redis_server.url) as a:
        ahead = f"{a.epoch}-{seq_of(f'{int(time.time() * 1000) + 5000}-0')}"
        sink = listen(a, ["t.>"], since=parse_since(ahead))
        await a.publish("t.x", {})
        assert sink.ids() == []  # older than the position the client already has
        with pytest.raises(BadRequest):
            listen(a, ["t.>"], since=parse_since(f"{a.epoch}-{seq_of('99999999999999-0')}"))


async def test_flushall_starts_a_new_epoch_and_sends_subscribers_an_epoch_gap(redis_server):
    """Losing Redis's data: every subscriber is told (epoch gap), then service goes on with new ids."""
    async with node(redis_server.url) as a:
        first = await a.publish("t.x", {"n": 1})
        sink = listen(a, ["t.>"])
        redis_server.flushall()
        await wait_for(lambda: ("G", "None", "epoch") in sink.frames, 10)
        while True:
            try:
                second = await a.publish("t.x", {"n": 2})
                break
            except BrokerUnavailable:
                await asyncio.sleep(0.05)
        assert second.id.rsplit("-", 1)[0] != first.id.rsplit("-", 1)[0]
        await wait_for(lambda: second.id in sink.ids(), 5)
        gap_at = sink.frames.index(("G", "None", "epoch"))
        assert all(not frame[1].startswith(a.epoch) for frame in sink.frames[:gap_at] if frame[0] == "E")
        assert all(frame[1].startswith(a.epoch) for frame in sink.frames[gap_at:] if frame[0] == "E")


async def test_an_outage_refuses_publishes_and_the_reader_goes_on_where_it_stopped(redis_server):
    """Redis stops: publishes are refused (BrokerUnavailable), the node reports a problem, its
    subscribers stay; Redis returns with its data: events published meanwhile on another node
    arrive once, with no gap."""
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        sink = listen(a, ["t.>"])
        before = await b.publish("t.x", {"n": 0})
        await wait_for(lambda: before.id in sink.ids(), 5)
        redis_server.stop()
        with pytest.raises(BrokerUnavailable) as refused:
            while True:  # the first attempt may still find its connection open
                await a.publish("t.x", {"n": -1})
        assert refused.value.status == 503 and refused.value.retry_after >= 1
        await wait_for(lambda: a.broker.problem() is not None, 10)
        redis_server.start()
        await wait_for(lambda: a.broker.problem() is None and b.broker.problem() is None, 15)
        after = [await b.publish("t.x", {"n": n}) for n in range(1, 6)]
        await wait_for(lambda: after[-1].id in sink.ids(), 10)
        assert sink.ids() == [before.id] + [e.id for e in after]
        assert not [f for f in sink.frames if f[0] == "G"]
        assert a.broker.reconnects >= 1


async def test_events_of_a_new_epoch_never_go_out_under_the_old_one(redis_server):
    """FLUSHALL, then a fresh node starts the new epoch and publishes at once: a node subscribed
    since before sends the gap first and then those events, each once, with new-epoch ids."""
    async with node(redis_server.url) as b:
        sink = listen(b, ["t.>"])
        old = await b.publish("t.x", {"n": 0})
        redis_server.flushall()
        async with node(redis_server.url) as a:
            fresh = [await a.publish("t.x", {"n": n}) for n in range(1, 4)]
            await wait_for(lambda: all(event.id in sink.ids() for event in fresh), 10)
    assert sink.ids() == [old.id] + [event.id for event in fresh]
    assert sink.frames.index(("G", "None", "epoch")) == 1
