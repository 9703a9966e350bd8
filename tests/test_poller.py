"""The poller (stream/poller.py): schedule and state machine with a controllable clock
(httpx.MockTransport, no sleeps), dedup and publishing, and the status it reports."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import orjson
import pytest

from stream.errors import BrokerUnavailable
from stream.fetch import parse_retry_after
from stream.hub import Hub
from stream.poller import (
    FAILING_AFTER,
    MAX_BACKOFF,
    Poller,
    ProviderState,
    backoff_delay,
)
from stream.pollers import Pollers
from stream.provider_settings import ProviderSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def provider(**table):
    table.setdefault("name", "p")
    table.setdefault("kind", "json")
    table.setdefault("url", "https://upstream.example/items")
    return ProviderSettings(**table)


class Script:
    """An httpx transport answering from a list of (status, body, headers), recording requests."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body, headers = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        # An explicit stream, as on the wire: the poller reads raw bytes itself.
        return httpx.Response(status, stream=httpx.ByteStream(body), headers=headers)


def items(*ids: str) -> bytes:
    return orjson.dumps([{"id": i, "title": f"headline {i}", "url": f"https://u/{i}"} for i in ids])


def make(script: Script, clock: Clock | None = None, **table) -> tuple[Poller, Hub, list]:
    hub = Hub()
    changes: list[dict] = []
    poller = Poller(
        provider(**table),
        httpx.AsyncClient(transport=httpx.MockTransport(script)),
        hub,
        clock=clock or Clock(),
        rng=random.Random(7),
        on_change=lambda p: changes.append(p.status()),
    )
    return poller, hub, changes


def run(coroutine):
    return asyncio.run(coroutine)


async def polls(poller: Poller, count: int) -> list[float]:
    return [await poller.poll_once() for _ in range(count)]


