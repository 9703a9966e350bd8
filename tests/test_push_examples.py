"""The push blocks of examples/providers.toml against loopback upstreams that speak each real
upstream's documented message shapes (Kraken v2, Wikimedia EventStreams, Bluesky Jetstream).

Each block is read from the file and used unchanged, except that its `url` points at the
loopback upstream (scheme, host and port; the path and any query stay) and it is switched on."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson

from .push_upstream import PushUpstream, sse_frame
from .support import AUTH, KEYS, Server, wait_for

EXAMPLES = Path(__file__).parent.parent / "examples" / "providers.toml"


def example_block(name: str) -> dict[str, Any]:
    """The commented-out `[[providers]]` block called `name` in examples/providers.toml, as TOML values."""
    blocks: list[list[str]] = []
    inside = False
    for line in EXAMPLES.read_text().splitlines():
        if line == "# [[providers]]":
            blocks.append([])
            inside = True
        elif inside and line.startswith("# "):
            blocks[-1].append(line[2:])
        else:
            inside = False  # a blank line ends the block
    for lines in blocks:
        block = tomllib.loads("\n".join(lines))
        if block.get("name") == name:
            return block
    raise AssertionError(f"examples/providers.toml has no block named {name!r}")


def pointed_at(block: dict[str, Any], upstream_url: str) -> dict[str, Any]:
    """``block`` switched on, its url's scheme, host and port those of ``upstream_url``."""
    ours, theirs = urlsplit(upstream_url), urlsplit(block["url"])
    return {**block, "url": theirs._replace(scheme=ours.scheme, netloc=ours.netloc).geturl(), "enabled": True}


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{toml_value(key)} = {toml_value(item)}" for key, item in value.items()) + " }" if value else "{}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return orjson.dumps(value).decode()  # strings, numbers and booleans are spelt alike in JSON and TOML


def config(block: dict[str, Any]) -> str:
    return KEYS + "\n[[providers]]\n" + "".join(f"{toml_value(key)} = {toml_value(value)}\n" for key, value in block.items())


def status_of(server: Server, name: str) -> dict[str, Any]:
    return next(s for s in httpx.get(f"{server.url}/api/providers", timeout=5).json() if s["name"] == name)


def history(server: Server, topics: str) -> list[dict[str, Any]]:
    return httpx.get(f"{server.url}/api/events", params={"topics": topics}, headers=AUTH, timeout=5).json()["events"]


def retained(server: Server, topic: str) -> dict[str, Any] | None:
    answer = httpx.get(f"{server.url}/api/topics/{topic}", headers=AUTH, timeout=5)
    return answer.json() if answer.status_code == 200 else None


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# -- Kraken WebSocket v2 ticker ---------------------------------------------------------------


def kraken_ticker(symbol: str, last: float) -> dict[str, Any]:
    """One entry of a v2 ticker message's `data`, with the documented fields."""
    return {
        "symbol": symbol,
        "bid": last - 0.1,
        "bid_qty": 0.5,
        "ask": last + 0.1,
        "ask_qty": 1.25,
        "last": last,
        "volume": 1234.5,
        "vwap": last,
        "low": last - 50,
        "high": last + 50,
        "change": 10.0,
        "change_pct": 0.02,
    }


def kraken_upstream(upstream: PushUpstream, refuse: str | None = None) -> None:
    """Kraken v2 on loopback: a status message on connect; a subscribe acked (or refused with
    `refuse` as its error) and followed by a snapshot of every symbol asked for."""
    status = {
        "channel": "status",
        "type": "update",
        "data": [{"api_version": "v2", "connection_id": 1, "system": "online", "version": "2.0.9"}],
    }
    upstream.on_ws_connect = lambda path: [dumps(status)]

    def reply(text: str) -> list[str]:
        message = orjson.loads(text)
        if message.get("method") != "subscribe":
            return []
        symbols, stamp = message["params"]["symbol"], "2026-01-05T10:00:00.000000Z"
        if refuse is not None:
            return [
                dumps(
                    {
                        "error": refuse,
                        "method": "subscribe",
                        "success": False,
                        "symbol": symbols[0],
                        "time_in": stamp,
                        "time_out": stamp,
                    }
                )
            ]
        acks = [
            {
                "method": "subscribe",
                "result": {"channel": "ticker", "symbol": symbol, "event_trigger": "trades", "snapshot": True},
                "success": True,
                "time_in": stamp,
                "time_out": stamp,
            }
            for symbol in symbols
        ]
        snapshot = {
            "channel": "ticker",
            "type": "snapshot",
            "data": [kraken_ticker(symbol, 100.0 * (n + 1)) for n, symbol in enumerate(symbols)],
        }
        return [*map(dumps, acks), dumps(snapshot)]

    upstream.on_ws_message = reply


