"""Pollers against a real upstream HTTP server on loopback that misbehaves in every usual way.

Each case polls a misbehaving provider and a healthy one side by side, then checks: the state
and outcome counted, a log line naming the provider and the cause, no exception out of the
poll, no duplicate event, and the healthy provider unaffected.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import resource
import time
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.responses import Response

from stream.hub import Hub
from stream.poller import Poller, ProviderState
from stream.provider_settings import ProviderSettings

from .support import free_port
from .upstream import GZIP_BOMB, Upstream, drip, sequence, stall, text

FEEDS = Path(__file__).parent / "data"
HEALTHY = orjson.dumps([{"id": "ok-1", "title": "Healthy headline", "url": "https://u/ok-1"}])


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="stream")


@pytest.fixture(scope="module")
def upstream():
    server = Upstream().start()
    server.route("/healthy", text(HEALTHY, media_type="application/json"))
    yield server
    server.stop()


def make(upstream, hub, client, url, **table) -> Poller:
    table.setdefault("name", "bad")
    table.setdefault("kind", "json")
    table.setdefault("backfill", True)
    return Poller(ProviderSettings(url=url, **table), client, hub, rng=random.Random(3))


async def side_by_side(upstream, table, url, polls: int = 1):
    """Poll the provider under test next to a healthy one, ``polls`` times; return both and the hub."""
    hub = Hub()
    async with httpx.AsyncClient(follow_redirects=True) as client:
        bad = make(upstream, hub, client, url, **table)
        good = make(upstream, hub, client, upstream.url("/healthy"), name="good")
        for _ in range(polls):
            await asyncio.gather(bad.poll_once(), good.poll_once())
    assert good.state is ProviderState.OK and good.outcomes == {"ok": polls}
    assert good.items_published == 1
    return bad, hub


def published(hub: Hub, provider: str = "bad") -> list[str]:
    ids = [e.data["id"] for e in hub.store.history if e.topic.startswith("news.") and e.data.get("provider") == provider]
    assert len(ids) == len(set(ids)), "duplicate event"
    return ids


def failed_with(bad: Poller, outcome: str, caplog, words: str) -> None:
    assert bad.state is ProviderState.BACKOFF and bad.consecutive_failures >= 1
    assert bad.outcomes.get(outcome, 0) >= 1, bad.outcomes
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("provider bad:"))
    assert words in line, line
    assert words in bad.status()["last_error"]


async def test_connection_refused(upstream, caplog):
    """Nothing listens: connect failure, backoff."""
    bad, _ = await side_by_side(upstream, {}, f"http://127.0.0.1:{free_port()}/x")
    failed_with(bad, "connect", caplog, "cannot connect")


async def test_timeout_when_the_upstream_never_answers(upstream, caplog):
    """No answer within the provider's timeout: timeout, and the poll ends on time."""
    url = upstream.route("/stall", stall(10))
    started = time.monotonic()
    bad, _ = await side_by_side(upstream, {"timeout": 0.5}, url)
    assert time.monotonic() - started < 3
    failed_with(bad, "timeout", caplog, "no complete answer within 0.5 s")


async def test_slow_drip_is_cut_by_the_whole_poll_deadline(upstream, caplog):
    """A body trickling a byte at a time never trips a per-read timeout; the poll deadline stops it."""
    url = upstream.route("/drip", drip([b"["] + [b" "] * 100, every=0.1))
    started = time.monotonic()
    bad, _ = await side_by_side(upstream, {"timeout": 1}, url)
    assert time.monotonic() - started < 4
    failed_with(bad, "timeout", caplog, "no complete answer within 1 s")


async def test_server_error(upstream, caplog):
    """500: a failure named by its status."""
    url = upstream.route("/500", text("boom", status=500))
    bad, _ = await side_by_side(upstream, {}, url)
    failed_with(bad, "status", caplog, "HTTP 500")


async def test_429_with_retry_after(upstream, caplog):
    """429 + Retry-After: rate_limited, and the next poll waits at least that long."""
    url = upstream.route("/429", text("slow down", status=429, **{"Retry-After": "90"}))
    bad, _ = await side_by_side(upstream, {"interval": 5}, url)
    failed_with(bad, "rate_limited", caplog, "HTTP 429, Retry-After 90 s")
    assert bad.next_poll is not None and bad.next_poll - time.time() >= 85


async def test_304_not_modified(upstream, caplog):
    """The second poll sends If-None-Match; the 304 counts as not_modified and publishes nothing."""

    def answer(request, hit):
        if request.headers.get("if-none-match") == '"v1"':
            return Response(status_code=304)
        return Response(HEALTHY.replace(b"ok-1", b"v1-item"), media_type="application/json", headers={"ETag": '"v1"'})

    url = upstream.route("/etag", answer)
    bad, hub = await side_by_side(upstream, {}, url, polls=3)
    assert bad.state is ProviderState.OK and bad.not_modified == 2 and bad.outcomes == {"ok": 1, "not_modified": 2}
    assert upstream.requests["/etag"][1]["if-none-match"] == '"v1"'
    assert published(hub) == ["v1-item"]


