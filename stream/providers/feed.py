"""``feed``: RSS 0.9x/1.0/2.0 and Atom, parsed with feedparser, one headline per entry. Pure."""

from __future__ import annotations

import calendar
from typing import Any

import feedparser

from ..provider_settings import ProviderSettings
from .base import Parsed, bad_body, headline_items

__all__ = ["parse_feed"]

# feedparser sets `bozo` for these, but the document was read correctly.
_BENIGN = (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType)
_CLOSING_TAGS = (b"</rss>", b"</feed>", b"</rdf:rdf>")


def _entry(entry: Any, symbols_from_tags: bool) -> dict[str, Any]:
    """A feedparser entry with the headline fields where the normaliser looks for them."""
    raw = dict(entry)
    # Plain dict lookups: feedparser's own mapping of published to updated warns on every entry.
    stamp = raw.get("published_parsed") or raw.get("updated_parsed")
    raw["published"] = calendar.timegm(stamp) if stamp else None
    raw["url"] = entry.get("link")
    raw["source"] = (raw.get("source") or {}).get("title")
    if symbols_from_tags:
        raw["symbols"] = [tag.get("term") for tag in entry.get("tags", []) if isinstance(tag.get("term"), str)]
    return raw


def parse_feed(
    body: bytes,
    provider: ProviderSettings,
    *,
    content_type: str | None = None,
    location: str | None = None,
    symbols_from_tags: bool = False,
) -> Parsed:
    headers = {"content-type": content_type or "application/xml"}
    if location:
        headers["content-location"] = location  # resolves relative links
    document = feedparser.parse(body, response_headers=headers, sanitize_html=False)
    problem = document.get("bozo_exception")
    if not document.get("version"):
        start = body.lstrip()[:200].lower()
        if start.startswith((b"<!doctype html", b"<html")) or b"<html" in start:
            raise bad_body("an HTML page, not an RSS or Atom feed")
        raise bad_body(f"not an RSS or Atom document{f' ({problem})' if problem else ''}")
    parsed = Parsed()
    if document.get("bozo") and problem is not None:
        if isinstance(problem, _BENIGN):
            parsed.warning = f"{type(problem).__name__}: {problem}"
        elif document.entries and body.rstrip().lower().endswith(_CLOSING_TAGS):
            # A complete document with a local flaw (an unescaped &): feedparser's lenient
            # reading is trusted. A truncated one is not: its last entry may be cut short.
            parsed.warning = f"malformed XML, {len(document.entries)} entries recovered: {problem}"
        else:
            raise bad_body(f"malformed XML: {problem}")
    raws = [_entry(entry, symbols_from_tags) for entry in document.entries]
    source = provider.source or document.feed.get("title") or provider.name
    headline_items(
        raws, provider=provider.name, fields=dict(provider.fields), source=source, topic=provider.topic, parsed=parsed
    )
    return parsed
