"""``demo``: a built-in offline market, served by the app at ``/demo/…`` and polled over HTTP
like any other upstream, so ``stream serve`` shows live data with no internet and no keys.

``DemoMarket`` is a small simulation advanced by the time passed in (random-walk quotes every
second, a headline every few seconds on two wires); ``parse_demo`` picks the parser for each
demo document. Both are pure apart from the random generator they own.
"""

from __future__ import annotations

import dataclasses
import math
import random
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from xml.sax.saxutils import escape

import orjson

from ..provider_settings import ProviderSettings
from .base import Parsed
from .feed import parse_feed
from .json import parse_json
from .snapshot import parse_snapshot

__all__ = ["DemoMarket", "parse_demo"]

COMPANIES = {
    "AAPL": ("Apple", 228.0, 0.0012),
    "MSFT": ("Microsoft", 415.0, 0.0010),
    "NVDA": ("Nvidia", 135.0, 0.0022),
    "TSLA": ("Tesla", 250.0, 0.0025),
    "AMZN": ("Amazon", 190.0, 0.0013),
    "GOOGL": ("Alphabet", 170.0, 0.0012),
    "META": ("Meta", 560.0, 0.0016),
    "BTC-USD": ("Bitcoin", 68_000.0, 0.0030),
}
WIRES = {
    "newswire": "Demo Newswire",
    "markets": "Demo Markets API",
}
# The markets wire reports price moves, each with a reason that fits its direction; the
# newswire reports company news without prices. So the two never tell the same story, and no
# story contradicts the quote next to it.
UP_REASONS = [
    "analysts raise their price targets",
    "quarterly revenue beats estimates",
    "a new product launch draws crowds",
    "supply-chain worries ease",
    "a large fund discloses a new stake",
]
DOWN_REASONS = [
    "analysts cut their price targets",
    "guidance for next quarter disappoints",
    "regulators open an inquiry",
    "a product recall widens",
    "supply-chain worries return",
]
CRYPTO_UP_REASONS = ["spot ETF inflows pick up", "a large fund discloses a new stake", "a payments app adds support"]
CRYPTO_DOWN_REASONS = ["an exchange pauses withdrawals", "regulators open an inquiry", "leveraged positions unwind"]
FLAT = 0.001  # a move smaller than this since the open is "flat", not a rise or a slide
_TOPICS = ["cloud computing", "chips", "autonomous driving", "payments", "advertising", "energy storage"]
_FILINGS = ["a leadership change", "a share buyback", "a new credit facility", "an acquisition agreement"]
HISTORY = 40  # headlines kept per wire


@dataclasses.dataclass
class _Quote:
    symbol: str
    name: str
    price: float
    open: float
    volatility: float


