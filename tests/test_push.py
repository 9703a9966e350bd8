"""Push providers (SPEC §7a) against real upstreams on loopback: an SSE server and a WebSocket
server (tests/push_upstream.py), a real ``stream serve``, real subscribers."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect

from .canary import Canary
from .push_upstream import Close, PushUpstream, sse_frame
from .support import AUTH, KEYS, Server, metric_now, wait_for
from .test_scaleout import Cluster, cluster_config


def push_block(kind: str, url: str, name: str = "wire", **settings: Any) -> str:
    lines = [f'\n[[providers]]\nname = "{name}"\nkind = "{kind}"\nurl = "{url}"']
    for key, value in settings.items():
        lines.append(f"{key} = {value if isinstance(value, str) and value.startswith(('{', '[')) else orjson.dumps(value).decode()}")
    return "\n".join(lines) + "\n"


def headline(n: int, published: float | None = None) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(published or time.time())) + "Z"
    return {"id": f"h{n}", "title": f"Headline {n}", "published": stamp, "symbols": ["AAPL"]}


def get(url: str, **options: Any) -> httpx.Response:
    """A quick synchronous GET to a server under test (its answers are immediate)."""
    return httpx.get(url, timeout=5, **options)


def status_of(server: Server, name: str = "wire") -> dict[str, Any]:
    return next(s for s in httpx.get(f"{server.url}/api/providers", timeout=5).json() if s["name"] == name)


async def receive(socket: Any, until: int, got: list[tuple[float, dict[str, Any]]]) -> None:
    async for raw in socket:
        frame = orjson.loads(raw)
        if frame.get("type") == "event":
            got.append((time.time(), frame))
            if len(got) >= until:
                return


async def test_sse_items_reach_a_websocket_subscriber_once_each_within_milliseconds():
    """30 items pushed 100 ms apart over SSE reach a WebSocket subscriber, each once; from the
    upstream's send to the subscriber's receive, p50 ≤ 50 ms and p99 ≤ 150 ms."""
    with PushUpstream() as upstream, Server(KEYS + push_block("sse", upstream.sse_url, reconnect_min=0.1)) as server:
        await wait_for(lambda: upstream.open_sse == 1, 10)
        async with connect(f"{server.ws_url}?topics=news.wire") as socket:
            got: list[tuple[float, dict[str, Any]]] = []
            reading = asyncio.create_task(receive(socket, 30, got))
            await wait_for(lambda: metric_now(server, "stream_subscriptions") >= 1, 5)
            for n in range(30):
                upstream.push(sse_frame(orjson.dumps(headline(n)).decode(), ident=str(n)), marker=f"h{n}")
                await asyncio.sleep(0.1)
            await asyncio.wait_for(reading, 10)
    ids = [frame["data"]["id"] for _, frame in got]
    assert ids == [f"h{n}" for n in range(30)]
    delays = sorted(at - upstream.sent_at[frame["data"]["id"]] for at, frame in got)
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99)]
    assert p50 <= 0.05 and p99 <= 0.15, (p50, p99)


async def test_an_sse_reconnect_sends_last_event_id_and_a_replayed_item_is_not_published_again():
    """The upstream drops the stream; the reconnect carries Last-Event-ID; the upstream replays
    one old item and one new one, and only the new one is published."""
    old, new = orjson.dumps(headline(1)).decode(), orjson.dumps(headline(2)).decode()
    with PushUpstream() as upstream:
        upstream.on_sse = lambda headers: [sse_frame(old, ident="1"), sse_frame(new, ident="2")] if "last-event-id" in headers else []
        with Server(KEYS + push_block("sse", upstream.sse_url, reconnect_min=0.1, reconnect_max=0.2)) as server:
            await wait_for(lambda: upstream.open_sse == 1, 10)
            upstream.push(sse_frame(old, ident="1"))
            await wait_for(lambda: status_of(server)["items_published"] == 1, 5)
            upstream.drop()
            await wait_for(lambda: status_of(server)["items_published"] == 2, 10)
            history = get(f"{server.url}/api/events", params={"topics": "news.wire"}, headers=AUTH).json()
            status = status_of(server)
    assert upstream.sse_requests[1]["last-event-id"] == "1"
    assert [event["data"]["id"] for event in history["events"]] == ["h1", "h2"]
    assert status["reconnects"] == 1 and status["state"] == "connected"


def kraken_like(upstream: PushUpstream) -> None:
    """Kraken v2's documented shapes: a subscribe acked, a snapshot, then updates; heartbeats."""

    def reply(text: str) -> list[str] | Close:
        message = orjson.loads(text)
        if message.get("method") != "subscribe":
            return []
        symbols = message["params"]["symbol"]
        ack = {"method": "subscribe", "result": {"channel": "ticker", "symbol": symbols[0]}, "success": True}
        data = [{"symbol": symbol, "bid": 100.0, "ask": 100.5, "last": 100.2} for symbol in symbols]
        return [orjson.dumps(ack).decode(), orjson.dumps({"channel": "ticker", "type": "snapshot", "data": data}).decode()]

    upstream.on_ws_message = reply


