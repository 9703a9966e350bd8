"""The HTTP API (stream/transports/http.py) against a real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .support import AUTH, KEYS, Server, metric_now, publish


async def test_health_and_readiness(server, client):
    """/healthz is ok while serving; /readyz is ready once the hub runs."""
    assert (await client.get(f"{server.url}/healthz")).json() == {"status": "ok"}
    ready = await client.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_publish_single_and_batch_return_ids_in_order(server, client):
    """A single event or a list of up to 100: 202 with one id each, in order."""
    one = await client.post(f"{server.url}/api/publish", json={"topic": "http.a", "data": {"x": 1}}, headers=AUTH)
    assert one.status_code == 202 and len(one.json()["ids"]) == 1
    many = await client.post(
        f"{server.url}/api/publish", json=[{"topic": "http.b", "data": n} for n in range(100)], headers=AUTH
    )
    ids = many.json()["ids"]
    assert many.status_code == 202 and len(ids) == 100
    seqs = [int(i.rsplit("-", 1)[1]) for i in [one.json()["ids"][0], *ids]]
    assert seqs == sorted(seqs)


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"topic": "a", "data": 1}, {}, 401, "unauthorized"),
        ({"topic": "a", "data": 1}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        (b"{not json", AUTH, 400, "bad_request"),
        ({"topic": "a..b", "data": 1}, AUTH, 400, "bad_topic"),
        ({"topic": "_system.x", "data": 1}, AUTH, 403, "forbidden"),
        ({"topic": "a"}, AUTH, 422, "validation_error"),
        ({"topic": "a", "data": 1, "extra": 2}, AUTH, 422, "validation_error"),
        ([{"topic": "a", "data": n} for n in range(101)], AUTH, 422, "validation_error"),
        ([], AUTH, 422, "validation_error"),
        ("just a string", AUTH, 422, "validation_error"),
        ({"topic": "a", "data": "x" * (64 * 1024)}, AUTH, 413, "payload_too_large"),
        ([{"topic": "a", "data": "x" * 60_000}] * 20, AUTH, 413, "payload_too_large"),
    ],
)
async def test_publish_errors_have_the_documented_status_and_code(server, client, body, headers, status, code):
    """Each bad publish gets its status and the one error shape, with a message naming the field."""
    if isinstance(body, bytes):
        response = await client.post(f"{server.url}/api/publish", content=body, headers=headers)
    else:
        response = await client.post(f"{server.url}/api/publish", json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


async def test_a_rejected_batch_publishes_nothing(server, client):
    """A batch with one bad item is refused whole: no event of it is accepted."""
    response = await client.post(
        f"{server.url}/api/publish", json=[{"topic": "atomic.ok", "data": 1}, {"topic": "bad..", "data": 2}], headers=AUTH
    )
    assert response.status_code == 400 and "body[1].topic" in response.json()["error"]["message"]
    assert (await client.get(f"{server.url}/api/topics/atomic.ok")).status_code == 404


async def test_publishing_is_refused_without_any_key_configured():
    """With no [[keys]] publish rights, publishing is 403 even with a token."""
    with Server("") as bare:
        async with __import__("httpx").AsyncClient() as http:
            response = await http.post(f"{bare.url}/api/publish", json={"topic": "a", "data": 1})
    assert response.status_code == 403 and "no key" in response.json()["error"]["message"]


async def test_topics_and_retained_value(server, client):
    """/api/topics lists retained topics with last id/ts and subscribers; /api/topics/{t} returns the event."""
    [_first, last] = await publish(client, server, [{"topic": "ret.x", "data": 1}, {"topic": "ret.x", "data": 2}])
    listing = {t["topic"]: t for t in (await client.get(f"{server.url}/api/topics")).json()}
    assert listing["ret.x"]["last_id"] == last and listing["ret.x"]["subscribers"] == 0
    event = (await client.get(f"{server.url}/api/topics/ret.x")).json()
    assert event["id"] == last and event["data"] == 2
    missing = await client.get(f"{server.url}/api/topics/ret.none")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = await client.get(f"{server.url}/api/topics/ret..x")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_topic"


async def test_events_history_paging_and_limits(server, client):
    """/api/events pages through history with next; without since it returns the latest."""
    ids = await publish(client, server, [{"topic": "hist.a", "data": n} for n in range(10)])
    latest = (await client.get(f"{server.url}/api/events", params={"topics": "hist.>", "limit": 3})).json()
    assert [e["id"] for e in latest["events"]] == ids[-3:] and latest["gap"] is False
    page = (await client.get(f"{server.url}/api/events", params={"topics": "hist.>", "since": ids[2], "limit": 4})).json()
    assert [e["id"] for e in page["events"]] == ids[3:7] and page["next"] == ids[6]
    rest = (await client.get(f"{server.url}/api/events", params={"topics": "hist.>", "since": page["next"]})).json()
    assert [e["id"] for e in rest["events"]] == ids[7:]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"topics": "a..b"}, 400, "bad_topic"),
        ({"since": "rubbish"}, 400, "bad_request"),
        ({"limit": "0"}, 422, "validation_error"),
        ({"limit": "many"}, 422, "validation_error"),
        ({"wait": "61"}, 422, "validation_error"),
    ],
)
async def test_events_errors(server, client, params, status, code):
    """Bad history queries get 400/422 naming the parameter."""
    response = await client.get(f"{server.url}/api/events", params=params)
    assert response.status_code == status and response.json()["error"]["code"] == code


async def test_events_long_poll_returns_when_an_event_arrives(server, client):
    """wait=N holds the request until a matching event is published."""
    [since] = await publish(client, server, {"topic": "poll.a", "data": 0})
    request = asyncio.create_task(
        client.get(f"{server.url}/api/events", params={"topics": "poll.>", "since": since, "wait": 10})
    )
    await asyncio.sleep(0.3)
    assert not request.done()
    await publish(client, server, {"topic": "other.x", "data": 1})
    await asyncio.sleep(0.2)
    assert not request.done()
    [event_id] = await publish(client, server, {"topic": "poll.a", "data": 2})
    response = await asyncio.wait_for(request, 5)
    assert [e["id"] for e in response.json()["events"]] == [event_id]


async def test_events_long_poll_times_out_empty(server, client):
    """With nothing published, wait=1 returns an empty page after about a second."""
    response = await client.get(f"{server.url}/api/events", params={"topics": "quiet.>", "wait": 1, "since": "-1s"})
    assert response.status_code == 200 and response.json()["events"] == []


async def test_metrics_expose_the_hub_counters(server, client):
    """/metrics is Prometheus text with connections, published, deliveries and latency, and the
    process's memory, descriptors and collector runs."""
    await publish(client, server, {"topic": "metrics.a", "data": 1})
    text = (await client.get(f"{server.url}/metrics")).text
    for name in [
        'stream_connections{transport="ws"}',
        'stream_events_published_total{prefix="metrics"}',
        "stream_delivery_latency_seconds_bucket",
        "stream_slow_consumer_disconnects_total",
        "stream_subscriptions",
        "process_resident_memory_bytes",
        "process_open_fds",
        'python_gc_collections_total{generation="2"}',
    ]:
        assert name in text, name


