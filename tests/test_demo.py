"""`stream serve` with no arguments: the built-in demo market, polled over HTTP, live at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
from httpx_sse import aconnect_sse

from .support import Server, SSEReader, wait_until


async def test_stream_serve_with_no_config_shows_quotes_and_headlines():
    """/api/news, /api/topics and /sse?topics=> all show demo data soon after start. How soon is
    printed, not asserted: a loaded CI machine may be slow, and tests make no timing claims."""
    server = Server(None)
    started = time.monotonic()
    with server.start():
        async with httpx.AsyncClient(timeout=10) as http:
            news, topics = [], []
            wanted = {"quotes.AAPL", "quotes.BTC-USD", "news.newswire", "news.markets"}
            while time.monotonic() - started < 30 and not (news and wanted <= set(topics)):
                news = (await http.get(f"{server.url}/api/news?limit=5")).json()["headlines"]
                topics = [t["topic"] for t in (await http.get(f"{server.url}/api/topics")).json()]
                await asyncio.sleep(0.1)
            ready_in = time.monotonic() - started
            async with aconnect_sse(http, "GET", f"{server.url}/sse?topics=>") as source:
                live = await SSEReader(source).take(3, timeout=5)
            providers = (await http.get(f"{server.url}/api/providers")).json()
            filtered = (await http.get(f"{server.url}/api/news", params={"symbols": "AAPL,MSFT,NVDA,TSLA"})).json()["headlines"]
            quote = (await http.get(f"{server.url}/api/topics/quotes.AAPL")).json()
            article = await http.get(news[0]["data"]["url"])
    print(f"\ndemo data visible {ready_in:.2f} s after starting the process")
    headline = news[0]["data"]
    assert headline["title"] and headline["symbols"] and headline["provider"].startswith("demo-")
    assert wanted <= set(topics)
    assert all(orjson.loads(event.data)["topic"] for event in live)
    assert {p["name"]: (p["kind"], p["state"]) for p in providers} == {
        "demo-quotes": ("websocket", "connected"),
        "demo-newswire": ("sse", "connected"),
        "demo-markets": ("websocket", "connected"),
    }
    assert all({"AAPL", "MSFT", "NVDA", "TSLA"} & set(h["data"]["symbols"]) for h in filtered)
    assert quote["data"]["symbol"] == "AAPL" and quote["data"]["price"] > 0
    assert article.status_code == 200 and headline["title"].split(" ")[0] in article.text


async def test_providers_endpoint_and_metrics_report_failures_of_a_real_upstream():
    """A provider pointing at a dead port shows backoff in /api/providers and in /metrics."""
    toml = """
[[providers]]
name = "dead"
kind = "json"
url = "http://127.0.0.1:9/nothing"
interval = 1
"""
    with Server(toml) as server:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 5
            status = {}
            while time.monotonic() < deadline and status.get("state") != "backoff":
                [status] = (await http.get(f"{server.url}/api/providers")).json()
                await asyncio.sleep(0.1)
            metrics = (await http.get(f"{server.url}/metrics")).text
            system = (await http.get(f"{server.url}/api/topics/_system.providers")).json()
    assert status["state"] == "backoff" and status["last_error"].startswith("connect:")
    assert 'stream_provider_polls_total{outcome="connect",provider="dead"}' in metrics
    assert 'stream_provider_state{provider="dead",state="backoff"} 1.0' in metrics
    assert "stream_provider_poll_seconds_bucket" in metrics
    assert system["data"]["name"] == "dead" and system["data"]["state"] == "backoff"
    assert "provider dead: connect: cannot connect" in server.output()


async def test_news_applies_read_rights_before_the_limit():
    """A caller who may read only news.markets still gets a full page of news.markets headlines."""
    from importlib import resources

    toml = resources.files("stream").joinpath("default.toml").read_text().replace(
        'port = 8000', 'port = 8000\npublic = ["quotes.>", "news.markets"]'
    )
    with Server(toml) as server:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 10
            news = []
            while time.monotonic() < deadline and len(news) < 5:
                news = (await http.get(f"{server.url}/api/news?limit=5")).json()["headlines"]
                await asyncio.sleep(0.2)
    assert len(news) == 5 and {event["topic"] for event in news} == {"news.markets"}


def test_demo_push_streams_end_with_a_retry_hint_at_shutdown():
    """A client on /demo/stream does not hold up a SIGTERM: its stream ends with a `retry:` hint
    and the server exits promptly, without cancelling tasks past the graceful timeout."""
    import threading

    server = Server(None).start()
    received: list[str] = []

    def read() -> None:
        with httpx.stream("GET", f"{server.url}/demo/stream", timeout=10) as response:
            for line in response.iter_lines():
                received.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("event: newswire") for line in received), 10)
    finally:
        took = server.stop()
    reader.join(5)
    assert "retry: 1000" in received and took < 5, (took, received[-3:])
    assert "graceful shutdown exceeded" not in server.output()