def ticker(symbol: str, last: float) -> str:
    return orjson.dumps({"channel": "ticker", "type": "update", "data": [{"symbol": symbol, "bid": last - 0.1, "ask": last + 0.1, "last": last}]}).decode()


async def test_a_websocket_sends_auth_then_subscribe_with_the_environment_filled_in_and_where_keeps_control_out():
    """The auth and subscribe messages reach the upstream in order, the environment value
    substituted; control messages and heartbeats that `where` rejects publish nothing."""
    block = push_block(
        "websocket",
        "UPSTREAM",
        subscribe='[{ action = "auth", key = "${PUSH_TEST_KEY}", secret = "${PUSH_TEST_SECRET}" }, { action = "subscribe", news = ["*"] }]',
        where='{ T = "n" }',
        fields='{ title = "headline" }',
    )
    with PushUpstream() as upstream:
        upstream.on_ws_connect = lambda path: [orjson.dumps([{"T": "success", "msg": "connected"}]).decode()]
        env = {"PUSH_TEST_KEY": "key-4b1d9e", "PUSH_TEST_SECRET": "secret-77a0c3f9"}
        with Server(KEYS + block.replace("UPSTREAM", upstream.ws_url), env=env) as server:
            await wait_for(lambda: len(upstream.received) == 2, 10)
            for _ in range(3):
                upstream.push(orjson.dumps([{"T": "subscription", "news": ["*"]}]).decode())
                upstream.push('{"T":"heartbeat"}')
            news = {"T": "n", "id": 7, "headline": "Apple files an 8-K", "created_at": "2026-12-07T10:00:00Z", "symbols": ["AAPL"]}
            upstream.push(orjson.dumps([news]).decode())
            await wait_for(lambda: status_of(server)["items_published"] == 1, 5)
            status = status_of(server)
            providers_text = get(f"{server.url}/api/providers").text
            log = server.output()
    assert [orjson.loads(text) for text in upstream.received] == [
        {"action": "auth", "key": "key-4b1d9e", "secret": "secret-77a0c3f9"},
        {"action": "subscribe", "news": ["*"]},
    ]
    assert status["messages"] == 8 and status["items_skipped"] == 0, status
    for secret in env.values():
        assert secret not in log and secret not in providers_text


async def test_a_websocket_that_answers_pings_but_sends_nothing_is_replaced_after_idle_timeout():
    """The upstream answers pings and sends nothing: the provider reconnects within idle_timeout
    plus its backoff, and `reconnects` counts it."""
    block = push_block("websocket", "UPSTREAM", idle_timeout=0.5, reconnect_min=0.1, reconnect_max=0.2)
    with PushUpstream() as upstream, Server(KEYS + block.replace("UPSTREAM", upstream.ws_url)) as server:
        await wait_for(lambda: len(upstream.ws_requests) == 1, 10)
        first = time.monotonic()
        await wait_for(lambda: len(upstream.ws_requests) == 2, 5)
        took = time.monotonic() - first
        status = status_of(server)
    assert 0.4 <= took <= 0.5 + 0.2 + 0.25 + 1.0, took  # idle_timeout + backoff ceiling + the supervisor's look, and 1 s for a loaded machine
    assert status["reconnects"] >= 1 and "idle" in status["last_error"], status
    assert upstream.most_open_ws == 1


