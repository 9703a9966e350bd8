"""A headline bot: react to every headline about the symbols you trade, never missing one silently
and never acting on one twice.

    .venv/bin/python examples/headline_bot.py                     # AAPL and NVDA on a local `stream serve`
    .venv/bin/python examples/headline_bot.py --symbols TSLA,MSFT --url http://stream.internal:8000

It resumes from the last headline it saw after any disconnect; if the server could not replay
everything (it restarted, or history was too short) it says so and catches up from /api/news.
Every headline is handled once, by event id, whether it came live, from a replay or from the
catch-up; anything on `news.>` that is not a headline about its symbols is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import Any

import httpx

from stream.client import Gap, Subscriber

SEEN_IDS = 10_000  # headline ids remembered for dedup (a replay never reaches further back)


class HeadlineBot:
    """Decides what to act on. Pure: feed it events, it answers the line to act on, or None."""

    def __init__(self, symbols: list[str]) -> None:
        self.symbols = frozenset(symbols)
        self._seen: set[str] = set()
        self._order: deque[str] = deque()

    def handle(self, event_id: str, data: Any) -> str | None:
        if event_id in self._seen:
            return None  # already acted on: from the catch-up, a replay, or live
        self._remember(event_id)
        if not isinstance(data, dict) or not isinstance(data.get("title"), str):
            return None  # not a headline (any JSON value may be published on news.>)
        listed = data.get("symbols")
        mentioned = sorted(s for s in listed if isinstance(s, str) and s.upper() in self.symbols) if isinstance(listed, list) else []
        if not mentioned:
            return None  # the server passes headlines without symbols; they are not about ours
        source = data.get("source")
        return f"[{', '.join(mentioned)}] {data['title']}" + (f" — {source}" if isinstance(source, str) and source else "") + f"  ({event_id})"

    def _remember(self, event_id: str) -> None:
        self._seen.add(event_id)
        self._order.append(event_id)
        if len(self._order) > SEEN_IDS:
            self._seen.discard(self._order.popleft())


async def catch_up(url: str, bot: HeadlineBot) -> None:
    """After a gap: read the latest headlines over HTTP, so nothing important was missed."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/api/news", params={"symbols": ",".join(sorted(bot.symbols)), "limit": 20})
    for event in reversed(response.json()["headlines"]):
        line = bot.handle(event["id"], event["data"])
        if line is not None:
            print(f"{line} (catch-up)", flush=True)


async def main(url: str, symbols: list[str]) -> None:
    bot = HeadlineBot(symbols)
    async with Subscriber(url, ["news.>"], symbols=symbols) as headlines:
        print(f"watching headlines about {', '.join(symbols)} on {url}", flush=True)
        async for item in headlines:
            if isinstance(item, Gap):
                print(f"! events may be missing ({item.reason}); catching up", flush=True)
                await catch_up(url, bot)
                continue
            line = bot.handle(item.id, item.data)
            if line is not None:
                print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--symbols", default="AAPL,NVDA")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.url, [s.strip().upper() for s in args.symbols.split(",") if s.strip()]))
    except KeyboardInterrupt:
        pass
