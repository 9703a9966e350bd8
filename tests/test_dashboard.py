"""The dashboard (static/) in a real headless Chromium, driven by Playwright, against a real
server taking in the demo market: live data, the filter, the connection badge across a server
restart, no lost events, no console errors, usable at phone width, push providers' state and
freshness. Saves a screenshot. And, at 1400 px and at 390 × 844 (issue 20): providers stale while
the page is offline, provider health above the fold on a phone, one colour rule, each quote's
last change, the quote-row filter, the DEMO badge, and the footer's link to /docs."""

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


LAG = r"<?\d+(?:\.\d)? (?:ms|s|min|h|days)"
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "days": 86400.0}


def _seconds(text: str) -> float:
    """ "+35 ms" -> 0.035, "2.1 s" -> 2.1, "+<1 ms" -> 0.0005: a shown duration, back in seconds."""
    below, number, unit = re.fullmatch(r"\+?(<)?(\d+(?:\.\d)?) (ms|s|min|h|days)", text.strip()).groups()
    return float(number) * UNIT_SECONDS[unit] / (2 if below else 1)


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
            live = page.locator("#headlines li.fresh .delay", has_text=re.compile(r"^\+(<?\d+ ms|\d\.\d s)$")).first
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


# -- issue 20, item 4: the dashboard at 1400 px and on a phone (390 × 844) -------------------

WIDE = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
VIEWPORTS = [pytest.param(WIDE, id="1400px"), pytest.param(PHONE, id="390px")]
FLASHES = re.compile(r"\bflash-(up|down)\b")


@pytest.fixture(scope="module")
def demo_server():
    """One server with the built-in demo config (and a publish key) for the module's new tests."""
    with Server(demo_config()) as running:
        yield running


class Dashboard:
    """A browser page on the dashboard, collecting console errors and page errors."""

    def __init__(self, chromium: str, url: str, viewport: dict[str, int]) -> None:
        self.chromium, self.url, self.viewport = chromium, url, viewport
        self.errors: list[str] = []

    async def __aenter__(self):
        self.playwright = await async_playwright().start()
        self.browser = await self.playwright.chromium.launch(executable_path=self.chromium, args=CHROMIUM_ARGS)
        self.page = await self.browser.new_page(viewport=self.viewport)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        return self

    async def open(self) -> None:
        await self.page.goto(self.url + "/")
        await expect(self.page.locator("#connection")).to_have_text("live", timeout=20_000)

    async def __aexit__(self, *exc) -> None:
        await self.browser.close()
        await self.playwright.stop()


class SocketGate:
    """Routes the page's WebSocket through Playwright to the server, and can cut it and refuse
    the page's reconnects: the page is offline while its server stays up."""

    def __init__(self) -> None:
        self.blocked = False
        self.open: list = []

    async def attach(self, page) -> None:
        await page.route_web_socket(lambda url: url.split("?")[0].endswith("/ws"), self.handle)

    async def handle(self, route) -> None:
        if self.blocked:
            await route.close(code=4000, reason="blocked by the test")
            return
        self.open.append((route, route.connect_to_server()))

    async def block(self) -> None:
        self.blocked = True
        for route, upstream in self.open:
            await route.close(code=4000, reason="blocked by the test")
            await upstream.close()
        self.open.clear()

    def unblock(self) -> None:
        self.blocked = False


async def _publish_quote(http, server, symbol: str, price: float, change_pct: float) -> int:
    """Publishes one quote and returns the hub's accept time (ts, ms) of that event."""
    [event_id] = await publish(
        http, server, {"topic": f"quotes.{symbol}", "data": {"symbol": symbol, "name": "Test Co", "price": price, "change_pct": change_pct}}
    )
    latest = (await http.get(f"{server.url}/api/topics/quotes.{symbol}")).json()
    assert latest["id"] == event_id, latest
    return latest["ts"]


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_marks_provider_status_stale_while_its_socket_is_down(chromium, demo_server, viewport):
    """While the page's own WebSocket is cut (the server still up), every provider is dimmed and
    shown as stale, never "connected", and comes back live once the socket does."""
    gate = SocketGate()
    async with Dashboard(chromium, demo_server.url, viewport) as dash:
        page = dash.page
        await gate.attach(page)
        await dash.open()
        states = page.locator("#providers li .state")
        await expect(states).to_have_count(3, timeout=20_000)
        await expect(states).to_have_text(["connected"] * 3, timeout=20_000)

        await gate.block()
        await expect(page.locator("#connection")).to_have_attribute("data-state", re.compile("^(reconnecting|offline)$"))
        await expect(page.locator("#providers li.stale")).to_have_count(3)
        for state in await states.all():  # hidden in the phone's collapsed panel: read its text
            assert (await state.text_content()) == "stale"
            await expect(state).to_have_class(re.compile(r"\bstate-stale\b"))
            assert "not connected to the server" in (await state.get_attribute("title") or "")
        await expect(page.locator(".pbadge.state-stale")).to_have_count(3)
        await expect(page.locator("#providers-asof")).to_be_visible()
        await expect(page.locator("#providers-asof")).to_have_text(re.compile(r"^stale · as of \d\d:\d\d:\d\d$"))
        shown = ".providers-list" if viewport is WIDE else ".provider-badges"
        # Dimmed (after a 0.3 s transition).
        await page.wait_for_function(f"() => Number(getComputedStyle(document.querySelector('{shown}')).opacity) < 0.6", timeout=3_000)
        assert "connected" not in (await page.inner_text("section.providers")).lower()

        gate.unblock()
        await expect(page.locator("#connection")).to_have_text("live", timeout=15_000)
        await expect(states).to_have_text(["connected"] * 3)
        await expect(page.locator("#providers li.stale")).to_have_count(0)
        await expect(page.locator("#providers-asof")).to_be_hidden()
    assert [e for e in dash.errors if not any(noise in e for noise in OUTAGE_NOISE)] == []