async def test_oversized_non_json_and_id_less_messages_are_handled_and_the_server_stays_healthy():
    """A message over max_message_bytes drops the connection (counted); a non-JSON message and an
    item without an id are skipped and counted; the server stays healthy."""
    block = push_block("websocket", "UPSTREAM", max_message_bytes=4096, reconnect_min=0.1, reconnect_max=0.2)
    with PushUpstream() as upstream, Server(KEYS + block.replace("UPSTREAM", upstream.ws_url)) as server:
        await wait_for(lambda: upstream.open_ws == 1, 10)
        upstream.push("this is not JSON")
        upstream.push(orjson.dumps({"title": "no id and no url"}).decode())
        upstream.push(orjson.dumps(headline(1)).decode())
        await wait_for(lambda: status_of(server)["items_published"] == 1, 5)
        upstream.push(orjson.dumps({**headline(2), "summary": "x" * 8000}).decode())
        await wait_for(lambda: len(upstream.ws_requests) == 2, 5)
        await wait_for(lambda: upstream.open_ws == 1, 5)
        upstream.push(orjson.dumps(headline(3)).decode())
        await wait_for(lambda: status_of(server)["items_published"] == 2, 5)
        status = status_of(server)
        assert metric_now(server, 'stream_provider_oversized_messages_total{provider="wire"}') == 1
        assert get(f"{server.url}/healthz").status_code == 200
    assert status["items_skipped"] == 2 and "max_message_bytes" in status["last_error"], status
    assert "Traceback" not in server.output()


async def test_an_upstream_that_refuses_the_auth_is_failing_after_five_attempts_with_its_reason():
    """An upstream refusing the auth, with an error message that `error` matches or with a close
    code, makes the provider `failing` after 5 attempts with the upstream's reason in
    last_error; it keeps probing at the backoff cadence."""
    refusals = {
        "message": lambda text: [orjson.dumps([{"T": "error", "code": 402, "msg": "auth failed"}]).decode()],
        "close": lambda text: Close(4001, "invalid api key"),
    }
    for how, refuse in refusals.items():
        block = push_block(
            "websocket", "UPSTREAM", subscribe='[{ action = "auth", key = "wrong" }]', error='{ T = "error" }', reconnect_min=0.1, reconnect_max=0.2
        )
        with PushUpstream() as upstream:
            upstream.on_ws_message = refuse
            with Server(KEYS + block.replace("UPSTREAM", upstream.ws_url)) as server:
                await wait_for(lambda: status_of(server)["state"] == "failing", 15)
                failing = status_of(server)
                probes = len(upstream.ws_requests) + 2
                await wait_for(lambda: len(upstream.ws_requests) >= probes, 5)  # still probing  # noqa: B023
        assert failing["consecutive_failures"] >= 5, (how, failing)
        reason = "auth failed (code 402)" if how == "message" else "code 4001: invalid api key"
        assert reason in failing["last_error"], (how, failing)