class DemoMarket:
    def __init__(self, now: float, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        # Ids carry the run, so a restarted demo never reuses an id for a different headline.
        self.run = f"{self.rng.getrandbits(24):06x}"
        # The market opened a minute ago, so a first look already has a minute of headlines.
        self.quotes_at = math.floor(now) - 60
        self.book = {symbol: _Quote(symbol, name, price, price, vol) for symbol, (name, price, vol) in COMPANIES.items()}
        self.headlines: dict[str, list[dict[str, Any]]] = {wire: [] for wire in WIRES}
        self.counters = {wire: 0 for wire in WIRES}
        self.next_at = {wire: self.quotes_at + self.rng.uniform(0, 4) for wire in WIRES}
        self.advance(now)

    # -- simulation -----------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Walk the quotes second by second up to ``now``, writing each headline when it is due,
        so every story is told at the price of its moment."""
        target = math.floor(now)
        self.quotes_at = max(self.quotes_at, target - 3600)  # after a long pause, only the last hour
        while self.quotes_at < target:
            self.quotes_at += 1
            for quote in self.book.values():
                quote.price *= math.exp(self.rng.gauss(0, quote.volatility))
            self._news_until(self.quotes_at)
        self._news_until(now)

    def _news_until(self, moment: float) -> None:
        for wire in WIRES:
            while self.next_at[wire] <= moment:
                self._headline(wire, self.next_at[wire])
                self.next_at[wire] += self.rng.uniform(2.0, 6.0)

    def _headline(self, wire: str, at: float) -> None:
        self.counters[wire] += 1
        number = self.counters[wire]
        story = self._market_story if wire == "markets" else self._company_story
        recent = {item["title"] for item in self.headlines[wire][:10]}
        title, symbols = story()
        for _ in range(5):  # a wire does not repeat itself word for word
            if title not in recent:
                break
            title, symbols = story()
        item = {
            "id": f"{wire}-{self.run}-{number}",
            "title": title,
            "path": f"/demo/news/{wire}-{self.run}-{number}",
            "published": datetime.fromtimestamp(at, UTC),
            "summary": f"{title}. This is synthetic demo news generated by stream; it is not real.",
            "symbols": symbols,
        }
        history = self.headlines[wire]
        history.insert(0, item)
        del history[HISTORY:]

    def _market_story(self) -> tuple[str, list[str]]:
        """A price move since the open, with a reason in the same direction."""
        symbol = self.rng.choice(sorted(self.book))
        quote = self.book[symbol]
        move = quote.price / quote.open - 1
        crypto = symbol == "BTC-USD"
        price = f"${quote.price:,.0f}" if crypto else f"${quote.price:,.2f}"
        name = quote.name if crypto else f"{quote.name} ({symbol})"
        if abs(move) < FLAT:
            return f"{name} trades flat near {price} as investors wait for direction", [symbol]
        if move > 0:
            verb = "climbs" if move > 0.004 else "rises"
            reason = self.rng.choice(CRYPTO_UP_REASONS if crypto else UP_REASONS)
        else:
            verb = "slides" if move < -0.004 else "dips"
            reason = self.rng.choice(CRYPTO_DOWN_REASONS if crypto else DOWN_REASONS)
        return f"{name} {verb} {abs(move) * 100:.1f}% to {price} as {reason}", [symbol]

    def _company_story(self) -> tuple[str, list[str]]:
        """Company news with no price in it: partnerships, filings, launches."""
        companies = sorted(s for s in self.book if s != "BTC-USD")
        symbol = self.rng.choice(companies)
        quote = self.book[symbol]
        kind = self.rng.random()
        if kind < 0.45:
            other = self.rng.choice([s for s in companies if s != symbol])
            first, second = sorted((symbol, other))
            title = f"{self.book[first].name} and {self.book[second].name} announce a partnership on {self.rng.choice(_TOPICS)}"
            return title, [first, second]
        if kind < 0.75:
            return f"{quote.name} files an 8-K on {self.rng.choice(_FILINGS)}", [symbol]
        return f"{quote.name} unveils new {self.rng.choice(_TOPICS)} products at its developer day", [symbol]

    # -- documents ------------------------------------------------------------------------

    def quotes(self, now: float) -> bytes:
        return orjson.dumps(self.quote_values(now))

    def quote_values(self, now: float) -> dict[str, dict[str, Any]]:
        self.advance(now)
        return {
            q.symbol: {
                "symbol": q.symbol,
                "name": q.name,
                "price": round(q.price, 2),
                "open": round(q.open, 2),
                "change": round(q.price - q.open, 2),
                "change_pct": round((q.price / q.open - 1) * 100, 3),
                "symbols": [q.symbol],
            }
            for q in self.book.values()
        }

    # -- pushed (/demo/stream, /demo/ws) ----------------------------------------------------

    def next_due(self) -> float:
        """When the market next changes: its next headline, or its next quote step."""
        return min(min(self.next_at.values()), self.quotes_at + 1)

    def numbers(self) -> dict[str, int]:
        """Per wire, the number of its latest headline: where a push stream stands."""
        return dict(self.counters)

    def pushed_since(self, after: dict[str, int], now: float, base_url: str) -> list[dict[str, Any]]:
        """The headlines written after ``after`` (per wire, a headline number), oldest first, as
        push messages: ``{"type": "headline", "wire": …, "id", "title", "url", "published", …}``."""
        self.advance(now)
        messages = []
        for wire, history in self.headlines.items():
            for item in reversed(history):
                if int(item["id"].rsplit("-", 1)[1]) > after.get(wire, 0):
                    messages.append(
                        {
                            "type": "headline",
                            "wire": wire,
                            "id": item["id"],
                            "title": item["title"],
                            "url": base_url + item["path"],
                            "published": item["published"].isoformat().replace("+00:00", "Z"),
                            "summary": item["summary"],
                            "symbols": item["symbols"],
                            "source": WIRES[wire],
                        }
                    )
        messages.sort(key=lambda message: message["published"])
        return messages

    def latest_id(self, wire: str, now: float) -> str:
        self.advance(now)
        history = self.headlines[wire]
        return history[0]["id"] if history else "none"

    def rss(self, now: float, base_url: str) -> bytes:
        self.advance(now)
        items = []
        for item in self.headlines["newswire"]:
            categories = "".join(f"<category>{escape(s)}</category>" for s in item["symbols"])
            items.append(
                f'<item><guid isPermaLink="false">{escape(item["id"])}</guid>'
                f"<title>{escape(item['title'])}</title><link>{escape(base_url + item['path'])}</link>"
                f"<pubDate>{format_datetime(item['published'], usegmt=True)}</pubDate>"
                f"<description>{escape(item['summary'])}</description>{categories}</item>"
            )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
            f"<title>{WIRES['newswire']}</title><link>{escape(base_url)}/demo/news.rss</link>"
            "<description>Synthetic headlines from stream's offline demo market</description>"
            + "".join(items)
            + "</channel></rss>\n"
        ).encode()

    def json_feed(self, now: float, base_url: str) -> bytes:
        self.advance(now)
        return orjson.dumps(
            {
                "source": WIRES["markets"],
                "items": [
                    {
                        "id": item["id"],
                        "headline": item["title"],
                        "url": base_url + item["path"],
                        "publishedAt": item["published"].isoformat().replace("+00:00", "Z"),
                        "description": item["summary"],
                        "tickers": item["symbols"],
                    }
                    for item in self.headlines["markets"]
                ],
            }
        )

    def article(self, ident: str) -> dict[str, Any] | None:
        for history in self.headlines.values():
            for item in history:
                if item["id"] == ident:
                    return item
        return None


def parse_demo(body: bytes, provider: ProviderSettings, *, content_type: str | None, location: str | None) -> Parsed:
    """Parse a demo document with the parser its path calls for."""
    if provider.url == "/demo/quotes":
        return parse_snapshot(body, provider.model_copy(update={"split": provider.split or ""}))
    if provider.url == "/demo/news.rss":
        return parse_feed(body, provider, content_type=content_type, location=location, symbols_from_tags=True)
    return parse_json(
        body, provider.model_copy(update={"items": provider.items or "items", "source": provider.source or WIRES["markets"]})
    )
