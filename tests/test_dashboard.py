"""The dashboard (static/) in a real headless Chromium, driven by Playwright, against a real
server taking in the demo market: live data, the filter, the connection badge across a server
restart, no lost events, no console errors, usable at phone width, push providers' state and
freshness. Saves a screenshot."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from importlib import resources
from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright, expect

from .support import KEYS, Server, free_port, publish

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# While the server is deliberately down, the browser itself logs each refused reconnect.
OUTAGE_NOISE = ("ERR_CONNECTION_REFUSED", "WebSocket connection to", "Failed to load resource")


def demo_config() -> str:
    return resources.files("stream").joinpath("default.toml").read_text() + KEYS


async def wait_until(check, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_dashboard_live_filter_reconnect_and_resume(chromium):
    """Headlines and quotes appear; filter works; badge follows a restart; events published
    while the page was away appear; no console errors; screenshots saved."""
    ARTIFACTS.mkdir(exist_ok=True)
    server = Server(demo_config()).start()
    console: list[tuple[float, str, str]] = []
    errors: list[str] = []
    outage: tuple[float, float] = (0.0, 0.0)
    try:
        async with async_playwright() as playwright, httpx.AsyncClient() as http:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append((time.monotonic(), m.type, m.text)))
            page.on("pageerror", lambda e: errors.append(str(e)))

            await page.goto(server.url + "/")
            await wait_until(lambda: _has(page, "#headlines li"), 20, "headlines")
            await wait_until(lambda: _has(page, "#quotes tbody tr"), 20, "quotes")
            await wait_until(lambda: _text_is(page, "#connection", "live"), 20, "live badge")
            assert await page.locator("#quotes tbody tr .price").first.inner_text()
            assert await page.locator("#providers li").count() == 3

            # The filter: a symbol chip's text narrows the list to that symbol.
            symbol = (await page.locator("#headlines .chip").first.inner_text()).strip()
            await page.fill("#filter", symbol)
            visible = page.locator("#headlines li:visible")
            assert await visible.count() >= 1
            for item in await visible.all():
                chips = [c.strip() for c in await item.locator(".chip").all_inner_texts()]
                text = await item.inner_text()
                assert symbol in chips or symbol.lower() in text.lower()
            assert symbol in await page.inner_text("#headline-count")
            await page.click("#clear-filter")

            # Provider status follows the data: demo-quotes, pushed every second, never looks seconds old.
            started = time.monotonic()
            while time.monotonic() - started < 6:
                age = await page.evaluate(
                    "(Date.now() - Date.parse(document.querySelector('#providers li[data-name=\"demo-quotes\"]').dataset.lastOk)) / 1000"
                )
                assert age < 4, f"demo-quotes shown as last polled {age:.1f} s ago"
                await asyncio.sleep(0.5)
            # A push provider is shown as a connection, never in a poller's words.
            pushed = page.locator("#providers li[data-name='demo-quotes']")
            await expect(pushed.locator(".state")).to_have_text("connected")
            assert "poll" not in (await pushed.inner_text()).lower()
            await expect(page.locator("#providers li[data-name='demo-newswire'] .provider-lag")).to_contain_text("after publication")
            assert await page.input_value("#filter") == ""
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"))

            # Stop the server: the badge must say so.
            outage_start = time.monotonic()
            server.stop()
            await wait_until(lambda: _state_in(page, ("reconnecting", "offline")), 10, "badge to leave live")
            # The quotes are no longer live: dimmed, and saying as of when.
            assert "stale" in (await page.get_attribute("section.quotes", "class") or "")
            assert float(await page.evaluate("getComputedStyle(document.querySelector('#quotes')).opacity")) < 0.6
            asof = await page.inner_text("#quotes-asof")
            assert re.fullmatch(r"as of \d\d:\d\d:\d\d", asof.strip()), asof
            await page.screenshot(path=str(ARTIFACTS / "dashboard-offline.png"))

            # Start it again on the same port and publish at once, before the page is back.
            restarted = Server(demo_config())
            restarted.port, restarted.url, restarted.ws_url = server.port, server.url, server.ws_url
            server = restarted.start()
            titles = [f"Outage headline {n} {time.time_ns()}" for n in range(3)]
            await publish(http, server, [{"topic": "news.test", "data": {"id": t, "title": t, "source": "test"}} for t in titles])
            outage = (outage_start, time.monotonic())
            await wait_until(lambda: _text_is(page, "#connection", "live"), 20, "badge back to live")
            for title in titles:
                await wait_until(lambda title=title: _has(page, f"#headlines li:has-text('{title}')"), 10, title)
            # Published without a `published` time: no arrival delay to show.
            await expect(page.locator(f"#headlines li:has-text('{titles[0]}') .delay")).to_have_count(0)
            assert "stale" not in (await page.get_attribute("section.quotes", "class") or "")
            assert await page.is_hidden("#quotes-asof")

            # Phone width: no horizontal scrolling, everything still there.
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.wait_for_function("document.documentElement.clientWidth === 390")
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            # One scroll, the page's: the list is not a box of its own, its last item is whole.
            assert await page.evaluate("(l => l.scrollHeight <= l.clientHeight + 1)(document.getElementById('headlines'))")
            last = await page.evaluate(
                "(i => { const r = i.getBoundingClientRect(); return [r.bottom + scrollY, document.documentElement.scrollHeight, r.height]; })"
                "(document.querySelector('#headlines li:last-child'))"
            )
            assert last[2] > 0 and last[0] <= last[1], last
            await page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)

            # Accessibility basics: live regions and keyboard reach.
            assert await page.get_attribute("#headlines", "aria-live") == "polite"
            assert await page.get_attribute("#connection", "role") == "status"
            await page.click("h1")  # start keyboard navigation from the top of the page
            reached = set()
            for _ in range(40):
                await page.keyboard.press("Tab")
                reached.add(await page.evaluate("document.activeElement.id || document.activeElement.className"))
            assert {"filter", "clear-filter", "headline-title", "chip"} <= reached, reached
            await browser.close()
    finally:
        server.stop()

    unexpected = [
        text
        for at, kind, text in console
        if kind == "error" and not (outage[0] <= at <= outage[1] + 20 and any(noise in text for noise in OUTAGE_NOISE))
    ]
    assert errors == [], errors
    assert unexpected == [], unexpected


async def test_dashboard_with_a_token_when_topics_are_not_public(chromium):
    """With public = [], the page opened as /#token=KEY shows live data; without it, nothing."""
    from .support import PUBLISH_KEY

    config = demo_config().replace("[server]", "[server]\npublic = []", 1)
    assert "public = []" in config
    with Server(config) as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(f"{server.url}/#token={PUBLISH_KEY}")
            await wait_until(lambda: _has(page, "#headlines li"), 10, "headlines")
            await wait_until(lambda: _has(page, "#quotes tbody tr"), 10, "quotes")
            await wait_until(lambda: _text_is(page, "#connection", "live"), 10, "live badge")

            anonymous = await browser.new_page()
            await anonymous.goto(f"{server.url}/")
            # Refused (the topics need a key): the badge says so, and no quotes come.
            await wait_until(lambda: _state_in(anonymous, ("refused",)), 10, "the refusal")
            assert await anonymous.inner_text("#connection") == "needs a key"
            assert "key" in (await anonymous.get_attribute("#connection", "title") or "")
            assert await anonymous.locator("#quotes tbody tr").count() == 0
            await browser.close()
        assert PUBLISH_KEY not in server.output()