async def test_a_ticker_over_websocket_retains_values_per_key_and_publishes_only_changes():
    """format = "snapshot" over WebSocket (Kraken v2's ticker shapes): the snapshot on subscribe
    primes the retained values, only changed values are published, unchanged ones are not."""
    block = push_block(
        "websocket",
        "UPSTREAM",
        name="kraken",
        format="snapshot",
        subscribe='[{ method = "subscribe", params = { channel = "ticker", symbol = ["BTC/USD", "ETH/USD"] } }]',
        where='{ channel = "ticker" }',
        split="data",
        key="symbol",
        topic="ticker.{key}",
    )
    with PushUpstream() as upstream:
        kraken_like(upstream)
        with Server(KEYS + block.replace("UPSTREAM", upstream.ws_url)) as server:
            await wait_for(lambda: status_of(server, "kraken")["messages"] >= 2, 10)
            topics = get(f"{server.url}/api/topics").json()
            upstream.push(ticker("BTC/USD", 101.0))
            upstream.push('{"channel":"heartbeat"}')
            upstream.push(ticker("BTC/USD", 101.0))  # unchanged
            upstream.push(ticker("ETH/USD", 99.0))
            await wait_for(lambda: status_of(server, "kraken")["items_published"] == 2, 5)
            async with connect(server.ws_url) as socket:
                await socket.send(orjson.dumps({"op": "subscribe", "topics": ["ticker.*"], "snapshot": True}).decode())
                frames = [orjson.loads(await asyncio.wait_for(socket.recv(), 5)) for _ in range(4)]
    retained = {entry["topic"] for entry in (topics["topics"] if isinstance(topics, dict) else topics)}
    assert {"ticker.BTC_USD", "ticker.ETH_USD"} <= retained, topics
    snapshot = {frame["topic"]: frame["data"]["last"] for frame in frames if frame.get("type") == "event"}
    assert snapshot == {"ticker.BTC_USD": 101.0, "ticker.ETH_USD": 99.0}, frames


async def test_the_lag_histogram_counts_every_pushed_item_with_a_published_time():
    """stream_provider_lag_seconds counts every pushed item that has a `published` time (not the
    one without), and an item months old lands in +Inf only."""
    with PushUpstream() as upstream, Server(KEYS + push_block("sse", upstream.sse_url)) as server:
        await wait_for(lambda: upstream.open_sse == 1, 10)
        for n in range(5):
            upstream.push(sse_frame(orjson.dumps(headline(n)).decode()))
        upstream.push(sse_frame(orjson.dumps({"id": "undated", "title": "No time"}).decode()))
        upstream.push(sse_frame(orjson.dumps(headline(9, published=time.time() - 90 * 86400)).decode()))
        await wait_for(lambda: status_of(server)["items_published"] == 7, 5)
        count = metric_now(server, 'stream_provider_lag_seconds_count{provider="wire"}')
        within_an_hour = metric_now(server, 'stream_provider_lag_seconds_bucket{le="3600.0",provider="wire"}')
    assert count == 6 and within_an_hour == 5


async def test_two_nodes_hold_one_upstream_connection_and_a_takeover_republishes_nothing(redis_server):
    """Two nodes on a real Redis: the upstream sees one connection at a time; SIGKILL the holder
    and the other node connects within 2 × lease_ttl; the new connection's replay of what the
    upstream sent before publishes nothing twice."""
    sent: list[str] = []
    with PushUpstream() as upstream:
        upstream.on_ws_connect = lambda path: list(sent)  # like many upstreams: the latest items first
        config = cluster_config(redis_server.url, push_block("websocket", upstream.ws_url, reconnect_min=0.1, reconnect_max=0.2))
        with Cluster([Server(config), Server(config)]) as servers:
            await wait_for(lambda: upstream.open_ws == 1 and all(status_of(s)["node"] for s in servers), 15)
            for n in range(5):
                sent.append(orjson.dumps(headline(n)).decode())
                upstream.push(sent[-1])
            await wait_for(lambda: all(status_of(s)["items_published"] == 5 for s in servers), 10)
            holder_pid = int(status_of(servers[0])["node"].split(":")[1])
            holder = next(s for s in servers if s.proc.pid == holder_pid)
            other = next(s for s in servers if s is not holder)
            holder.proc.kill()
            killed = time.monotonic()
            await wait_for(lambda: len(upstream.ws_requests) == 2 and upstream.open_ws == 1, 10)
            took = time.monotonic() - killed
            for n in range(5, 8):
                sent.append(orjson.dumps(headline(n)).decode())
                upstream.push(sent[-1])
            await wait_for(lambda: status_of(other)["items_published"] >= 3, 10)
            events = get(f"{other.url}/api/events", params={"topics": "news.wire", "limit": 100}, headers=AUTH).json()["events"]
    assert upstream.most_open_ws == 1
    assert took <= 2 * 2.0, took  # lease_ttl is 2 s in cluster_config
    assert [event["data"]["id"] for event in events] == [f"h{n}" for n in range(8)]