async def test_unknown_paths_get_the_error_shape(server, client):
    """404s use the same error JSON."""
    response = await client.get(f"{server.url}/api/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


async def test_dashboard_and_openapi_are_served(server, client):
    """GET / serves the dashboard page; FastAPI's /openapi.json lists the API."""
    assert "<html" in (await client.get(f"{server.url}/")).text
    paths = (await client.get(f"{server.url}/openapi.json")).json()["paths"]
    assert {"/api/publish", "/api/events", "/sse"} <= set(paths)


async def test_publish_rate_per_key_answers_429_with_retry_after():
    """A key past its publish rate gets 429 with Retry-After; a batch over the burst is refused whole."""
    slow_key = KEYS.replace("publish_rate = 1000000", "publish_rate = 10").replace("publish_burst = 100000", "publish_burst = 20")
    with Server(slow_key) as limited:
        async with httpx.AsyncClient() as http:
            url = f"{limited.url}/api/publish"
            ok = await http.post(url, json=[{"topic": "r.a", "data": n} for n in range(20)], headers=AUTH)
            limited_response = await http.post(url, json={"topic": "r.a", "data": 0}, headers=AUTH)
            too_big = await http.post(url, json=[{"topic": "r.a", "data": n} for n in range(21)], headers=AUTH)
            refused = metric_now(limited, 'stream_publish_refused_total{reason="rate_limited"}')
    assert ok.status_code == 202
    assert refused == 2, "both refusals are counted, the batch over the burst too"
    assert limited_response.status_code == 429 and limited_response.json()["error"]["code"] == "rate_limited"
    assert int(limited_response.headers["Retry-After"]) >= 1
    assert too_big.status_code == 429 and "burst" in too_big.json()["error"]["message"]


async def test_events_refuses_more_patterns_than_a_connection_may_hold(server, client):
    """/api/events caps patterns like /ws and /sse do, so one request cannot stall the hub."""
    response = await client.get(f"{server.url}/api/events", params={"topics": ",".join(f"p{n}" for n in range(101))})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_subscriptions"


async def test_topic_listing_hides_what_the_caller_may_not_read():
    """With public = [], /api/topics lists only what the caller's key may subscribe to."""
    with Server(KEYS + '\n[server]\npublic = ["open.>"]\n') as private:
        async with httpx.AsyncClient() as http:
            await publish(http, private, [{"topic": "open.a", "data": 1}, {"topic": "secret.b", "data": 2}])
            anonymous = [t["topic"] for t in (await http.get(f"{private.url}/api/topics")).json()]
            keyed = [t["topic"] for t in (await http.get(f"{private.url}/api/topics", headers=AUTH)).json()]
            hidden = await http.get(f"{private.url}/api/topics/secret.b")
    assert anonymous == ["open.a"] and keyed == ["open.a", "secret.b"]
    assert hidden.status_code == 401


async def test_publish_from_a_browser_origin_takes_the_full_path_with_cors(server, client):
    """Requests with an Origin skip the publish shortcut, so CORS headers are there; same answer."""
    response = await client.post(
        f"{server.url}/api/publish", json={"topic": "cors.a", "data": 1}, headers={**AUTH, "Origin": "https://app.example"}
    )
    assert response.status_code == 202 and len(response.json()["ids"]) == 1
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