LAG = r"\d+(?:\.\d)? (?:ms|s|min|h|days)"
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "days": 86400.0}


def _seconds(text: str) -> float:
    """ "+35 ms" -> 0.035, "2.1 s" -> 2.1: a shown duration, back in seconds."""
    number, unit = re.fullmatch(r"\+?(\d+(?:\.\d)?) (ms|s|min|h|days)", text.strip()).groups()
    return float(number) * UNIT_SECONDS[unit]


def _time_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_dashboard_shows_a_push_provider_that_cannot_connect_as_failing(chromium):
    """A push provider whose upstream refuses is shown reconnecting, then failing, with its last
    error and next attempt, and never as ok or in a poller's words."""
    refused = f"""
[[providers]]
name = "dead-push"
kind = "websocket"
url = "ws://127.0.0.1:{free_port()}/"
topic = "news.dead"
reconnect_min = 0.2
reconnect_max = 0.5
"""
    errors: list[str] = []
    with Server(refused + KEYS) as server:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.url + "/")
            item = page.locator("#providers li[data-name='dead-push']")
            await expect(item.locator(".state")).to_have_text(re.compile(r"^(connecting|reconnecting|failing)$"), timeout=20_000)
            await expect(item.locator(".state")).to_have_text("failing", timeout=20_000)
            await expect(item.locator(".state")).to_have_class(re.compile(r"\bstate-failing\b"))
            await expect(item.locator(".provider-detail")).to_have_text(re.compile(r"^websocket · retrying, next attempt .+ · no message yet · 0 published$"))
            await expect(item.locator(".provider-error")).to_contain_text("cannot connect")
            text = (await item.inner_text()).lower()
            assert "poll" not in text and not re.search(r"\bok\b", text), text
            await browser.close()
    assert errors == [], errors