async def test_a_hostile_upstream_neither_stalls_the_loop_nor_grows_memory():
    """An upstream sending as fast as it can (a WebSocket of batches of 2,000 headlines), and one
    sending one endless SSE message, hold neither the loop nor memory: a canary subscriber's
    publish → receive p90 stays ≤ 250 ms, items past max_items_per_second are dropped (unread)
    and counted, the endless message drops its connection (max_message_bytes), and RSS stays
    bounded."""
    flood_block = push_block("websocket", "UPSTREAM", name="flood", max_items_per_second=200)
    endless_block = push_block("sse", "SSE_UPSTREAM", name="endless", max_message_bytes=65536, reconnect_min=0.1, reconnect_max=0.2)
    with PushUpstream() as upstream:
        config = KEYS + flood_block.replace("UPSTREAM", upstream.ws_url) + endless_block.replace("SSE_UPSTREAM", upstream.sse_url)
        with Server(config) as server:
            await wait_for(lambda: upstream.open_ws == 1 and upstream.open_sse == 1, 10)
            with Canary(server) as canary:
                floods = [
                    # batches of 2,000 headlines (~200 KB), as fast as the link takes them
                    upstream.flood(lambda n: orjson.dumps([headline(n * 2000 + k) for k in range(2000)]).decode(), 5),
                    upstream.flood(lambda n: b"data: " + b"y" * 16384, 5),  # one line, never ended
                ]
                sent = await asyncio.gather(*(asyncio.wrap_future(flood) for flood in floods))
            oversized = metric_now(server, 'stream_provider_oversized_messages_total{provider="endless"}')
            dropped = metric_now(server, 'stream_provider_items_dropped_total{provider="flood"}')
            flood, endless = status_of(server, "flood"), status_of(server, "endless")
    report = canary.report
    assert report["p90_delay_s"] is not None and report["p90_delay_s"] <= 0.25, report
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)
    assert flood["messages"] > 20 and dropped > 20 * 2000 - 200 * 6, (sent, flood, dropped)
    assert flood["items_published"] <= 200 * (1 + 10), flood  # the burst plus 200/s for ≤ 10 s
    assert oversized >= 2 and "max_message_bytes" in endless["last_error"], endless


async def test_secrets_substituted_into_subscribe_appear_in_no_log_error_or_status():
    """An upstream that echoes what it was sent, in an error message and in a close reason: the
    values filled into `subscribe` from the environment (under any name) appear in no log line
    (at debug level too), no last_error, and nowhere in /api/providers or /metrics."""
    env = {"PUSH_TEST_KEY": "key-4b1d9e", "PUSH_TEST_SECRET": "secret-77a0c3f9", "PUSH_TEST_LOGIN": "login-e2e1"}
    block = push_block(
        "websocket",
        "UPSTREAM",
        subscribe='[{ action = "auth", key = "${PUSH_TEST_KEY}", secret = "${PUSH_TEST_SECRET}", login = "${PUSH_TEST_LOGIN}" }]',
        error='{ T = "error" }',
        reconnect_min=0.1,
        reconnect_max=0.2,
    )
    echoes = [
        lambda text: [orjson.dumps([{"T": "error", "msg": f"auth failed for {text}"}]).decode()],
        lambda text: Close(4001, "bad key {key} / {secret} for {login}".format(**orjson.loads(text))),
    ]
    with PushUpstream() as upstream:
        upstream.on_ws_message = echoes[0]  # before the server starts: its first auth gets an answer
        # At debug level too: websockets would log every frame sent, the auth message included.
        with Server(KEYS + block.replace("UPSTREAM", upstream.ws_url), env={**env, "STREAM_LOG_LEVEL": "debug"}) as server:
            errors = []
            for echo in echoes:
                upstream.on_ws_message = echo
                seen = len(upstream.received)
                await wait_for(lambda: len(upstream.received) >= seen + 2, 10)  # noqa: B023
                errors.append(status_of(server)["last_error"])
            exposed = get(f"{server.url}/api/providers").text + get(f"{server.url}/metrics").text
        log = server.output()
    assert "auth failed for" in errors[0] and "bad key" in errors[1], errors
    for secret in env.values():
        assert not any(secret in text for text in [*errors, exposed, log]), secret