async def test_the_kraken_block_primes_on_the_snapshot_and_publishes_only_changed_tickers():
    """The kraken-ws block subscribes as Kraken v2 documents; the snapshot primes one retained topic per pair without events, heartbeats publish nothing, and only changed tickers are published."""
    with PushUpstream() as upstream:
        kraken_upstream(upstream)
        block = pointed_at(example_block("kraken-ws"), upstream.ws_url)
        with Server(config(block)) as server:
            # status + one ack per symbol + the snapshot
            await wait_for(lambda: status_of(server, "kraken-ws")["messages"] >= 4, 10)
            await wait_for(lambda: retained(server, "crypto.kraken.ETH_USD") is not None, 5)
            primed = {topic: retained(server, topic) for topic in ("crypto.kraken.BTC_USD", "crypto.kraken.ETH_USD")}
            published_after_snapshot = status_of(server, "kraken-ws")["items_published"]
            for _ in range(3):
                upstream.push(dumps({"channel": "heartbeat"}))
            upstream.push(dumps({"channel": "ticker", "type": "update", "data": [kraken_ticker("BTC/USD", 101.0)]}))
            upstream.push(dumps({"channel": "heartbeat"}))
            upstream.push(dumps({"channel": "ticker", "type": "update", "data": [kraken_ticker("BTC/USD", 101.0)]}))  # unchanged
            upstream.push(dumps({"channel": "ticker", "type": "update", "data": [kraken_ticker("ETH/USD", 199.0)]}))
            await wait_for(lambda: status_of(server, "kraken-ws")["items_published"] == 2, 5)
            await wait_for(lambda: status_of(server, "kraken-ws")["messages"] >= 11, 5)
            events = history(server, "crypto.kraken.*")
            status = status_of(server, "kraken-ws")
    assert [orjson.loads(text) for text in upstream.received] == [
        {"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD", "ETH/USD"]}}
    ]
    assert upstream.ws_requests == ["/v2"]
    assert {topic: event["data"]["last"] for topic, event in primed.items() if event} == {
        "crypto.kraken.BTC_USD": 100.0,
        "crypto.kraken.ETH_USD": 200.0,
    }
    assert published_after_snapshot == 0
    assert [(event["topic"], event["data"]["last"]) for event in events] == [
        ("crypto.kraken.BTC_USD", 101.0),
        ("crypto.kraken.ETH_USD", 199.0),
    ]
    assert status["state"] == "connected" and status["items_skipped"] == 0 and status["reconnects"] == 0, status


async def test_a_subscribe_that_kraken_refuses_is_an_upstream_error_with_kraken_s_reason():
    """A subscribe Kraken v2 refuses (`"success": false`) closes the kraken-ws connection as a failed attempt, with Kraken's error text in last_error."""
    with PushUpstream() as upstream:
        kraken_upstream(upstream, refuse="Currency pair not supported")
        block = pointed_at(example_block("kraken-ws"), upstream.ws_url)
        with Server(config(block)) as server:
            await wait_for(lambda: status_of(server, "kraken-ws")["consecutive_failures"] >= 1, 10)
            status = status_of(server, "kraken-ws")
    assert "Currency pair not supported" in status["last_error"], status
    assert status["items_published"] == 0, status


# -- Wikimedia EventStreams ---------------------------------------------------------------------


