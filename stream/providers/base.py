"""What every provider kind shares: parsed items, dotted paths, headline normalisation, topic
templates. Pure: no I/O, no clock except the one passed in."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import BadTopic, UpstreamError
from ..topics import validate_topic

__all__ = [
    "Item",
    "Parsed",
    "dig",
    "headline",
    "parse_time",
    "render_topic",
    "segment",
]

SUMMARY_LIMIT = 1000
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NOT_SEGMENT = re.compile(r"[^A-Za-z0-9_-]+")
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_CASHTAG = re.compile(r"\$([A-Z]{1,5}(?:[.-][A-Z]{1,3})?)\b")


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to publish: ``key`` identifies it for dedup (item id, or snapshot key)."""

    key: str
    topic: str
    data: Any
    published: float | None = None  # seconds since the epoch, for ordering and freshness


@dataclass
class Parsed:
    items: list[Item] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # why items were skipped (first few)
    warning: str | None = None  # a benign parse warning: the document was still used

    def skip(self, why: str) -> None:
        self.skipped += 1
        if len(self.problems) < 5:
            self.problems.append(why)


def dig(value: Any, path: str) -> Any:
    """Follow a dotted path (``data.items``, ``source.name``; list indexes as numbers); ``""`` is
    the value itself. Missing steps give None."""
    if not path:
        return value
    for step in path.split("."):
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return None
    return value


def segment(value: Any) -> str:
    """Any value as one topic segment: unusable characters become ``_``."""
    text = _NOT_SEGMENT.sub("_", str(value)).strip("_")[:64]
    return text or "_"


def render_topic(template: str, values: dict[str, Any]) -> str:
    """Fill ``{field}`` placeholders, each value made a valid segment; raises BadTopic."""

    def fill(match: re.Match[str]) -> str:
        return segment(values.get(match.group(1), ""))

    return validate_topic(_PLACEHOLDER.sub(fill, template), "topic")


def template_fields(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


_NUMBER = re.compile(r"\d+(?:\.\d+)?\Z")


def parse_time(value: Any) -> datetime | None:
    """ISO-8601, RFC 822 or a Unix timestamp (seconds or milliseconds) as an aware UTC datetime;
    None when absent, unreadable, or zero."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            if value <= 0:
                return None
            seconds = value / 1000 if value > 1e11 else value
            return datetime.fromtimestamp(seconds, UTC)
        text = str(value).strip()
        if _NUMBER.match(text):
            return parse_time(float(text))
        try:
            moment = datetime.fromisoformat(re.sub(r"[zZ]\Z", "+00:00", text))
        except ValueError:
            moment = parsedate_to_datetime(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)  # may overflow too: 0001-01-01T00:00:00+05:00
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def plain_text(value: Any, limit: int = SUMMARY_LIMIT) -> str:
    """HTML to one line of text, at most ``limit`` characters."""
    if not isinstance(value, str):
        return ""
    # Tags out, entities decoded, then tags out again: an encoded "&lt;script&gt;" stays out too.
    text = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(_TAG.sub(" ", value)))).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def symbols_from(value: Any, title: str) -> list[str]:
    """Symbols from a list or a comma-separated string, plus $CASHTAGS in the title."""
    found: list[str] = []
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list):
        found = [item.strip().upper() for item in value if isinstance(item, str) and item.strip()]
    for tag in _CASHTAG.findall(title):
        found.append(tag)
    return list(dict.fromkeys(symbol for symbol in found if len(symbol) <= 32))


# Where each headline field is looked for when ``fields`` does not say, in order.
DEFAULT_PATHS = {
    "id": ("id", "guid", "uuid"),
    "title": ("title", "headline", "name"),
    "url": ("url", "link", "href"),
    "source": ("source.name", "source", "site", "publisher"),
    "published": ("published", "publishedAt", "published_at", "pubDate", "date", "datetime", "created_at", "time", "updated"),
    "summary": ("summary", "description", "content", "text"),
    "symbols": ("symbols", "tickers", "related", "symbol"),
}


def pick(raw: Any, name: str, fields: dict[str, str]) -> Any:
    if name in fields:
        return dig(raw, fields[name])
    for path in DEFAULT_PATHS[name]:
        value = dig(raw, path)
        if value not in (None, ""):
            return value
    return None


def headline(raw: Any, *, provider: str, fields: dict[str, str], source: str, parsed: Parsed) -> dict[str, Any] | None:
    """Normalise one upstream item into the headline shape, or count it as skipped (None)."""
    if not isinstance(raw, dict):
        parsed.skip("item is not an object")
        return None
    title = plain_text(pick(raw, "title", fields), 500)
    ident = pick(raw, "id", fields)
    url = pick(raw, "url", fields)
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        url = None  # only web links: never javascript:, data: or a relative path
    if ident in (None, ""):
        ident = url
    if ident in (None, "") or isinstance(ident, (dict, list)):
        parsed.skip(f"item without an id or url: {title[:60]!r}")
        return None
    if not title:
        parsed.skip(f"item {str(ident)[:60]!r} has no title")
        return None
    item_source = pick(raw, "source", fields)
    if isinstance(item_source, dict):
        item_source = item_source.get("name") or item_source.get("title")
    published = parse_time(pick(raw, "published", fields))
    return {
        "id": str(ident),
        "title": title,
        "url": url,
        "source": item_source if isinstance(item_source, str) and item_source else source,
        "published": iso(published),
        "summary": plain_text(pick(raw, "summary", fields)),
        "symbols": symbols_from(pick(raw, "symbols", fields), title),
        "provider": provider,
    }


def headline_items(
    raws: list[Any], *, provider: str, fields: dict[str, str], source: str, topic: str, parsed: Parsed
) -> None:
    """Normalise ``raws`` into ``parsed.items`` (dedup keys are the headline ids)."""
    for raw in raws:
        data = headline(raw, provider=provider, fields=fields, source=source, parsed=parsed)
        if data is None:
            continue
        try:
            item_topic = render_topic(topic, {**data, "name": provider, "provider": provider})
        except BadTopic as exc:
            parsed.skip(exc.message)
            continue
        moment = parse_time(data["published"])
        parsed.items.append(Item(data["id"], item_topic, data, moment.timestamp() if moment else None))


def bad_body(message: str) -> UpstreamError:
    return UpstreamError("bad_body", message)