async def test_an_sse_url_keeps_its_own_query_and_params_add_to_it():
    """An sse provider's url may carry a query (Mastodon's ?tag=…): it reaches the upstream whole,
    with `params` added to it."""
    with PushUpstream() as upstream, Server(KEYS + push_block("sse", upstream.sse_url + "?tag=markets", params='{ limit = "5" }')):
        await wait_for(lambda: upstream.open_sse == 1, 10)
    assert upstream.sse_requests[0][":path"] == "/events?tag=markets&limit=5"


async def test_a_websocket_upstream_that_redirects_is_refused_and_gets_no_keys():
    """An upgrade answered with a redirect to another host is a failed attempt: the provider
    never connects there, so neither its headers nor its subscribe messages (keys) leave the
    configured origin."""
    block = push_block(
        "websocket", "UPSTREAM", subscribe='[{ action = "auth", key = "${PUSH_TEST_KEY}" }]', headers='{ X-Api-Key = "${PUSH_TEST_KEY}" }'
    )
    with PushUpstream() as upstream, PushUpstream() as elsewhere:
        upstream.redirect_to = elsewhere.ws_url
        with Server(KEYS + block.replace("UPSTREAM", upstream.ws_url), env={"PUSH_TEST_KEY": "key-9f8e7d"}) as server:
            await wait_for(lambda: "302" in (status_of(server)["last_error"] or ""), 10)
    assert elsewhere.ws_requests == [] and elsewhere.received == []


async def test_an_sse_stream_is_asked_uncompressed_and_a_compressed_one_is_refused():
    """max_message_bytes counts the bytes as they arrive, so the SSE request asks for identity;
    a stream sent gzip-encoded anyway (which would decompress past any bound) is refused."""
    with PushUpstream() as upstream:
        upstream.sse_headers = "Content-Encoding: gzip\r\n"
        with Server(KEYS + push_block("sse", upstream.sse_url, reconnect_min=0.1, reconnect_max=0.2)) as server:
            await wait_for(lambda: "gzip-encoded" in (status_of(server)["last_error"] or ""), 10)
    assert upstream.sse_requests[0]["accept-encoding"] == "identity"


async def test_an_upstream_flooding_pings_it_does_not_read_the_answers_to_is_dropped_and_replaced():
    """An upstream that stops reading and sends PINGs as fast as it can: the unsent pongs are
    bounded (the link is dropped past SEND_BUFFER_CAP, counted as a `flood`), and the provider
    connects again instead of hanging on its close."""
    block = push_block("websocket", "UPSTREAM", reconnect_min=0.1, reconnect_max=0.2)
    with PushUpstream() as upstream, Server(KEYS + block.replace("UPSTREAM", upstream.ws_url)) as server:
        await wait_for(lambda: upstream.open_ws == 1, 10)
        flood = upstream.ping_flood(3)
        await wait_for(lambda: "flood" in (status_of(server)["last_error"] or ""), 10)
        await asyncio.wrap_future(flood)
        await wait_for(lambda: len(upstream.ws_requests) >= 2 and upstream.open_ws == 1, 10)


async def test_an_sse_id_that_cannot_be_a_header_is_not_sent_back_and_breaks_nothing():
    """An SSE `id:` that cannot travel in a Last-Event-ID header (not ASCII) is not kept: the
    reconnect sends the last one that can, and nothing raises."""
    with PushUpstream() as upstream, Server(KEYS + push_block("sse", upstream.sse_url, reconnect_min=0.1, reconnect_max=0.2)) as server:
        await wait_for(lambda: upstream.open_sse == 1, 10)
        upstream.push(sse_frame(orjson.dumps(headline(1)).decode(), ident="plain-1"))
        upstream.push(sse_frame(orjson.dumps(headline(2)).decode(), ident="café"))
        await wait_for(lambda: status_of(server)["items_published"] == 2, 5)
        upstream.drop()
        await wait_for(lambda: len(upstream.sse_requests) == 2 and upstream.open_sse == 1, 10)
    assert upstream.sse_requests[1]["last-event-id"] == "plain-1"
    assert "Traceback" not in server.output()