async def test_malformed_json(upstream, caplog):
    """A JSON provider served broken JSON: bad_body."""
    url = upstream.route("/badjson", text(b'[{"id": 1,', media_type="application/json"))
    bad, _ = await side_by_side(upstream, {}, url)
    failed_with(bad, "bad_body", caplog, "malformed JSON")


async def test_malformed_xml(upstream, caplog):
    """A feed cut off mid-document: bad_body, nothing half-parsed is published."""
    url = upstream.route("/badxml", text(b"<rss version='2.0'><channel><item><title>Cut off", media_type="application/rss+xml"))
    bad, hub = await side_by_side(upstream, {"kind": "feed"}, url)
    failed_with(bad, "bad_body", caplog, "malformed XML")
    assert published(hub) == []


async def test_feed_with_an_encoding_warning_is_still_used(upstream, caplog):
    """A feed whose bytes contradict its declared encoding: a warning in the log, items published."""
    body = (FEEDS / "own" / "encoding-warning.xml").read_bytes()
    url = upstream.route("/encoding", text(body, media_type="application/rss+xml"))
    bad, hub = await side_by_side(upstream, {"kind": "feed"}, url)
    assert bad.state is ProviderState.OK and published(hub) == ["n-1"]
    assert any("parse warning" in r.getMessage() and "provider bad" in r.getMessage() for r in caplog.records)


async def test_html_error_page_with_status_200(upstream, caplog):
    """A 200 that is really an HTML error page: bad_body, for feeds and JSON alike."""
    page = b"<!DOCTYPE html><html><head><title>Maintenance</title></head><body>Back soon</body></html>"
    url = upstream.route("/html", text(page, media_type="text/html"))
    bad, _ = await side_by_side(upstream, {"kind": "feed"}, url)
    failed_with(bad, "bad_body", caplog, "an HTML page")
    bad, _ = await side_by_side(upstream, {"kind": "json"}, url)
    assert bad.outcomes == {"bad_body": 1}


async def test_empty_body(upstream, caplog):
    """200 with no body at all: empty."""
    url = upstream.route("/empty", text(b""))
    bad, _ = await side_by_side(upstream, {}, url)
    failed_with(bad, "empty", caplog, "empty body")


async def test_body_over_max_bytes(upstream, caplog):
    """Over max_bytes, with a Content-Length or streamed without one: too_large."""
    url = upstream.route("/big", text(b"[" + b" " * 5000 + b"]", media_type="application/json"))
    bad, _ = await side_by_side(upstream, {"max_bytes": 2048}, url)
    failed_with(bad, "too_large", caplog, "over max_bytes")
    url = upstream.route("/bigstream", drip([b"[", b" " * 3000, b"]"], every=0))
    bad, _ = await side_by_side(upstream, {"max_bytes": 2048}, url)
    assert bad.outcomes == {"too_large": 1}