def recentchange(n: int) -> tuple[str, str]:
    """A recentchange event as EventStreams sends it: (its `id:`, a JSON array of Kafka positions; its data)."""
    stamp = 1_700_000_000 + n
    ident = dumps(
        [
            {"topic": "eqiad.mediawiki.recentchange", "partition": 0, "timestamp": stamp * 1000},
            {"topic": "codfw.mediawiki.recentchange", "partition": 0, "offset": -1},
        ]
    )
    title = f"Page {n}"
    data = {
        "$schema": "/mediawiki/recentchange/1.0.0",
        "meta": {
            "uri": f"https://en.wikipedia.org/wiki/Page_{n}",
            "request_id": f"req-{n}",
            "id": f"6f1c2d3e-0000-4000-8000-{n:012d}",
            "dt": f"2023-11-14T22:13:{20 + n:02d}Z",
            "domain": "en.wikipedia.org",
            "stream": "mediawiki.recentchange",
            "topic": "eqiad.mediawiki.recentchange",
            "partition": 0,
            "offset": 5_000_000_000 + n,
        },
        "id": 1_700_000_000 + n,
        "type": "edit",
        "namespace": 0,
        "title": title,
        "title_url": f"https://en.wikipedia.org/wiki/Page_{n}",
        "comment": "copyedit",
        "timestamp": stamp,
        "user": "Example",
        "bot": False,
        "minor": True,
        "length": {"old": 100, "new": 101},
        "revision": {"old": 10 + n, "new": 11 + n},
        "server_url": "https://en.wikipedia.org",
        "server_name": "en.wikipedia.org",
        "server_script_path": "/w",
        "wiki": "enwiki",
        "parsedcomment": "copyedit",
    }
    return ident, dumps(data)


def eventstreams_frame(n: int) -> bytes:
    ident, data = recentchange(n)
    return sse_frame(data, event="message", ident=ident)


async def test_the_wikimedia_block_resumes_with_the_json_array_last_event_id_and_publishes_each_change_once():
    """The wikimedia-rc block publishes recentchange events as headlines; after the stream drops it reconnects with Last-Event-ID equal to the last event's JSON-array id, and an event EventStreams replays is not published twice."""
    with PushUpstream() as upstream:
        # EventStreams opens with an ":ok" comment; on a resume it replays from the position given.
        upstream.on_sse = lambda headers: (
            [b":ok\n\n"] + ([eventstreams_frame(2), eventstreams_frame(3)] if "last-event-id" in headers else [])
        )
        block = pointed_at(example_block("wikimedia-rc"), upstream.sse_url)
        with Server(config(block)) as server:
            await wait_for(lambda: upstream.open_sse == 1, 10)
            upstream.push(eventstreams_frame(1) + eventstreams_frame(2))
            await wait_for(lambda: status_of(server, "wikimedia-rc")["items_published"] == 2, 5)
            upstream.drop()  # as EventStreams does about every 15 minutes
            await wait_for(lambda: status_of(server, "wikimedia-rc")["items_published"] == 3, 5)
            events = history(server, "wiki.recentchange")
            status = status_of(server, "wikimedia-rc")
    assert len(upstream.sse_requests) == 2
    first, second = upstream.sse_requests
    assert "last-event-id" not in first and first[":path"] == "/v2/stream/recentchange"
    assert second["last-event-id"] == recentchange(2)[0]
    assert first["user-agent"] == example_block("wikimedia-rc")["headers"]["User-Agent"]
    assert [event["data"]["title"] for event in events] == ["Page 1", "Page 2", "Page 3"]
    assert events[0]["data"] == {
        "id": "6f1c2d3e-0000-4000-8000-000000000001",
        "title": "Page 1",
        "url": "https://en.wikipedia.org/wiki/Page_1",
        "source": "Wikimedia",
        "published": "2023-11-14T22:13:21Z",
        "summary": "copyedit",
        "symbols": [],
        "provider": "wikimedia-rc",
    }
    assert status["reconnects"] == 1 and status["state"] == "connected" and status["items_skipped"] == 0, status


# -- Bluesky Jetstream ----------------------------------------------------------------------------