async def test_a_restarted_node_republishes_no_ticker_value_it_had_published(redis_server):
    """A ticker provider on Redis, stopped right after publishing a change: restarted, the
    upstream's snapshot on subscribe repeats the values the hub already holds, and nothing is
    published again; a real change after it is."""
    last = {"BTC/USD": 100.0, "ETH/USD": 200.0}

    def reply(text: str) -> list[str]:
        if orjson.loads(text).get("method") != "subscribe":
            return []
        data = [{"symbol": symbol, "last": price} for symbol, price in last.items()]
        return [orjson.dumps({"channel": "ticker", "type": "snapshot", "data": data}).decode()]

    block = push_block(
        "websocket",
        "UPSTREAM",
        name="kraken",
        format="snapshot",
        subscribe='[{ method = "subscribe", params = { channel = "ticker", symbol = ["BTC/USD", "ETH/USD"] } }]',
        where='{ channel = "ticker" }',
        split="data",
        key="symbol",
        topic="ticker.{key}",
    )
    with PushUpstream() as upstream:
        upstream.on_ws_message = reply
        config = cluster_config(redis_server.url, block.replace("UPSTREAM", upstream.ws_url))
        with Server(config) as first:
            await wait_for(lambda: status_of(first, "kraken")["messages"] >= 1, 10)
            last["BTC/USD"] = 101.0
            upstream.push(orjson.dumps({"channel": "ticker", "type": "update", "data": [{"symbol": "BTC/USD", "last": 101.0}]}).decode())
            await wait_for(lambda: status_of(first, "kraken")["items_published"] == 1, 5)
        with Server(config) as second:
            await wait_for(lambda: status_of(second, "kraken")["messages"] >= 1 and status_of(second, "kraken")["node"], 15)
            last["ETH/USD"] = 201.0
            upstream.push(orjson.dumps({"channel": "ticker", "type": "update", "data": [{"symbol": "ETH/USD", "last": 201.0}]}).decode())
            await wait_for(lambda: status_of(second, "kraken")["items_published"] >= 1, 5)
            events = get(f"{second.url}/api/events", params={"topics": "ticker.*"}, headers=AUTH).json()["events"]
    assert [(event["topic"], event["data"]["last"]) for event in events] == [("ticker.BTC_USD", 101.0), ("ticker.ETH_USD", 201.0)]


def test_a_change_made_while_a_save_is_in_flight_is_saved_next_time():
    """The state is marked clean when its snapshot is taken, not when the save returns: an item
    remembered while Redis answers the save keeps the state dirty (it was lost until the next
    change), and a failed save leaves it dirty."""
    from stream.hub import Hub
    from stream.intake import Intake
    from stream.leases import Leases
    from stream.provider_settings import ProviderSettings

    class SlowLeases(Leases):
        def __init__(self) -> None:
            super().__init__()
            self.saved: list[list[str]] = []
            self.release = asyncio.Event()
            self.fail = False

        async def save(self, name, state, fence) -> None:
            await self.release.wait()
            if self.fail:
                from stream.errors import BrokerUnavailable

                raise BrokerUnavailable("away")
            self.saved.append([key for key, _ in state["seen"]])

    async def scenario() -> tuple[list[list[str]], bool, bool]:
        leases = SlowLeases()
        intake = Intake(ProviderSettings(name="p", kind="sse", url="http://u/s"), Hub(), leases=leases)
        intake._remember({"h1": None}, 0)
        saving = asyncio.create_task(intake._save())
        await asyncio.sleep(0)
        intake._remember({"h2": None}, 0)  # while the save is in flight
        leases.release.set()
        await saving
        dirty_after = intake.dirty
        leases.fail = True
        try:
            await intake._save()
        except Exception:
            pass
        return leases.saved, dirty_after, intake.dirty

    saved, dirty_after, dirty_after_failure = asyncio.run(scenario())
    assert saved == [["h1"]] and dirty_after and dirty_after_failure