async def test_dashboard_on_a_phone_shows_provider_health_above_the_fold(chromium, demo_server):
    """At 390 × 844, provider health is one line of badges within the first 844 px, which
    opens the full provider list and closes it again; at 1400 px the full list shows as before."""
    async with Dashboard(chromium, demo_server.url, PHONE) as dash:
        page = dash.page
        await dash.open()
        await expect(page.locator("#headlines li").first).to_be_visible(timeout=20_000)
        await expect(page.locator("#quotes tbody tr")).to_have_count(8, timeout=20_000)
        toggle = page.locator("#providers-toggle")
        badges = page.locator("#provider-badges .pbadge")
        await expect(badges).to_have_count(3)
        await expect(badges).to_have_class([re.compile(r"\bstate-connected\b")] * 3, timeout=20_000)
        assert await page.evaluate("scrollY") == 0
        box = await toggle.bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 844, box
        panel = await page.locator("section.providers").bounding_box()
        assert panel["y"] + panel["height"] <= 844, panel
        # One line: every badge on the same row, the button no taller than two badges.
        # Measured in one evaluation: a status update re-renders the badges, which detaches
        # element handles taken one by one between two reads.
        rects = await badges.evaluate_all("els => els.map(e => e.getBoundingClientRect()).map(r => [r.top, r.height])")
        tops = {round(top) for top, _ in rects}
        assert len(tops) == 1, tops
        assert box["height"] < 2 * rects[0][1] + 12, box
        for name in ("demo-quotes", "demo-newswire", "demo-markets"):
            await expect(page.locator(f".pbadge[data-name='{name}']")).to_have_attribute("title", re.compile(f"^{name}: connected"))
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390

        # Expandable: the whole panel, then back to one line.
        await expect(page.locator("#providers")).to_be_hidden()
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-expanded", "true")
        await expect(page.locator("#providers li")).to_have_count(3)
        for item in await page.locator("#providers li").all():
            await expect(item).to_be_visible()
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-expanded", "false")
        await expect(page.locator("#providers")).to_be_hidden()

        await page.set_viewport_size(WIDE)
        await expect(toggle).to_be_hidden()
        await expect(page.locator("#providers li").first).to_be_visible()
    assert dash.errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_colours_flash_by_tick_sparkline_by_trend_change_by_day(chromium, demo_server, viewport):
    """One colour rule: a price's flash is its last tick's direction and is gone within 1 s,
    the sparkline follows its own first-to-last direction, the change cell the day's sign."""
    symbol = f"ZC{viewport['width']}"
    async with Dashboard(chromium, demo_server.url, viewport) as dash, httpx.AsyncClient() as http:
        page = dash.page
        await dash.open()
        row = page.locator(f"#quotes tbody tr[data-symbol='{symbol}']")
        cell, change, spark = row.locator(".price"), row.locator(".change"), row.locator("svg.spark")
        await _publish_quote(http, demo_server, symbol, 100.0, -4.94)
        await expect(row).to_have_count(1, timeout=10_000)
        await expect(cell).not_to_have_class(FLASHES)  # a first price is no tick
        await page.evaluate(
            """(symbol) => {
              const cell = document.querySelector(`#quotes tr[data-symbol="${symbol}"] .price`);
              window.flashes = [];
              new MutationObserver(() => {
                const flash = ["flash-up", "flash-down"].find((name) => cell.classList.contains(name)) || null;
                const last = window.flashes.at(-1);
                if (!last || last.flash !== flash)
                  window.flashes.push({ flash, at: performance.now(), duration: getComputedStyle(cell).animationDuration });
              }).observe(cell, { attributes: true, attributeFilter: ["class"] });
            }""",
            symbol,
        )
        # (price, day's change %): expected flash, sparkline (from 100.0) and change colour.
        steps = [
            (101.0, -3.98, "up", "up", "down"),  # the bug: a green flash beside a red day, and a rising line
            (100.5, -4.46, "down", "up", "down"),  # a tick down, the line still up from where it began
            (99.0, 0.5, "down", "down", "up"),  # below where the line began, the day up
        ]
        for price, day, tick, trend, colour in steps:
            await page.evaluate("window.flashes = []")
            await _publish_quote(http, demo_server, symbol, price, day)
            await page.wait_for_function("() => window.flashes.length >= 2 && window.flashes.at(-1).flash === null", timeout=5_000)
            flashes = await page.evaluate("window.flashes")
            assert [f["flash"] for f in flashes] == [f"flash-{tick}", None], flashes
            assert flashes[1]["at"] - flashes[0]["at"] <= 1000, flashes
            assert float(flashes[0]["duration"].rstrip("s")) <= 1.0, flashes  # the fade itself
            await expect(cell.locator(".value")).to_have_text(f"{price:.2f}")
            await expect(spark).to_have_class(re.compile(rf"\bspark {trend}\b"))
            await expect(change).to_have_class(re.compile(rf"\b{colour}\b"))
            await expect(change).to_have_text(f"{'+' if day > 0 else ''}{day:.2f}%")

        # The demo's own rows follow the same rule: each line's colour is its own direction
        # (its first and last points; y grows downwards), each change cell its sign.
        rows = await page.evaluate(
            """() => [...document.querySelectorAll("#quotes tbody tr")].map((row) => {
              const line = row.querySelector("svg.spark polyline");
              const ys = line ? line.getAttribute("points").trim().split(" ").map((p) => Number(p.split(",")[1])) : [];
              const change = row.querySelector(".change");
              return { symbol: row.dataset.symbol, spark: row.querySelector("svg.spark").getAttribute("class"),
                       first: ys[0], last: ys.at(-1), change: change.textContent, cls: change.className };
            })"""
        )
        assert len(rows) >= 9, rows
        for r in rows:
            if r["first"] is not None and abs(r["first"] - r["last"]) >= 0.2:
                assert r["spark"] == f"spark {'up' if r['last'] < r['first'] else 'down'}", r
            sign = float(r["change"].rstrip("%"))
            expected = "up" if sign > 0 else "down" if sign < 0 else None
            assert (expected in r["cls"].split()) if expected else not {"up", "down"} & set(r["cls"].split()), r
    assert dash.errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_quote_rows_show_when_they_last_changed(chromium, demo_server, viewport):
    """Each quote row shows when its price last changed (the hub's time of that event, not of a
    later unchanged one), as a relative time that keeps counting with no new data."""
    symbol = f"ZT{viewport['width']}"
    async with Dashboard(chromium, demo_server.url, viewport) as dash, httpx.AsyncClient() as http:
        page = dash.page
        await page.clock.install()
        await dash.open()
        await expect(page.locator("#quotes tbody tr").first).to_be_visible(timeout=20_000)
        for item in await page.locator("#quotes tbody tr .changed").all():
            await expect(item).to_have_text(re.compile(r"^(just now|\d+ s ago)$"))
        changed = page.locator(f"#quotes tbody tr[data-symbol='{symbol}'] .changed")
        await _publish_quote(http, demo_server, symbol, 50.0, 1.0)
        ts = await _publish_quote(http, demo_server, symbol, 51.0, 3.0)
        await expect(changed).to_have_text("just now", timeout=10_000)
        await expect(changed).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))
        assert await changed.evaluate(f"(t) => Date.parse(t.dateTime) === {ts}"), await changed.get_attribute("datetime")
        assert re.fullmatch(r"Last changed at \d\d:\d\d:\d\d", await changed.get_attribute("title") or "")
        # The same price again (a new day's change only): not a change of price.
        await _publish_quote(http, demo_server, symbol, 51.0, 3.5)
        await expect(page.locator(f"#quotes tbody tr[data-symbol='{symbol}'] .change")).to_have_text("+3.50%")
        assert await changed.evaluate(f"(t) => Date.parse(t.dateTime) === {ts}")
        # Kept fresh: half a minute later by the page's clock, with nothing new published.
        await page.clock.fast_forward("00:30")
        await expect(changed).to_have_text(re.compile(r"^(3\d) s ago$"), timeout=5_000)
    assert dash.errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_picking_a_quote_row_filters_the_headlines(chromium, demo_server, viewport):
    """Clicking a symbol in the quotes table puts it in the filter box, leaves only that symbol's
    headlines, marks the row; clicking it again shows every headline."""
    async with Dashboard(chromium, demo_server.url, viewport) as dash:
        page = dash.page
        await dash.open()
        await expect(page.locator("#headlines .chip").first).to_be_visible(timeout=20_000)
        symbol = (await page.locator("#headlines .chip").first.inner_text()).strip()
        row = page.locator(f"#quotes tbody tr[data-symbol='{symbol}']")
        await expect(row).to_have_count(1, timeout=10_000)
        total = await page.locator("#headlines li").count()

        await row.locator("button.pick").click()
        await expect(page.locator("#filter")).to_have_value(symbol)
        await expect(row).to_have_class(re.compile(r"\bpicked\b"))
        await expect(row.locator("button.pick")).to_have_attribute("aria-pressed", "true")
        await expect(page.locator("#headline-count")).to_contain_text(f"“{symbol}”")
        visible = page.locator("#headlines li:visible")
        assert 1 <= await visible.count() < total
        for item in await visible.all():
            chips = [c.strip() for c in await item.locator(".chip").all_inner_texts()]
            assert symbol in chips or symbol.lower() in (await item.inner_text()).lower(), chips
        assert await page.locator("#quotes tbody tr.picked").count() == 1

        # Anywhere on the row does it too; the same symbol again clears the filter.
        await row.locator(".change").click()
        await expect(page.locator("#filter")).to_have_value("")
        await expect(row).not_to_have_class(re.compile(r"\bpicked\b"))
        await expect(page.locator("#headline-count")).to_have_text("")
        assert await page.locator("#headlines li:visible").count() >= total
    assert dash.errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_shows_a_demo_badge_with_the_built_in_config(chromium, demo_server, viewport):
    """With the built-in demo providers, the header carries a DEMO badge whose title says the
    data is synthetic, inside the page's width and the first screen."""
    async with Dashboard(chromium, demo_server.url, viewport) as dash:
        page = dash.page
        await dash.open()
        badge = page.locator("header #demo")
        await expect(badge).to_be_visible(timeout=10_000)
        await expect(badge).to_have_text("DEMO")
        assert "synthetic" in (await badge.get_attribute("title") or "")
        box = await badge.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] and box["y"] + box["height"] <= viewport["height"], box
        await expect(page.locator("#demo-note")).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert dash.errors == []


