"""Provider parsing (stream/providers/): bytes in, items out, no I/O."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from stream.errors import UpstreamError
from stream.provider_settings import ProviderSettings, problem_lines
from stream.providers import DemoMarket, parse
from stream.providers.base import parse_time, render_topic
from stream.settings import Settings

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(p for p in (DATA / "feeds").iterdir() if p.suffix != ".md")


def provider(**table):
    table.setdefault("name", "p")
    table.setdefault("kind", "feed")
    table.setdefault("url", "https://upstream.example/feed")
    return ProviderSettings(**table)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_real_world_sample_feed_parses(sample):
    """All rss-parser samples: each is read as a feed; every entry becomes a headline or is counted skipped."""
    parsed = parse(provider(), sample.read_bytes(), content_type="application/xml", location="https://feeds.example/x")
    assert parsed.items or parsed.skipped
    for item in parsed.items:
        data = item.data
        assert set(data) == {"id", "title", "url", "source", "published", "summary", "symbols", "provider"}
        assert data["id"] and data["title"] and data["provider"] == "p"
        assert item.topic == "news.p" and len(data["summary"]) <= 1000
        assert orjson.dumps(data)


def test_sample_feed_details():
    """Spot checks: relative links resolved, HTML stripped, missing ids fall back to links, a
    foreign-language date left null, an entry with nothing usable skipped."""
    gulp = parse(provider(), (DATA / "feeds" / "gulp-atom.atom").read_bytes(), location="https://github.com/gulpjs/gulp/releases.atom")
    assert gulp.items[0].data["url"] == "https://github.com/gulpjs/gulp/releases/tag/v3.9.0"
    encoding = parse(provider(), (DATA / "feeds" / "encoding.rss").read_bytes())
    assert encoding.items[0].data["id"].startswith("http://feeds.jn.pt/")
    uol = parse(provider(), (DATA / "feeds" / "uolNoticias.rss").read_bytes())
    assert uol.warning and uol.items and uol.items[0].data["published"] is None
    incomplete = parse(provider(), (DATA / "feeds" / "incomplete-fields.atom").read_bytes())
    assert incomplete.items == [] and incomplete.skipped == 1
    guardian = parse(provider(), (DATA / "feeds" / "guardian.rss").read_bytes())
    assert guardian.items[0].data["published"] == "2018-01-31T07:26:05Z"
    assert "<" not in guardian.items[0].data["summary"]


@pytest.mark.parametrize(
    ("sample", "title"),
    [
        ("rss091.xml", "Café chain lists shares ($CAFE)"),
        ("rss20-html.xml", "8-K & press release: Apple Inc."),
        ("rdf10.xml", "RSS 1.0 item"),
        ("atom10-relative.xml", "4 - Nvidia Corp (0001045810) (Issuer)"),
    ],
)
def test_each_feed_version(sample, title):
    """RSS 0.91, RSS 2.0, RSS 1.0 (RDF) and Atom 1.0 all yield headlines."""
    parsed = parse(provider(), (DATA / "own" / sample).read_bytes())
    assert parsed.items[0].data["title"] == title


def test_feed_normalisation():
    """Dates to UTC ISO, HTML summaries to text, cashtags to symbols, xml:base links resolved."""
    rss = parse(provider(), (DATA / "own" / "rss20-html.xml").read_bytes())
    first = rss.items[0].data
    assert first["published"] == "2026-11-25T09:05:00Z"
    assert first["summary"] == "Item 2.02 results of operations"
    assert first["source"] == "Filings Watch"
    cafe = parse(provider(), (DATA / "own" / "rss091.xml").read_bytes()).items[0].data
    assert cafe["symbols"] == ["CAFE"] and cafe["id"] == "http://wire.example/cafe"
    atom = parse(provider(), (DATA / "own" / "atom10-relative.xml").read_bytes()).items[0].data
    assert atom["url"] == "https://sec.example/cgi-bin/browse-edgar?action=getcompany&CIK=0001045810"
    assert atom["published"] == "2026-11-25T14:59:00Z"


def test_feed_fields_mapping_and_topic_template():
    """fields maps upstream names; the topic template takes headline fields."""
    p = provider(fields={"symbols": "tags"}, topic="filings.{source}")
    parsed = parse(p, (DATA / "own" / "rss20-html.xml").read_bytes())
    assert parsed.items[0].topic == "filings.Filings_Watch"
    assert parsed.items[0].data["symbols"] == []  # tags are objects, not strings: no symbols


def test_feed_with_an_encoding_warning_is_still_used():
    """A declared encoding that the bytes contradict is a benign warning: items are published."""
    parsed = parse(provider(), (DATA / "own" / "encoding-warning.xml").read_bytes(), content_type="application/rss+xml; charset=utf-8")
    assert parsed.warning and "Encoding" in parsed.warning
    assert parsed.items[0].data["title"] == "Eleição: pesquisa divulgada"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<!doctype html><html><body><h1>502 Bad Gateway</h1></body></html>", "HTML page"),
        (b"<rss><channel><title>x</title><item><title>broken", "malformed XML"),
        (b'{"json": "not a feed"}', "not an RSS or Atom"),
    ],
)
def test_unusable_feed_documents_are_bad_bodies(body, message):
    """An HTML error page, broken XML or another format: UpstreamError(bad_body) saying which."""
    with pytest.raises(UpstreamError) as info:
        parse(provider(), body)
    assert info.value.kind == "bad_body" and message in info.value.message


NEWSAPI = {
    "status": "ok",
    "articles": [
        {"source": {"id": None, "name": "Reuters"}, "title": "Chipmakers rally", "url": "https://r.example/1", "publishedAt": "2026-11-25T09:00:00Z", "description": "<b>Up</b> 3%"},
        {"source": {"name": "AP"}, "title": "No url here", "publishedAt": "2026-11-25T09:01:00Z"},
        {"source": {"name": "AP"}, "url": "https://ap.example/2"},
        "not an object",
    ],
}


def test_json_items_path_id_fallback_and_skips():
    """items path, id falling back to url, source from an object; malformed items counted."""
    p = provider(kind="json", items="articles")
    parsed = parse(p, orjson.dumps(NEWSAPI))
    assert [item.key for item in parsed.items] == ["https://r.example/1"]
    data = parsed.items[0].data
    assert (data["source"], data["summary"], data["published"]) == ("Reuters", "Up 3%", "2026-11-25T09:00:00Z")
    assert parsed.skipped == 3 and len(parsed.problems) == 3


def test_json_fields_mapping_like_finnhub():
    """A Finnhub-shaped item: headline, unix datetime, comma-separated related symbols."""
    body = orjson.dumps([{"id": 7, "headline": "Apple beats", "datetime": 1795600800, "related": "AAPL,MSFT", "url": "https://f.example/7", "source": "Finnhub"}])
    p = provider(kind="json", fields={"title": "headline", "published": "datetime", "symbols": "related"})
    [item] = parse(p, body).items
    assert item.key == "7" and item.data["title"] == "Apple beats"
    assert item.data["published"] == "2026-11-25T10:00:00Z" and item.data["symbols"] == ["AAPL", "MSFT"]


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "malformed JSON"), (b'{"articles": {"a": 1}}', "expected a list"), (b"<html>down</html>", "HTML page")],
)
def test_json_bad_bodies(body, message):
    """Broken JSON, a non-list at the items path, an HTML page: bad_body with the reason."""
    with pytest.raises(UpstreamError) as info:
        parse(provider(kind="json", items="articles"), body)
    assert message in info.value.message


def test_snapshot_whole_value_mapping_split_and_list_split():
    """No split: one item; split of a mapping: one per key; split of a list: keyed by `key`."""
    doc = {"data": {"rates": {"BTC": "1", "ETH": "30"}, "list": [{"symbol": "BTCUSDT", "price": "1"}, {"price": "2"}]}}
    whole = parse(provider(kind="snapshot", path="data.rates"), orjson.dumps(doc))
    assert [(i.key, i.topic, i.data) for i in whole.items] == [("", "p", {"BTC": "1", "ETH": "30"})]
    by_key = parse(provider(kind="snapshot", path="data", split="rates", topic="fx.{key}"), orjson.dumps(doc))
    assert [(i.key, i.topic, i.data) for i in by_key.items] == [("BTC", "fx.BTC", "1"), ("ETH", "fx.ETH", "30")]
    listed = parse(provider(kind="snapshot", path="data", split="list", key="symbol", topic="px.{symbol}"), orjson.dumps(doc))
    assert [(i.key, i.topic) for i in listed.items] == [("BTCUSDT", "px.BTCUSDT")] and listed.skipped == 1
    with pytest.raises(UpstreamError, match="nothing at"):
        parse(provider(kind="snapshot", path="data.missing"), orjson.dumps(doc))


def test_topic_templates_make_valid_topics_from_any_value():
    """Placeholders are cleaned into valid segments; an impossible topic is refused."""
    assert render_topic("news.{source}", {"source": "The Guardian / UK"}) == "news.The_Guardian_UK"
    assert render_topic("q.{key}", {"key": "BTC-USD"}) == "q.BTC-USD"
    assert render_topic("q.{missing}", {}) == "q._"


def test_times_in_every_common_form():
    """ISO-8601, RFC 822, Unix seconds and milliseconds all become aware UTC datetimes."""
    expected = "2026-11-25T10:00:00+00:00"
    for value in ["2026-11-25T10:00:00Z", "2026-11-25T11:00:00+01:00", "Wed, 25 Nov 2026 10:00:00 GMT", 1795600800, 1795600800000, "1795600800"]:
        assert parse_time(value).isoformat() == expected
    assert parse_time("Seg, 24 Set 2018 19:42:40 -0300") is None and parse_time(None) is None


def test_demo_market_documents_parse_with_their_providers():
    """The demo quotes, RSS and JSON parse into per-symbol values and headlines with symbols."""
    market = DemoMarket(1_800_000_000.0, seed=7)
    quotes = parse(provider(kind="demo", url="/demo/quotes"), market.quotes(1_800_000_005.0))
    assert {i.topic for i in quotes.items} >= {"quotes.AAPL", "quotes.BTC-USD"}
    rss = parse(provider(kind="demo", url="/demo/news.rss"), market.rss(1_800_000_005.0, "http://h"))
    assert rss.items and all(item.data["symbols"] for item in rss.items)
    wire = parse(provider(kind="demo", url="/demo/news.json"), market.json_feed(1_800_000_005.0, "http://h"))
    assert wire.items and wire.items[0].data["source"] == "Demo Markets API"


def test_links_are_web_links_only_and_encoded_tags_are_stripped():
    """javascript: and relative links are dropped; an entity-encoded tag never reaches the text."""
    body = orjson.dumps(
        [
            {"id": "1", "title": "Click", "url": "javascript:alert(1)", "summary": "&lt;script&gt;alert(1)&lt;/script&gt; fine"},
            {"id": "2", "title": "Relative", "url": "/x"},
        ]
    )
    first, second = parse(provider(kind="json"), body).items
    assert first.data["url"] is None and second.data["url"] is None
    assert "<" not in first.data["summary"] and "fine" in first.data["summary"]


def test_time_edge_cases():
    """Fractional epoch strings, a lowercase z, and zero (missing) are handled."""
    assert parse_time("1795600800.5").isoformat() == "2026-11-25T10:00:00.500000+00:00"
    assert parse_time("2026-11-25T10:00:00z").isoformat() == "2026-11-25T10:00:00+00:00"
    assert parse_time(0) is None and parse_time("0") is None


def test_config_rejects_nan_intervals_and_unknown_topic_placeholders():
    """interval = nan would hang a poller; {category} would send everything to one topic."""
    with pytest.raises(ValidationError) as refused:
        Settings(
            providers=[
                {"name": "a", "kind": "json", "url": "https://u/x", "interval": float("nan")},
                {"name": "b", "kind": "json", "url": "https://u/x", "topic": "news.{category}"},
                {"name": "c", "kind": "snapshot", "url": "https://u/x", "topic": "px.{symbol}", "split": ""},
            ]
        )
    problems = problem_lines(refused.value)
    assert len(problems) == 2, problems
    assert problems[0].startswith("providers[0].interval") and "unknown placeholder {category}" in problems[1]


def test_demo_stories_fit_their_price_moves_and_differ_between_the_wires():
    """An hour of demo news: every price story's verb and reason go the same way as the move it
    states, no price story at the opening price claims a move, Bitcoin never has earnings, and
    no headline appears on both wires."""
    from stream.providers.demo import CRYPTO_DOWN_REASONS, CRYPTO_UP_REASONS, DOWN_REASONS, UP_REASONS

    market = DemoMarket(1_800_000_000.0, seed=11)
    market.advance(1_800_000_000.0 + 3600)
    markets = [item["title"] for item in market.headlines["markets"]]
    newswire = [item["title"] for item in market.headlines["newswire"]]
    assert len(markets) >= 20 and len(newswire) >= 20
    for title in markets:
        if " trades flat near " in title:
            continue
        match = re.search(r" (climbs|rises|dips|slides) (\d+\.\d)% to \$[\d,.]+ as (.+)$", title)
        assert match, title
        verb, percent, reason = match.groups()
        assert float(percent) >= 0.1, title
        up = verb in ("climbs", "rises")
        crypto = title.startswith("Bitcoin")
        assert reason in ((CRYPTO_UP_REASONS if crypto else UP_REASONS) if up else (CRYPTO_DOWN_REASONS if crypto else DOWN_REASONS)), title
    assert not any("$" in title or "Bitcoin" in title for title in newswire)
    assert not set(markets) & set(newswire)


def push_provider(**settings) -> ProviderSettings:
    return ProviderSettings(name="p", kind=settings.pop("kind", "websocket"), url="wss://upstream/x", **settings)


def test_a_push_message_is_data_control_or_error_and_an_array_is_a_batch():
    """`where` picks the data elements of a batch, `error` the upstream's errors (with its text and
    code), everything else is control; a message that is not JSON is skipped and counted."""
    from stream.providers.push import read_message

    provider = push_provider(where={"T": "n"}, error={"T": "error"}, fields={"title": "headline"})
    batch = [
        {"T": "success", "msg": "connected"},
        {"T": "n", "id": 1, "headline": "Apple files an 8-K", "created_at": "2026-12-07T10:00:00Z", "symbols": ["AAPL"]},
        {"T": "n", "headline": "no id"},
        {"T": "error", "code": 402, "msg": "auth failed"},
    ]
    message = read_message(orjson.dumps(batch), provider)
    assert (message.data, message.control, message.error) == (2, 1, "auth failed (code 402)")
    [item] = message.parsed.items
    assert item.key == "1" and item.data["title"] == "Apple files an 8-K" and item.published == 1796637600.0
    assert message.parsed.skipped == 1
    garbage = read_message(b"<html>", provider)
    assert garbage.parsed.skipped == 1 and garbage.data == garbage.control == 0


def test_a_pushed_snapshot_is_split_by_key_and_the_resume_field_is_kept():
    """format = "snapshot": each entry of `split` is a value on its own topic; the last value of
    the resume field in a data message is what the next connection resumes from."""
    from stream.providers.push import read_message

    provider = push_provider(
        format="snapshot", where={"channel": "ticker"}, split="data", key="symbol", topic="ticker.{key}", resume={"param": "cursor", "field": "seq"}
    )
    frame = {"channel": "ticker", "seq": 42, "data": [{"symbol": "BTC/USD", "last": 1.0}, {"symbol": "ETH/USD", "last": 2.0}]}
    message = read_message(orjson.dumps(frame), provider)
    assert [(item.key, item.topic, item.data["last"]) for item in message.parsed.items] == [
        ("BTC/USD", "ticker.BTC_USD", 1.0),
        ("ETH/USD", "ticker.ETH_USD", 2.0),
    ]
    assert message.resume == 42
    heartbeat = read_message(b'{"channel":"heartbeat"}', provider)
    assert heartbeat.control == 1 and heartbeat.resume is None and not heartbeat.parsed.items


def test_reconnect_delays_are_full_jitter_up_to_the_ceiling():
    """From 0 to reconnect_min doubled per step, never past reconnect_max."""
    import random

    from stream.push import reconnect_delay

    rng = random.Random(1)
    for step in range(12):
        delays = [reconnect_delay(1.0, 300.0, step, rng) for _ in range(200)]
        ceiling = min(300.0, 2.0**step)
        assert 0 <= min(delays) and max(delays) <= ceiling and max(delays) > ceiling * 0.8


def test_a_time_that_overflows_on_conversion_to_utc_is_no_time():
    """0001-01-01T00:00:00+05:00 parses but cannot be moved to UTC: no time, never an exception
    (it escaped from the push path and dropped the connection on every message)."""
    assert parse_time("0001-01-01T00:00:00+05:00") is None
    assert parse_time("2026-12-07T10:00:00+01:00").isoformat() == "2026-12-07T09:00:00+00:00"
