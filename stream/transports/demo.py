"""``/demo/…``: the offline market that the built-in config polls (see providers/demo.py)."""

from __future__ import annotations

import time
from html import escape

from fastapi import APIRouter, Request, Response

from ..errors import NotFound

__all__ = ["router"]

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
