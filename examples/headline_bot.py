"""A headline bot: react to every headline about the symbols you trade, never missing one silently.

    python examples/headline_bot.py                       # AAPL and NVDA on a local `stream serve`
    python examples/headline_bot.py --symbols TSLA,MSFT --url http://stream.internal:8000

It resumes from the last headline it saw after any disconnect; if the server could not replay
everything (it restarted, or history was too short) it says so and catches up from /api/news.
"""

from __future__ import annotations

import argparse
import asyncio

import httpx

from stream.client import Gap, Subscriber


async def catch_up(url: str, symbols: list[str]) -> None:
    """After a gap: read the latest headlines over HTTP, so nothing important was missed."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/api/news", params={"symbols": ",".join(symbols), "limit": 20})
    for event in reversed(response.json()["headlines"]):
        print(f"  (catch-up) {event['data']['title']}")


async def main(url: str, symbols: list[str]) -> None:
    async with Subscriber(url, ["news.>"], symbols=symbols) as headlines:
        print(f"watching headlines about {', '.join(symbols)} on {url}")
        async for item in headlines:
            if isinstance(item, Gap):
                print(f"! events may be missing ({item.reason}); catching up")
                await catch_up(url, symbols)
                continue
            headline = item.data
            mentioned = ", ".join(s for s in headline.get("symbols", []) if s in symbols) or "-"
            print(f"[{mentioned}] {headline.get('title')} ({headline.get('source')})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--symbols", default="AAPL,NVDA")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.url, [s.strip().upper() for s in args.symbols.split(",") if s.strip()]))
    except KeyboardInterrupt:
        pass