def test_retry_after_accepts_seconds_and_http_dates_and_caps_at_an_hour():
    """Retry-After as delta-seconds or an HTTP date; never negative, never over 3600 s."""
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(date, now) == pytest.approx(90, abs=1)
    assert parse_retry_after("999999", now) == 3600
    assert parse_retry_after(format_datetime(datetime.fromtimestamp(now - 50, UTC), usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_backoff_grows_exponentially_with_full_jitter_up_to_15_minutes():
    """Each delay lies between interval and interval * 2^failures, capped at 900 s."""
    rng = random.Random(1)
    for failures in range(1, 20):
        ceiling = min(MAX_BACKOFF, 10 * 2**failures)
        delays = [backoff_delay(10, failures, rng) for _ in range(200)]
        assert all(10 <= d <= ceiling for d in delays)
        assert max(delays) > 10 + 0.8 * (ceiling - 10)  # jitter spans the range
    assert backoff_delay(1200, 3, rng) == 1200  # a failure never makes polling faster than interval


def test_failures_back_off_then_fail_and_a_success_resets():
    """Failures 1-4: backoff; from the 5th: failing, still probing; one success: ok, interval again."""
    clock = Clock()
    script = Script(*[(500, b"oops", {})] * 7, (200, items("a"), {}))
    poller, _hub, changes = make(script, clock, interval=10, jitter=0.1)
    delays = run(polls(poller, 8))
    states = [c["state"] for c in changes]
    assert states == ["backoff", "failing", "ok"]
    for n, delay in enumerate(delays[:7], start=1):
        assert 10 <= delay <= min(MAX_BACKOFF, 10 * 2**n)
    assert 9 <= delays[7] <= 11
    status = poller.status()
    assert status["consecutive_failures"] == 0 and status["polls"] == 8 and status["state"] == "ok"
    assert poller.outcomes == {"status": 7, "ok": 1}
    assert changes[1]["consecutive_failures"] == FAILING_AFTER


def test_retry_after_on_429_and_503_is_honoured():
    """429/503 with Retry-After wait at least that long; the status says when the next poll is."""
    clock = Clock()
    date = format_datetime(datetime.fromtimestamp(clock.now + 600, UTC), usegmt=True)
    script = Script((429, b"", {"Retry-After": "120"}), (503, b"", {"Retry-After": date}), (429, b"", {}))
    poller, _, _ = make(script, clock, interval=5)
    first, second, third = run(polls(poller, 3))
    assert first >= 120 and second >= 599 and 5 <= third <= 40
    assert poller.outcomes == {"rate_limited": 2, "status": 1}
    assert poller.status()["next_poll"].startswith("2027-01-15")  # clock + the last delay


def test_conditional_get_sends_validators_and_a_304_costs_nothing():
    """ETag / Last-Modified from a 200 come back as If-None-Match / If-Modified-Since; 304 is ok."""
    script = Script(
        (200, items("a"), {"ETag": '"v1"', "Last-Modified": "Wed, 25 Nov 2026 10:00:00 GMT"}),
        (304, b"", {}),
    )
    poller, _, _ = make(script, backfill=True)
    run(polls(poller, 2))
    second = script.requests[1].headers
    assert second["If-None-Match"] == '"v1"' and second["If-Modified-Since"] == "Wed, 25 Nov 2026 10:00:00 GMT"
    assert poller.not_modified == 1 and poller.items_published == 1 and poller.state is ProviderState.OK


def test_validators_are_not_kept_from_a_body_that_failed_to_parse():
    """A broken body with an ETag must not make the next poll a 304 for that broken version."""
    script = Script((200, b"{broken", {"ETag": '"bad"'}), (200, items("a"), {}))
    poller, _, _ = make(script)
    run(polls(poller, 2))
    assert "If-None-Match" not in script.requests[1].headers


def test_first_poll_primes_dedup_unless_backfill():
    """backfill=false: the first poll publishes nothing and later polls only what is new."""
    script = Script((200, items("b", "a"), {}), (200, items("c", "b", "a"), {}))
    poller, hub, _ = make(script)
    run(polls(poller, 2))
    assert [e.data["id"] for e in hub.store.history] == ["c"]
    script = Script((200, items("b", "a"), {}))
    poller, hub, _ = make(script, backfill=True)
    run(polls(poller, 1))
    assert [e.data["id"] for e in hub.store.history if e.topic != "_system.providers"] == ["a", "b"]


def test_repeats_reorders_duplicates_and_returning_items_never_publish_twice():
    """The same ids in another order, twice in one body, or gone and back: one event each."""
    script = Script(
        (200, items("a"), {}),
        (200, items("b", "a", "b"), {}),
        (200, items("a", "b"), {}),
        (200, items("c"), {}),
        (200, items("b", "c", "d"), {}),
    )
    poller, hub, _ = make(script)
    run(polls(poller, 5))
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["b", "c", "d"]


def test_dedup_memory_is_bounded_oldest_forgotten_first():
    """dedup_size caps remembered ids; ids still upstream are refreshed, so the oldest gone first."""
    script = Script((200, items("a", "b"), {}), (200, items("c", "b"), {}), (200, items("d", "b"), {}))
    poller, _, _ = make(script, dedup_size=2)
    run(polls(poller, 3))
    assert set(poller.seen) == {"b", "d"}  # "a" and "c" left upstream and were forgotten first


def test_snapshot_publishes_only_changed_values():
    """A snapshot split by key publishes a key again only when its value changes."""
    first = orjson.dumps({"AAPL": {"p": 1}, "MSFT": {"p": 2}})
    second = orjson.dumps({"AAPL": {"p": 1}, "MSFT": {"p": 3}, "NVDA": {"p": 4}})
    script = Script((200, first, {}), (200, second, {}), (200, second, {}))
    poller, hub, _ = make(script, kind="snapshot", split="", topic="quotes.{key}", backfill=True)
    run(polls(poller, 3))
    published = [(e.topic, e.data) for e in hub.store.history if e.topic.startswith("quotes.")]
    assert published == [("quotes.AAPL", {"p": 1}), ("quotes.MSFT", {"p": 2}), ("quotes.MSFT", {"p": 3}), ("quotes.NVDA", {"p": 4})]


def test_items_are_published_oldest_first():
    """Feeds list newest first; events go out in published order."""
    body = orjson.dumps(
        [
            {"id": "new", "title": "n", "published": "2026-11-25T10:00:00Z"},
            {"id": "old", "title": "o", "published": "2026-11-25T09:00:00Z"},
        ]
    )
    poller, hub, _ = make(Script((200, body, {})), backfill=True)
    run(polls(poller, 1))
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["old", "new"]


def test_state_changes_are_published_on_system_providers():
    """Every state change publishes the provider's status on _system.providers."""

    async def scenario():
        script = Script((500, b"", {}), (200, items("a"), {}))
        hub = Hub()
        pollers = Pollers((ProviderSettings(name="s", kind="json", url="https://u/x"),), hub)
        pollers.start("")
        pollers.pollers[0].client = httpx.AsyncClient(transport=httpx.MockTransport(script))
        pollers.tasks[0].cancel()
        await pollers.pollers[0].poll_once()
        await pollers.pollers[0].poll_once()
        await asyncio.sleep(0)
        await pollers.stop()
        return [e.data for e in hub.store.history if e.topic == "_system.providers"]

    statuses = run(scenario())
    assert [s["state"] for s in statuses] == ["backoff", "ok"]
    assert set(statuses[0]) == {
        "name", "kind", "state", "last_ok", "last_error", "next_poll", "polls", "not_modified",
        "items_published", "items_skipped", "consecutive_failures", "last_lag", "node",
    }
    assert statuses[0]["last_error"] == "status: HTTP 500 Internal Server Error"


def test_the_run_loop_survives_a_bug_and_keeps_its_schedule():
    """An unexpected exception in a poll is logged and backed off; the task keeps going."""
    poller, _, _ = make(Script((200, items("a"), {})), interval=3, jitter=0)
    calls = {"n": 0}
    original = poller.poll_once

    async def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("bug")
        return await original()

    poller.poll_once = flaky  # type: ignore[method-assign]
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) >= 5:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        run(poller.run(fake_sleep))
    assert slept[0] == 0  # no jitter: first poll at once
    assert slept[1] == 3 and slept[3] == 3 and 3 <= slept[2] <= 6
    assert poller.outcomes["internal"] == 1


def test_secrets_from_params_never_reach_status_or_logs(caplog):
    """An API key in params is scrubbed from errors that quote the URL."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url}")

    poller = Poller(
        provider(params={"apiKey": "sekrit-api-key-123"}),
        httpx.AsyncClient(transport=httpx.MockTransport(refuse)),
        Hub(),
        rng=random.Random(1),
    )
    run(poller.poll_once())
    assert "sekrit" not in poller.status()["last_error"] and "***" in poller.status()["last_error"]
    assert "sekrit" not in caplog.text


def test_snapshots_with_more_keys_than_dedup_size_do_not_republish_unchanged_values():
    """Keys still in the document are never forgotten, whatever dedup_size says."""
    body = orjson.dumps({f"K{n}": n for n in range(5)})
    script = Script((200, body, {}))
    poller, hub, _ = make(script, kind="snapshot", split="", topic="v.{key}", backfill=True, dedup_size=2)
    run(polls(poller, 4))
    assert len([e for e in hub.store.history if e.topic.startswith("v.")]) == 5


def test_an_empty_first_answer_does_not_prime_dedup():
    """A first poll that finds nothing (an upstream hiccup) does not make the next full list 'new'."""
    script = Script((200, b"[]", {}), (200, items("a", "b"), {}), (200, items("c", "b", "a"), {}))
    poller, hub, _ = make(script)
    run(polls(poller, 3))
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["c"]


def test_items_whose_publish_failed_are_tried_again():
    """Dedup remembers an item only once it was published: a failed publish loses nothing."""
    script = Script((200, items("a"), {}), (200, items("b", "a"), {}), (200, items("b", "a"), {}))
    poller, hub, _ = make(script)
    original = hub.publish_many
    calls = {"n": 0}

    async def failing_once(drafts, **guards):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("broker down")
        return await original(drafts, **guards)

    hub.publish_many = failing_once  # type: ignore[method-assign]

    async def scenario():
        await poller.poll_once()  # primes with a
        with pytest.raises(RuntimeError):
            await poller.poll_once()  # b found, publish fails
        await poller.poll_once()  # b again: published now

    run(scenario())
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["b"]


def test_validators_of_a_document_whose_publish_failed_are_not_kept():
    """The broker away when b is found: the ETag of that document must not be sent again, or
    the upstream answers 304 from then on and b is never published."""
    script = Script(
        (200, items("a"), {"ETag": '"v1"'}),
        (200, items("b", "a"), {"ETag": '"v2"'}),
        (200, items("b", "a"), {"ETag": '"v2"'}),
    )
    poller, hub, _ = make(script)
    original = hub.publish_many
    calls = {"n": 0}

    async def away_once(drafts, **guards):
        calls["n"] += 1
        if calls["n"] == 1:
            raise BrokerUnavailable("broker: Redis unreachable; retry shortly", retry_after=1)
        return await original(drafts, **guards)

    hub.publish_many = away_once  # type: ignore[method-assign]
    run(polls(poller, 3))
    assert script.requests[2].headers["If-None-Match"] == '"v1"', "the failed document's ETag was kept"
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["b"]


def test_a_publish_whose_answer_was_lost_is_looked_up_in_history_before_the_next_poll():
    """Redis stored b but its answer never came back (503 to the poller): the next poll finds b
    in the hub's history and does not publish it a second time."""
    script = Script((200, items("a"), {}), (200, items("b", "a"), {}))
    poller, hub, _ = make(script)
    original = hub.publish_many
    calls = {"n": 0}

    async def stored_but_unanswered(drafts, **guards):
        events = await original(drafts, **guards)
        calls["n"] += 1
        if calls["n"] == 1:
            raise BrokerUnavailable("broker: Redis did not answer within 1 s; retry shortly", retry_after=1)
        return events

    hub.publish_many = stored_but_unanswered  # type: ignore[method-assign]
    slept = []

    async def sleep(delay):
        slept.append(delay)
        if len(slept) > 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        run(poller.run(sleep=sleep))
    assert poller.polls == 3 and not poller.unsure
    assert [e.data["id"] for e in hub.store.history if e.topic.startswith("news.")] == ["b"]


def test_redirects_keep_keys_on_their_origin_and_never_downgrade():
    """A redirect to another host gets no configured headers; https to http is refused."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "upstream.example" and request.url.path == "/items":
            return httpx.Response(302, headers={"Location": "https://mirror.example/items"}, stream=httpx.ByteStream(b""))
        if request.url.host == "mirror.example":
            return httpx.Response(200, stream=httpx.ByteStream(items("m")))
        return httpx.Response(404, stream=httpx.ByteStream(b""))

    poller = Poller(
        provider(headers={"X-Api-Key": "sekrit-key-1"}, backfill=True),
        httpx.AsyncClient(transport=httpx.MockTransport(answer)),
        Hub(),
        rng=random.Random(1),
    )
    run(poller.poll_once())
    assert poller.state is ProviderState.OK and poller.items_published == 1
    assert seen[0].headers["X-Api-Key"] == "sekrit-key-1" and "X-Api-Key" not in seen[1].headers

    def downgrade(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "http://upstream.example/items"}, stream=httpx.ByteStream(b""))

    poller = Poller(provider(), httpx.AsyncClient(transport=httpx.MockTransport(downgrade)), Hub(), rng=random.Random(1))
    run(poller.poll_once())
    assert "refusing a redirect from https to http" in poller.status()["last_error"]
