"""``/demo/…``: the offline market (see providers/demo.py), polled at ``/demo/quotes``,
``/demo/news.rss`` and ``/demo/news.json``, and pushed at ``/demo/stream`` (SSE, here) and
``/demo/ws`` (WebSocket, served by transports/ws.py with ``demo_feed``).

A push stream starts with each wire's last ``REPLAY`` headlines (so a dashboard is not empty at
first), or after the ``Last-Event-ID`` it is given, then sends each headline as the market
writes it, the quotes once a second, and a heartbeat when it has been quiet for 5 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from html import escape
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from ..errors import NotFound
from ..providers import DemoMarket

__all__ = ["demo_feed", "router"]

TICK = 1.0  # seconds: the longest wait between looks at the market (it changes every second)
HEARTBEAT = 5.0  # seconds of quiet before a heartbeat
REPLAY = 10  # headlines per wire a new stream starts with

router = APIRouter(prefix="/demo", tags=["demo"])


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _conditional(request: Request, body: bytes, tag: str, media_type: str) -> Response:
    """Answer 304 when the client already has this version (exercises pollers' conditional GET)."""
    etag = f'"{tag}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type=media_type, headers={"ETag": etag, "Cache-Control": "no-cache"})


@router.get("/quotes")
async def quotes(request: Request) -> Response:
    """Random-walk quotes for a handful of symbols, one step per second."""
    return Response(request.state.demo.quotes(time.time()), media_type="application/json")


@router.get("/news.rss")
async def news_rss(request: Request) -> Response:
    """The Demo Newswire as RSS 2.0; a new headline every few seconds."""
    market = request.state.demo
    now = time.time()
    return _conditional(request, market.rss(now, _base(request)), market.latest_id("newswire", now), "application/rss+xml")


@router.get("/news.json")
async def news_json(request: Request) -> Response:
    """The Demo Markets API as JSON: {"items": [...]}."""
    market = request.state.demo
    now = time.time()
    return _conditional(request, market.json_feed(now, _base(request)), market.latest_id("markets", now), "application/json")


@router.get("/news/{ident}")
async def article(ident: str, request: Request) -> Response:
    """The page a demo headline links to."""
    item = request.state.demo.article(ident)
    if item is None:
        raise NotFound(f"ident: no demo article {ident!r} (only the latest are kept)")
    page = (
        '<!doctype html><html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{escape(item['title'])}</title><main><h1>{escape(item['title'])}</h1>"
        f"<p><time>{item['published'].isoformat()}</time></p><p>{escape(item['summary'])}</p>"
        '<p><a href="/">Back to the dashboard</a></p></main></html>'
    )
    return Response(page, media_type="text/html; charset=utf-8")


async def demo_feed(
    market: DemoMarket, base_url: str, resume: str | None = None
) -> AsyncIterator[tuple[str, dict[str, Any] | None, str]]:
    """What a push stream of the demo market sends: ``(kind, message, position)``, kind being
    ``headline``, ``quotes`` or ``heartbeat`` (message None). ``position`` (``run:n:n``, the
    last headline number of each wire) resumes a stream given back as ``resume``."""
    after = _position(resume, market) or {wire: number - REPLAY for wire, number in market.numbers().items()}
    quoted = -1.0
    quiet_since = time.monotonic()
    while True:
        now = time.time()
        for message in market.pushed_since(after, now, base_url):
            after[message["wire"]] = int(message["id"].rsplit("-", 1)[1])
            quiet_since = time.monotonic()
            yield "headline", message, _mark(market, after)
        if market.quotes_at != quoted:
            quoted = market.quotes_at
            quiet_since = time.monotonic()
            yield "quotes", {"type": "quotes", "data": market.quote_values(now)}, _mark(market, after)
        if time.monotonic() - quiet_since >= HEARTBEAT:
            quiet_since = time.monotonic()
            yield "heartbeat", None, _mark(market, after)
        # Wake when the market next changes (a headline is pushed the moment it is written), at
        # least every TICK.
        await asyncio.sleep(max(0.001, min(TICK, market.next_due() - time.time())))


def _mark(market: DemoMarket, after: dict[str, int]) -> str:
    return ":".join([market.run, *(str(after[wire]) for wire in sorted(after))])


def _position(resume: str | None, market: DemoMarket) -> dict[str, int] | None:
    """A position this market wrote (a restarted demo's ids are another run's: start afresh)."""
    parts = (resume or "").split(":")
    wires = sorted(market.numbers())
    if len(parts) != len(wires) + 1 or parts[0] != market.run or not all(part.isdigit() for part in parts[1:]):
        return None
    return {wire: int(part) for wire, part in zip(wires, parts[1:], strict=True)}


@router.get("/stream")
async def stream(request: Request) -> StreamingResponse:
    """The demo market pushed over SSE: ``event: newswire`` / ``markets`` (headlines, with an
    ``id:`` to resume from), ``event: quotes`` once a second, ``: heartbeat`` comments."""

    runtime = request.state.stream

    async def frames() -> AsyncIterator[bytes]:
        async for kind, message, position in demo_feed(request.state.demo, _base(request), request.headers.get("last-event-id")):
            if runtime.stopping:  # shutting down: end the stream with a hint, as /sse does
                yield b"retry: 1000\n\n"
                return
            if message is None:
                yield b": heartbeat\n\n"
            elif kind == "headline":
                yield b"event: %s\nid: %s\ndata: %s\n\n" % (message["wire"].encode(), position.encode(), orjson.dumps(message))
            else:
                yield b"event: quotes\ndata: %s\n\n" % orjson.dumps(message)

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
