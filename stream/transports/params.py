"""Request parameters shared by the WebSocket and SSE transports: parsed and checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, Forbidden
from ..events import Since, parse_since
from ..topics import parse_pattern_list

__all__ = [
    "SubscribeRequest",
    "check_origin",
    "parse_flag",
    "parse_symbols",
    "subscribe_request",
]


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    topics: list[str]
    since: Since | None
    snapshot: bool
    symbols: frozenset[str] | None


def parse_flag(value: Any, field: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, str)) and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return str(value).lower() in ("1", "true", "yes", "on")
    raise BadRequest(f"{field}: expected true or false, got {value!r}")


def parse_symbols(value: Any, field: str = "symbols") -> frozenset[str] | None:
    """``AAPL,MSFT`` or ``["AAPL", "MSFT"]`` as an upper-case set; None/empty means no filter."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise BadRequest(f"{field}: expected a list of symbols or a comma-separated string")
    symbols = frozenset(item.upper() for item in items if item)
    if any(len(symbol) > 32 for symbol in symbols):
        raise BadRequest(f"{field}: a symbol is at most 32 characters")
    return symbols or None


def subscribe_request(values: dict[str, Any], *, since_override: str | None = None, max_patterns: int | None = None) -> SubscribeRequest:
    """Build a subscription from a WS op or query parameters; raises a StreamError naming the field.
    More than ``max_patterns`` patterns are refused before any is checked."""
    topics = parse_pattern_list(values.get("topics"), "topics", limit=max_patterns)
    since_text = since_override if since_override is not None else values.get("since")
    since = None
    if since_text is not None and since_text != "":
        if not isinstance(since_text, str):
            raise BadRequest("since: expected an event id or a time as a string")
        since = parse_since(since_text)
    return SubscribeRequest(
        topics=topics,
        since=since,
        snapshot=parse_flag(values.get("snapshot"), "snapshot"),
        symbols=parse_symbols(values.get("symbols")),
    )


def check_origin(origin: str | None, allowed: tuple[str, ...]) -> None:
    """Refuse a browser request from an Origin that is not listed (no Origin: not a browser)."""
    if origin is None or "*" in allowed or origin in allowed:
        return
    raise Forbidden(f"Origin: {origin!r} is not in allowed_origins")