BASE_US = 1_725_911_162_329_308


def jetstream_post(n: int, *, operation: str = "create") -> dict[str, Any]:
    """A Jetstream commit event for app.bsky.feed.post, as documented."""
    commit: dict[str, Any] = {
        "rev": f"3l3qo2vuowo2{n}",
        "operation": operation,
        "collection": "app.bsky.feed.post",
        "rkey": f"3l3qo2vutsw2{n}",
    }
    if operation != "delete":
        commit["record"] = {
            "$type": "app.bsky.feed.post",
            "createdAt": f"2024-09-09T19:46:0{n}.102Z",
            "langs": ["en"],
            "text": f"Post number {n} about $AAPL",
        }
        commit["cid"] = f"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcq{n}"
    return {"did": f"did:plc:eygmaihciaxprqvxpfvl6fl{n}", "time_us": BASE_US + n * 1000, "kind": "commit", "commit": commit}


def jetstream_upstream(upstream: PushUpstream) -> None:
    """Jetstream on loopback: with a `cursor`, a connection replays every post from that time on
    (the post at the cursor itself included) and then a new one."""

    def on_connect(path: str) -> list[str]:
        query = parse_qs(urlsplit(path).query)
        if "cursor" not in query:
            return []
        cursor = int(query["cursor"][0])
        return [dumps(post) for post in (jetstream_post(2), jetstream_post(4)) if post["time_us"] >= cursor]

    upstream.on_ws_connect = on_connect


async def test_the_jetstream_block_publishes_created_posts_and_resumes_from_the_last_time_us():
    """The bluesky block asks Jetstream for posts only, publishes created posts (not identity events or deletes), and after the upstream closes it reconnects with cursor set to the last post's time_us; the replayed post is not published twice."""
    with PushUpstream() as upstream:
        jetstream_upstream(upstream)
        block = pointed_at(example_block("bluesky"), upstream.ws_url)
        with Server(config(block)) as server:
            await wait_for(lambda: upstream.open_ws == 1, 10)
            identity = {
                "did": "did:plc:ufbl4k27gp6kzas5glhz7fim",
                "time_us": BASE_US + 1500,
                "kind": "identity",
                "identity": {
                    "did": "did:plc:ufbl4k27gp6kzas5glhz7fim",
                    "handle": "example.bsky.social",
                    "seq": 1409752997,
                    "time": "2024-09-05T06:11:04.870Z",
                },
            }
            for message in (jetstream_post(1), identity, jetstream_post(1, operation="delete"), jetstream_post(2)):
                upstream.push(dumps(message))
            await wait_for(lambda: status_of(server, "bluesky")["items_published"] == 2, 5)
            await wait_for(lambda: status_of(server, "bluesky")["messages"] == 4, 5)
            upstream.close_all(1000)
            await wait_for(lambda: status_of(server, "bluesky")["items_published"] == 3, 5)
            events = history(server, "social.bluesky")
            status = status_of(server, "bluesky")
    assert len(upstream.ws_requests) == 2
    first, second = (parse_qs(urlsplit(path).query) for path in upstream.ws_requests)
    assert first == {"wantedCollections": ["app.bsky.feed.post"]}, upstream.ws_requests
    assert second == {"wantedCollections": ["app.bsky.feed.post"], "cursor": [str(jetstream_post(2)["time_us"])]}, (
        upstream.ws_requests
    )
    assert all(urlsplit(path).path == "/subscribe" for path in upstream.ws_requests)
    assert [event["data"]["title"] for event in events] == [
        "Post number 1 about $AAPL",
        "Post number 2 about $AAPL",
        "Post number 4 about $AAPL",
    ]
    assert events[0]["data"]["id"] == jetstream_post(1)["commit"]["cid"]
    assert events[0]["data"]["published"] == "2024-09-09T19:46:01.102000Z" and events[0]["data"]["symbols"] == ["AAPL"]
    assert events[0]["data"]["source"] == "Bluesky"
    assert status["reconnects"] == 1 and status["state"] == "connected" and status["items_skipped"] == 0, status