async def test_gzip_bomb_is_stopped_at_max_bytes_of_output(upstream, caplog):
    """64 MiB of zeros in 64 KiB of gzip: refused after max_bytes decoded, memory stays flat."""
    url = upstream.route("/bomb", text(GZIP_BOMB, media_type="application/json", **{"Content-Encoding": "gzip"}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad, _ = await side_by_side(upstream, {"max_bytes": 1024 * 1024}, url)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    failed_with(bad, "too_large", caplog, "over max_bytes (1048576 bytes decoded)")
    assert grown_mb < 32, grown_mb


async def test_gzip_body_within_limits_is_decoded(upstream):
    """A normal gzip-encoded body is decoded by the poller itself."""
    url = upstream.route("/gz", text(gzip.compress(HEALTHY.replace(b"ok-1", b"gz-1")), media_type="application/json", **{"Content-Encoding": "gzip"}))
    bad, hub = await side_by_side(upstream, {}, url)
    assert bad.state is ProviderState.OK and published(hub) == ["gz-1"]


async def test_items_without_ids_are_skipped_and_counted(upstream, caplog):
    """Items with neither id nor url are skipped, counted and logged; the others are published."""
    body = orjson.dumps([{"title": "no id, no url"}, {"id": "i-1", "title": "fine"}, {"url": "https://u/i-2", "title": "url only"}])
    url = upstream.route("/noids", text(body, media_type="application/json"))
    bad, hub = await side_by_side(upstream, {}, url)
    assert bad.state is ProviderState.OK and bad.items_skipped == 1
    assert sorted(published(hub)) == ["https://u/i-2", "i-1"]
    assert any("provider bad: skipped 1 malformed item(s): item without an id or url" in r.getMessage() for r in caplog.records)


async def test_duplicate_ids_in_one_response(upstream):
    """The same id twice in one body: one event."""
    body = orjson.dumps([{"id": "d-1", "title": "first"}, {"id": "d-1", "title": "again"}])
    url = upstream.route("/dupes", text(body, media_type="application/json"))
    _bad, hub = await side_by_side(upstream, {}, url)
    assert published(hub) == ["d-1"]


async def test_an_item_that_vanishes_and_comes_back(upstream):
    """Present, gone, present again: still one event."""
    one = orjson.dumps([{"id": "v-1", "title": "back again"}])
    none = orjson.dumps([{"id": "v-2", "title": "other"}])
    url = upstream.route(
        "/vanish",
        sequence(text(one, media_type="application/json"), text(none, media_type="application/json"), text(one, media_type="application/json")),
    )
    _bad, hub = await side_by_side(upstream, {}, url, polls=3)
    assert published(hub) == ["v-1", "v-2"]


async def test_a_silent_upstream_makes_no_events(upstream):
    """The same document every time: one round of events, then nothing."""
    url = upstream.route("/same", text(HEALTHY.replace(b"ok-1", b"s-1"), media_type="application/json"))
    bad, hub = await side_by_side(upstream, {}, url, polls=4)
    assert published(hub) == ["s-1"] and bad.outcomes == {"ok": 4}


async def test_recovery_after_failures(upstream, caplog):
    """Two failures then a good body: back to ok, failures reset, a recovery line in the log."""
    url = upstream.route("/recover", sequence(text("", status=502), text("", status=502), text(HEALTHY.replace(b"ok-1", b"r-1"), media_type="application/json")))
    bad, hub = await side_by_side(upstream, {}, url, polls=3)
    assert bad.state is ProviderState.OK and bad.consecutive_failures == 0 and published(hub) == ["r-1"]
    assert any("provider bad: recovered" in r.getMessage() for r in caplog.records)


async def test_fifty_providers_poll_concurrently(upstream):
    """50 providers against one upstream that takes 0.5 s: a round takes about 0.5 s, not 25 s."""
    delay = 0.5
    url = upstream.route("/slow", stall(delay))
    hub = Hub()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:
        pollers = [make(upstream, hub, client, url, name=f"p{n}") for n in range(50)]
        started = time.monotonic()
        await asyncio.gather(*(p.poll_once() for p in pollers))
        wall = time.monotonic() - started
    print(f"\n50 concurrent polls of a {delay} s upstream took {wall:.2f} s")
    assert upstream.hits["/slow"] == 50
    assert all(p.state is ProviderState.OK for p in pollers)
    assert wall < 5 * delay  # sequential polling would take 50 * delay


async def test_first_poll_of_a_snapshot_provider_primes_retained_values_without_events(upstream):
    """backfill off: after the first poll every key has its retained value (as /api/topics and
    snapshots need), and no event was published; a later change publishes only that key."""
    prices = {"AAPL": {"price": 228.0}, "MSFT": {"price": 410.5}}
    upstream.route("/prices", lambda request, hit: Response(orjson.dumps(prices), media_type="application/json"))
    hub = Hub()
    async with httpx.AsyncClient() as client:
        poller = make(upstream, hub, client, upstream.url("/prices"), name="px", kind="snapshot", split="", topic="quotes.{key}", backfill=False)
        await poller.poll_once()
        assert {topic: event.data for topic, event in hub.store.retained.items()} == {
            "quotes.AAPL": {"price": 228.0},
            "quotes.MSFT": {"price": 410.5},
        }
        assert len(hub.store.history) == 0 and poller.items_published == 0
        prices["MSFT"] = {"price": 411.0}
        await poller.poll_once()
    assert [(event.topic, event.data) for event in hub.store.history] == [("quotes.MSFT", {"price": 411.0})]
    assert hub.store.retained["quotes.AAPL"].data == {"price": 228.0}


async def test_the_query_written_in_the_url_is_kept_and_params_add_to_it(upstream):
    """A provider's url may carry its own query (EDGAR's ?action=getcurrent&type=8-K): it reaches
    the upstream whole, with `params` added to it, not replaced by them."""
    queries: list[str] = []

    def answer(request, hit):
        queries.append(request.url.query)
        return Response(HEALTHY, media_type="application/json")

    url = upstream.route("/search", answer) + "?action=getcurrent&type=8-K"
    hub = Hub()
    async with httpx.AsyncClient() as client:
        poller = make(upstream, hub, client, url, params={"key": "k-123"})
        await poller.poll_once()
    assert queries == ["action=getcurrent&type=8-K&key=k-123"]