async def test_dashboard_shows_push_provider_state_lag_and_headline_delays(chromium):
    """With the built-in config, every push provider shows as connected (never in a poller's
    words) with a lag figure where its items carry a time, and each timed headline shows how long
    after its publication it arrived, matching the server's accept time minus `published`."""
    errors: list[str] = []
    with Server(None) as server:
        async with async_playwright() as playwright, httpx.AsyncClient() as http:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.url + "/")

            providers = page.locator("#providers li")
            await expect(providers).to_have_count(3, timeout=20_000)
            for item in await providers.all():
                await expect(item.locator(".state")).to_have_text("connected", timeout=20_000)
                await expect(item.locator(".state")).to_have_class(re.compile(r"\bstate-connected\b"))
                await expect(item.locator(".provider-detail")).to_have_text(re.compile(r"^(sse|websocket) · since \d\d:\d\d · \d+ published"))
                assert "poll" not in (await item.inner_text()).lower()
                assert "ok" not in (await item.locator(".state").inner_text()).lower()
            newswire = page.locator("#providers li[data-name='demo-newswire']")
            await expect(newswire.locator(".provider-lag")).to_have_text(
                re.compile(rf"^latest item arrived {LAG} after publication$"), timeout=20_000
            )
            assert "publication time" in (await newswire.locator(".provider-lag").get_attribute("title") or "")

            # Headlines that come live while the page is open arrive within seconds of publication.
            await expect(page.locator("#headlines li .delay").first).to_have_text(re.compile(rf"^\+{LAG}$"), timeout=20_000)
            live = page.locator("#headlines li.fresh .delay", has_text=re.compile(r"^\+(\d+ ms|\d\.\d s)$")).first
            await expect(live).to_be_visible(timeout=20_000)
            assert "after publication" in (await live.get_attribute("title") or "")

            # Every shown delay is the hub's accept time minus the item's own time, in human units.
            news = (await http.get(f"{server.url}/api/news?limit=20")).json()["headlines"]
            checked = 0
            for event in news:
                delay = page.locator(f"#headlines li:has(a[href='{event['data']['url']}']) .delay")
                if event["data"].get("published") is None or await delay.count() != 1:
                    continue
                expected = await page.evaluate(
                    "async ([ts, published]) => '+' + (await import('/js/format.js')).durationText(Math.max(0, ts - Date.parse(published)) / 1000)",
                    [event["ts"], event["data"]["published"]],
                )
                shown = await delay.inner_text()
                assert shown == expected, (shown, expected, event)
                lag = max(0.0, event["ts"] / 1000 - _time_of(event["data"]["published"]))
                assert abs(_seconds(shown) - lag) <= 0.002 + 0.26 * lag, (shown, lag)
                checked += 1
            assert checked >= 3, checked
            await browser.close()
    assert errors == [], errors


async def _has(page, selector: str) -> bool:
    return await page.locator(selector).count() > 0


async def _text_is(page, selector: str, text: str) -> bool:
    return (await page.inner_text(selector)).strip() == text


async def _state_in(page, states: tuple[str, ...]) -> bool:
    return await page.get_attribute("#connection", "data-state") in states


async def test_the_api_docs_render_offline_under_the_dashboards_security_headers(chromium):
    """/docs (Swagger UI) is served with the dashboard's headers (CSP self only, no framing,
    nosniff, no referrer) and its scripts from this server: in a browser it lists the API's
    operations, every request stays on this origin, and nothing breaks the policy."""
    with Server(KEYS) as server:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{server.url}/docs", follow_redirects=True)
        csp = answer.headers.get("content-security-policy", "")
        assert answer.status_code == 200
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert answer.headers.get("x-content-type-options") == "nosniff" and answer.headers.get("referrer-policy") == "no-referrer"
        requested: list[str] = []
        problems: list[str] = []
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{server.url}/docs")
            await page.wait_for_selector(".opblock-summary-path", timeout=15_000)
            paths = await page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.textContent)")
            await browser.close()
    assert "/api/publish" in "".join(paths), paths
    assert all(url.startswith(server.url) or url.startswith("data:") for url in requested), [u for u in requested if not u.startswith(server.url)]
    assert problems == [], problems
