"""The hub and its subscribers (stream/hub/), without a network: order, retained values,
history bounds, replay joined to live, gaps, the three overflow policies, symbol filters."""

from __future__ import annotations

import asyncio

import pytest

from stream.errors import (
    BadRequest,
    BadTopic,
    Forbidden,
    PayloadTooLarge,
    TooManySubscriptions,
    TooManyTopics,
)
from stream.events import parse_since
from stream.hub import Hub, HubConfig, Policy, State


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sink:
    """Records what a transport would have written, one tuple per frame."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.overflows = 0

    def encode(self, event):
        return f"E {event.id} {event.topic}\n".encode()

    def encode_snapshot(self, event):
        return f"S {event.id} {event.topic}\n".encode()

    def encode_gap(self, after, reason):
        return f"G {after} {reason}\n".encode()

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def overflowed(self) -> None:
        self.overflows += 1

    @property
    def frames(self) -> list[tuple[str, ...]]:
        return [tuple(line.split(" ")) for line in b"".join(self.writes).decode().splitlines()]

    def ids(self) -> list[str]:
        return [frame[1] for frame in self.frames if frame[0] == "E"]


def make_hub(**config) -> Hub:
    return Hub(HubConfig(**config), clock=Clock())


def publish(hub: Hub, topic: str, data=None):
    return asyncio.run(hub.publish(topic, data))


def publish_many(hub: Hub, count: int, topic: str = "news.a", data=None):
    async def run():
        return [await hub.publish(topic, data if data is not None else {"n": n}) for n in range(count)]

    return asyncio.run(run())


def subscriber(hub: Hub, patterns, **options):
    sink = Sink()
    sub = hub.new_subscriber(sink, transport="test")
    hub.subscribe(sub, patterns, **options)
    return sub, sink


def test_ids_are_strictly_increasing_across_topics_and_carry_the_epoch():
    """One order for all topics; every id names this hub's epoch."""
    hub = make_hub()
    events = [publish(hub, topic) for topic in ["a", "b.c", "a", "z"]]
    seqs = [event.seq for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert all(event.id.startswith(hub.epoch + "-") for event in events)


def test_event_json_is_encoded_once_with_the_documented_fields():
    """id, topic, ts (ms) and data, in one JSON object built at accept time."""
    hub = make_hub()
    event = publish(hub, "news", {"title": "x"})
    assert event.json == b'{"id":"%s","topic":"news","ts":%d,"data":{"title":"x"}}' % (event.id.encode(), event.ts)
    assert event.ts == 1_800_000_000_000


def test_pattern_subscribers_get_exactly_the_matching_events_in_order():
    """A subscriber receives only events matching one of its patterns, once each, in hub order."""
    hub = make_hub()
    _sub, sink = subscriber(hub, ["news.>", "quotes.AAPL", "news.sec"])
    expected = []
    for topic in ["news.sec", "quotes.AAPL", "quotes.MSFT", "news", "news.sec.8k", "_system.x"]:
        event = asyncio.run(hub.publish(topic, 1, internal=True))
        if topic in ("news.sec", "quotes.AAPL", "news.sec.8k"):
            expected.append(event.id)
    assert sink.ids() == expected


def test_publish_validates_topic_size_and_system_prefix():
    """Bad topics, oversize data and '_' topics from clients are refused with their codes."""
    hub = make_hub(max_event_bytes=100)
    with pytest.raises(BadTopic):
        hub.draft("news.*", 1)
    with pytest.raises(PayloadTooLarge):
        hub.draft("news", "x" * 200)
    with pytest.raises(Forbidden):
        hub.draft("_system.providers", 1)
    assert hub.draft("_system.providers", 1, internal=True).topic == "_system.providers"


def test_retained_value_is_the_latest_per_topic_and_snapshot_sends_it_first_marked():
    """snapshot=True writes retained values of matching topics, oldest first, before live events."""
    hub = make_hub()
    publish(hub, "quotes.A", 1)
    last_a = publish(hub, "quotes.A", 2)
    b = publish(hub, "quotes.B", 3)
    publish(hub, "news.x", 4)
    _sub, sink = subscriber(hub, ["quotes.*"], snapshot=True)
    live = publish(hub, "quotes.B", 5)
    assert hub.store.retained["quotes.A"] is last_a
    assert sink.frames == [("S", last_a.id, "quotes.A"), ("S", b.id, "quotes.B"), ("E", live.id, "quotes.B")]


def test_history_is_bounded_by_count_and_by_age():
    """history_size keeps the newest N; history_ttl forgets older events on the next append."""
    clock = Clock()
    hub = Hub(HubConfig(history_size=5, history_ttl=10), clock=clock)
    events = publish_many(hub, 8)
    assert [e.seq for e in hub.store.history] == [e.seq for e in events[-5:]]
    clock.now += 11
    fresh = publish(hub, "news.b")
    assert [e.seq for e in hub.store.history] == [fresh.seq]
    assert hub.store.history.trimmed_seq == events[-1].seq


def test_replay_from_since_then_live_without_hole_or_duplicate():
    """since=<id> replays what followed in history, then continues live, each event once."""
    hub = make_hub()
    events = publish_many(hub, 10)
    _sub, sink = subscriber(hub, ["news.>"], since=parse_since(events[3].id))
    more = publish_many(hub, 3)
    assert sink.ids() == [e.id for e in events[4:] + more]


def test_replay_proceeds_as_the_transport_drains_and_publishing_continues():
    """A paused transport gets replay in chunks; events published meanwhile arrive once, in order."""
    hub = make_hub()
    events = publish_many(hub, 5, data={"pad": "x" * 40_000})
    sink = Sink()
    sub = hub.new_subscriber(sink)
    sub.pause()  # the socket is full before replay starts
    hub.subscribe(sub, ["news.>"], since=parse_since(events[0].id))
    assert sink.ids() == [] and sub.state is State.CATCHING_UP
    later = publish_many(hub, 2)
    # Each resume writes a chunk; the pad makes two events fill one chunk.
    while sub.state is State.CATCHING_UP:
        sub.resume()
        sub.pause()
    sub.resume()
    final = publish_many(hub, 2)
    assert sink.ids() == [e.id for e in events[1:] + later + final]


def test_since_older_than_history_sends_a_history_gap_then_everything_kept():
    """When history no longer reaches back to since, a gap comes first, then what history holds."""
    hub = make_hub(history_size=5)
    events = publish_many(hub, 10)
    _sub, sink = subscriber(hub, ["news.>"], since=parse_since(events[1].id))
    assert sink.frames[0] == ("G", events[1].id, "history")
    assert sink.ids() == [e.id for e in events[5:]]


def test_id_from_another_epoch_sends_an_epoch_gap_then_everything_kept():
    """An id from an earlier life of the hub is recognised: gap(epoch), then all of history."""
    hub = make_hub()
    events = publish_many(hub, 3)
    _sub, sink = subscriber(hub, ["news.>"], since=parse_since("zzzz0-2"))
    assert sink.frames[0] == ("G", "None", "epoch")
    assert sink.ids() == [e.id for e in events]


def test_since_as_time_replays_from_that_time():
    """since=-60s or an ISO time starts at the first event at or after that time."""
    clock = Clock()
    hub = Hub(HubConfig(), clock=clock)
    old = publish_many(hub, 2)
    clock.now += 120
    recent = publish_many(hub, 2)
    _sub, sink = subscriber(hub, ["news.>"], since=parse_since("-60s", now_ms=int(clock.now * 1000)))
    assert sink.ids() == [e.id for e in recent]
    assert old


def test_since_newer_than_the_hub_and_since_on_a_busy_connection_are_refused():
    """A future id is a bad request; so is since on a connection that already subscribes."""
    hub = make_hub()
    publish(hub, "a")
    sink = Sink()
    sub = hub.new_subscriber(sink)
    with pytest.raises(BadRequest, match="newer"):
        hub.subscribe(sub, ["a"], since=parse_since(f"{hub.epoch}-99"))
    hub.subscribe(sub, ["a"])
    with pytest.raises(BadRequest, match="first subscribe"):
        hub.subscribe(sub, ["b"], since=parse_since(f"{hub.epoch}-1"))


def test_pattern_limit_per_connection():
    """More than max_patterns patterns on one connection is too_many_subscriptions."""
    hub = make_hub(max_patterns=3)
    sub, _ = subscriber(hub, ["a", "b"])
    with pytest.raises(TooManySubscriptions):
        hub.subscribe(sub, ["c", "d"])
    hub.subscribe(sub, ["a", "c"])  # 'a' is already held: only one new pattern
    assert set(sub.wants) == {"a", "b", "c"}


def test_symbols_filter_passes_matching_and_symbol_less_events():
    """symbols=AAPL keeps events sharing a symbol and events without a symbols list."""
    hub = make_hub()
    _sub, sink = subscriber(hub, ["news.>"], symbols=frozenset({"AAPL"}))
    a = publish(hub, "news.a", {"symbols": ["aapl", "MSFT"]})
    publish(hub, "news.b", {"symbols": ["TSLA"]})
    c = publish(hub, "news.c", {"title": "no symbols"})
    assert sink.ids() == [a.id, c.id]


def test_overlapping_patterns_deliver_once_even_if_one_filter_rejects():
    """Two patterns match: the event arrives once; a filter on one pattern does not hide it from the other."""
    hub = make_hub()
    sink = Sink()
    sub = hub.new_subscriber(sink)
    hub.subscribe(sub, ["news.>"], symbols=frozenset({"AAPL"}))
    hub.subscribe(sub, ["news.sec"])
    event = publish(hub, "news.sec", {"symbols": ["TSLA"]})
    both = publish(hub, "news.sec", {"symbols": ["AAPL"]})
    assert sink.ids() == [event.id, both.id]


def test_disconnect_policy_closes_a_full_subscriber_and_spares_the_rest():
    """A paused subscriber whose buffer fills is detached and told to close; others get everything."""
    hub = make_hub(subscriber_buffer=10)
    slow, slow_sink = subscriber(hub, ["news.>"])
    _fast, fast_sink = subscriber(hub, ["news.>"])
    slow.pause()
    events = publish_many(hub, 50)
    assert slow_sink.overflows == 1 and slow.state is State.CLOSED
    assert fast_sink.ids() == [e.id for e in events]
    assert hub.stats.slow_consumers == 1


def test_drop_policy_discards_oldest_and_sends_a_gap_before_the_next_event():
    """drop: the buffer keeps the newest events; on resume a gap(overflow) precedes them."""
    hub = make_hub(subscriber_buffer=10, overflow=(("news.>", Policy.DROP),))
    sub, sink = subscriber(hub, ["news.>"])
    sub.pause()
    events = publish_many(hub, 25)
    sub.resume()
    assert sink.frames[0] == ("G", hub.id_of(events[0].seq - 1), "overflow")
    assert sink.ids() == [e.id for e in events[-10:]]
    assert sub.state is State.LIVE


def test_conflate_policy_keeps_the_newest_value_per_topic_without_a_gap():
    """conflate: a full buffer keeps only the newest pending event of each topic; no gap."""
    hub = make_hub(subscriber_buffer=10, overflow=(("quotes.>", Policy.CONFLATE),))
    sub, sink = subscriber(hub, ["quotes.>"])
    sub.pause()
    latest = {}
    for n in range(200):
        topic = f"quotes.S{n % 4}"
        latest[topic] = publish(hub, topic, {"n": n}).id
    sub.resume()
    assert all(frame[0] == "E" for frame in sink.frames)
    last_seen = {frame[2]: frame[1] for frame in sink.frames}
    assert last_seen == latest
    assert sub.state is State.LIVE


def test_a_subscriber_that_raises_is_detached_without_stopping_the_fan_out():
    """One broken transport does not keep the event from the others."""
    hub = make_hub()

    class Broken(Sink):
        def write(self, data):
            raise OSError("boom")

    broken_sub = hub.new_subscriber(Broken())
    hub.subscribe(broken_sub, ["a"])
    _sub, sink = subscriber(hub, ["a"])
    event = publish(hub, "a")
    assert sink.ids() == [event.id]
    assert broken_sub.state is State.CLOSED


def test_read_for_the_http_history_endpoint():
    """read(): latest events without since; after since up to limit with a next cursor; gap flag."""
    hub = make_hub(history_size=6)
    events = publish_many(hub, 10)
    latest, position, gap = hub.reader.read(["news.>"], None, 3, None)
    assert [e.id for e in latest] == [e.id for e in events[-3:]] and not gap
    page, position, gap = hub.reader.read(["news.>"], parse_since(events[5].id), 2, None)
    assert [e.id for e in page] == [events[6].id, events[7].id] and position == events[7].id and not gap
    _, _, gap = hub.reader.read(["news.>"], parse_since(events[0].id), 2, None)
    assert gap


def test_unsubscribe_and_detach_stop_delivery():
    """After unsubscribe the pattern delivers nothing; after close nothing at all."""
    hub = make_hub()
    sub, sink = subscriber(hub, ["a", "b"])
    hub.unsubscribe(sub, ["a"])
    publish(hub, "a")
    b = publish(hub, "b")
    sub.close()
    publish(hub, "b")
    assert sink.ids() == [b.id]
    assert len(hub._routes) == 0


def test_conflate_with_as_many_topics_as_buffer_slots_stays_bounded_and_exact():
    """1,000 conflated topics on a 1,000-event buffer: the buffer stays bounded and the client
    gets exactly the newest value of every topic, each once, in hub order."""
    hub = make_hub(subscriber_buffer=1000, overflow=(("q.>", Policy.CONFLATE),))
    sub, sink = subscriber(hub, ["q.>"])
    sub.pause()
    newest = {}

    async def run():
        for n in range(20_000):
            topic = f"q.T{n % 1000}"
            newest[topic] = (await hub.publish(topic, n)).id
            assert len(sub.pending) <= 2 * 1000 + 1

    asyncio.run(run())
    sub.resume()
    frames = sink.frames
    assert sub.state is State.LIVE and len(frames) == 1000
    assert {frame[2]: frame[1] for frame in frames} == newest
    seqs = [int(frame[1].rsplit("-", 1)[1]) for frame in frames]
    assert seqs == sorted(seqs)


def test_conflate_and_drop_mixed_in_one_buffer():
    """Conflated quotes and dropped chatter share a buffer: each follows its own policy."""
    hub = make_hub(subscriber_buffer=20, overflow=(("q.>", Policy.CONFLATE), ("c.>", Policy.DROP)))
    sub, sink = subscriber(hub, [">"])
    sub.pause()

    async def run():
        for n in range(300):
            await hub.publish(f"q.T{n % 5}", n)
            await hub.publish("c.x", n)

    asyncio.run(run())
    sub.resume()
    kinds = [frame[0] for frame in sink.frames]
    assert "G" in kinds and sub.state is State.LIVE
    assert len([frame for frame in sink.frames if frame[0] == "E"]) <= 20


def test_since_is_refused_once_a_connection_has_subscribed_even_after_unsubscribing():
    """Replaying into a connection that already received live events could duplicate them."""
    hub = make_hub()
    publish(hub, "a")
    sub, _ = subscriber(hub, ["a"])
    hub.unsubscribe(sub, ["a"])
    with pytest.raises(BadRequest, match="first subscribe"):
        hub.subscribe(sub, ["a"], since=parse_since(f"{hub.epoch}-1"))


def test_published_metric_prefixes_are_bounded():
    """Publishers choose topics; the per-prefix counter folds new prefixes into 'other' past 100."""
    hub = make_hub()

    async def run():
        for n in range(150):
            await hub.publish(f"p{n}.x", 1)

    asyncio.run(run())
    assert len(hub.stats.published) == 101 and hub.stats.published["other"] == 50


def test_a_batch_leaves_in_one_write_per_subscriber():
    """Events accepted together reach each subscriber in one write, in order, each once."""
    hub = make_hub()
    _sub, sink = subscriber(hub, ["a.>", "a.x"])
    _other, other_sink = subscriber(hub, ["a.y"])

    async def run():
        return await hub.publish_many([hub.draft("a.x", n) for n in range(3)] + [hub.draft("a.y", 9)])

    events = asyncio.run(run())
    assert len(sink.writes) == 1 and sink.ids() == [e.id for e in events]
    assert len(other_sink.writes) == 1 and other_sink.ids() == [events[-1].id]


def test_a_snapshot_queues_behind_events_already_waiting():
    """Paused with an event waiting, a new subscribe's snapshot follows that event, in hub order."""
    hub = make_hub()
    publish(hub, "b.x", 0)
    sub, sink = subscriber(hub, ["a.>"])
    sub.pause()
    waiting = publish(hub, "a.x", 1)
    retained_b = publish(hub, "b.x", 2)
    hub.subscribe(sub, ["b.>"], snapshot=True)
    assert sink.writes == []
    sub.resume()
    assert sink.frames == [("E", waiting.id, "a.x"), ("S", retained_b.id, "b.x")]


def test_history_is_bounded_by_bytes_one_copy_per_event():
    """history_bytes drops the oldest events once their counted size (one JSON copy each) is over it."""
    hub = make_hub(history_size=10_000, history_bytes=1024 * 1024)
    events = publish_many(hub, 100, data="x" * 60_000)
    assert hub.store.history.bytes <= 1024 * 1024
    assert hub.store.history.bytes == sum(event.size for event in hub.store.history)
    held = list(hub.store.history)
    assert 10 <= len(held) < 20 and held[-1] is events[-1]
    assert all(event.size < len(event.json) + 400 for event in held)


def test_a_publish_that_would_create_a_topic_past_max_topics_is_refused():
    """max_topics caps retained topics; existing topics can still be published to."""
    hub = make_hub(max_topics=3)
    for topic in ("a", "b", "c"):
        publish(hub, topic)
    with pytest.raises(TooManyTopics):
        publish(hub, "d")
    with pytest.raises(TooManyTopics):  # a batch is refused whole
        asyncio.run(hub.publish_many([hub.draft("a", 1), hub.draft("e", 1)]))
    assert publish(hub, "a", 2).topic == "a" and len(hub.store.retained) == 3


def test_routing_structures_do_not_grow_with_subscribe_churn():
    """Thousands of subscribe/unsubscribe cycles of unique patterns leave no routing state behind,
    and each publish still reaches exactly its subscribers."""
    hub = make_hub()
    _steady, sink = subscriber(hub, ["quotes.AAPL", "news.>"])
    churner = hub.new_subscriber(Sink(), transport="test")
    for n in range(5000):
        hub.subscribe(churner, [f"churn.c{n}.>", f"*.x{n}"])
        hub.unsubscribe(churner, [f"churn.c{n}.>", f"*.x{n}"])
    assert len(hub._routes) == 2
    event = publish(hub, "quotes.AAPL", 1)
    assert sink.ids() == [event.id]


def test_a_big_snapshot_is_written_in_steps_that_yield_the_loop():
    """A snapshot of 20,000 topics is never one write: it goes in chunks, in steps between which
    the loop runs other callbacks, and ends with every value once, then live events."""

    async def run():
        hub = make_hub(history_size=100_000)
        await hub.publish_many([hub.draft(f"big.t{n}", n) for n in range(100)])
        for start in range(0, 20_000, 100):
            await hub.publish_many([hub.draft(f"big.t{n}", n) for n in range(start, start + 100)])
        sink = Sink()
        sub = hub.new_subscriber(sink, transport="test")
        ticks = 0

        def tick():
            nonlocal ticks
            ticks += 1
            if sub.state is not State.LIVE:
                asyncio.get_running_loop().call_soon(tick)

        asyncio.get_running_loop().call_soon(tick)
        hub.subscribe(sub, ["big.>"], snapshot=True)
        written_at_once = len(sink.writes)
        await wait_until(lambda: sub.state is State.LIVE)
        live = await hub.publish("big.t1", "new")
        return sink, written_at_once, ticks, live

    sink, written_at_once, ticks, live = asyncio.run(run())
    snapshots = [frame for frame in sink.frames if frame[0] == "S"]
    assert len(snapshots) == 20_000 and len({frame[2] for frame in snapshots}) == 20_000
    assert max(len(chunk) for chunk in sink.writes) <= 64 * 1024 + 100
    assert written_at_once < len(sink.writes) and ticks > 1
    assert sink.frames[-1] == ("E", live.id, "big.t1")


def test_a_paused_subscriber_gets_its_snapshot_only_as_it_drains():
    """While the transport is paused no snapshot byte is written; each resume writes a bounded chunk."""
    hub = make_hub()
    for n in range(3000):
        publish(hub, f"p.t{n}", "x" * 100)
    sink = Sink()
    sub = hub.new_subscriber(sink, transport="test")
    sub.pause()
    hub.subscribe(sub, ["p.>"], snapshot=True)
    assert sink.writes == []
    sink.write = lambda data: (sink.writes.append(data), sub.pause())  # type: ignore[method-assign]
    sub.write = sink.write
    sub.resume()
    assert len(sink.writes) == 1 and len(sink.writes[0]) <= 64 * 1024 + 200


def test_read_examines_a_bounded_part_of_history_and_says_where_to_continue():
    """/api/events' read stops after READ_SCAN events and returns a position to continue from."""
    from stream.hub.reading import READ_SCAN

    hub = make_hub(history_size=20_000)
    first = publish(hub, "noise", 0)
    asyncio.run(hub.publish_many([hub.draft("noise", n) for n in range(100)]))
    for _ in range((READ_SCAN + 1000) // 100):
        asyncio.run(hub.publish_many([hub.draft("noise", n) for n in range(100)]))
    wanted = publish(hub, "rare", 1)
    found, position, gap = hub.reader.read(["rare"], parse_since(first.id), 10)
    assert found == [] and not gap and position != hub.id_of(hub.head_seq)
    while not found:
        found, position, gap = hub.reader.read(["rare"], parse_since(position), 10)
    assert found == [wanted]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0)


def test_a_value_updated_during_a_lazy_snapshot_is_not_lost_when_history_moves_on():
    """A topic updated while its snapshot is still being written, whose update then falls out of
    history before the catch-up reaches it, still gets its latest value (as a snapshot value)."""
    hub = make_hub(history_size=100)
    for start in range(0, 3000, 100):
        asyncio.run(hub.publish_many([hub.draft(f"q.t{n}", n) for n in range(start, start + 100)]))
    sub, sink = subscriber(hub, ["q.>"])
    sub.pause()
    hub.unsubscribe(sub, ["q.>"])
    hub.subscribe(sub, ["q.>"], snapshot=True)
    update = publish(hub, "q.t2999", "new")
    publish_many(hub, 200, topic="other")
    sub.resume()
    got = {frame[2]: frame[1] for frame in sink.frames if frame[0] in ("S", "E")}
    assert got["q.t2999"] == update.id
    assert len([frame for frame in sink.frames if frame[0] == "S"]) == 3000


def test_unsubscribing_stops_a_snapshot_still_being_written():
    """After unsubscribe, no more snapshot values of that pattern are written."""
    hub = make_hub()
    for start in range(0, 5000, 100):
        asyncio.run(hub.publish_many([hub.draft(f"a.t{n}", n) for n in range(start, start + 100)]))
    sink = Sink()
    sub = hub.new_subscriber(sink, transport="test")
    sub.pause()
    hub.subscribe(sub, ["a.>"], snapshot=True)
    hub.unsubscribe(sub, ["a.>"])
    sub.resume()
    assert sink.writes == [] and not sub.snapshots


def test_primed_values_are_in_every_snapshot_even_one_that_resumes():
    """A value set by prime (never in history) is sent in a snapshot whatever the since."""
    hub = make_hub()
    first = publish(hub, "x.a", 1)
    publish(hub, "x.b", 2)
    assert asyncio.run(hub.prime([hub.draft("q.AAPL", {"price": 1})])) == 1
    _sub, sink = subscriber(hub, ["q.>", "x.>"], since=parse_since(first.id), snapshot=True)
    assert ("S", hub.store.retained["q.AAPL"].id, "q.AAPL") in sink.frames
    assert [frame for frame in sink.frames if frame[0] == "E"] == [("E", hub.store.retained["x.b"].id, "x.b")]