@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_dashboard_has_no_demo_badge_without_demo_providers(chromium, viewport):
    """With providers and data that are not the demo's, there is no DEMO badge (nor the footer's
    demo note) until a headline from a demo- provider arrives."""
    dead = f"""
[[providers]]
name = "wire-feed"
kind = "websocket"
url = "ws://127.0.0.1:{free_port()}/"
topic = "news.wire"
reconnect_min = 0.2
reconnect_max = 0.5
"""
    with Server(dead + KEYS) as server:
        async with Dashboard(chromium, server.url, viewport) as dash, httpx.AsyncClient() as http:
            page = dash.page
            await dash.open()
            await _publish_quote(http, server, "REAL", 10.0, 0.1)
            await publish(http, server, {"topic": "news.wire", "data": {"id": "r1", "title": "Real headline", "provider": "wire-feed"}})
            await expect(page.locator("#providers li[data-name='wire-feed']")).to_have_count(1, timeout=10_000)
            await expect(page.locator("#headlines li", has_text="Real headline")).to_have_count(1, timeout=10_000)
            await expect(page.locator("#quotes tbody tr[data-symbol='REAL']")).to_have_count(1)
            await expect(page.locator("#demo")).to_be_hidden()
            await expect(page.locator("#demo-note")).to_be_hidden()

            await publish(http, server, {"topic": "news.wire", "data": {"id": "d1", "title": "Synthetic headline", "provider": "demo-test"}})
            await expect(page.locator("#demo")).to_be_visible(timeout=10_000)
    assert [e for e in dash.errors if "WebSocket connection to" not in e] == []


async def test_dashboard_footer_links_to_the_offline_api_docs(chromium, demo_server):
    """The footer's link goes to /docs, the API docs this server serves itself."""
    async with Dashboard(chromium, demo_server.url, WIDE) as dash:
        page = dash.page
        await dash.open()
        links = page.locator("footer a")
        await expect(links).to_have_count(1)
        assert await links.get_attribute("href") == "/docs"
        await links.click()
        await page.wait_for_selector(".opblock-summary-path", timeout=15_000)
        assert page.url.startswith(demo_server.url + "/docs")
    assert dash.errors == []
