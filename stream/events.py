"""The Event value type, its id, and ``since`` positions. Pure.

An event is ``{"id", "topic", "ts", "data"}``. Its JSON is built once, when the hub accepts it,
from the already-encoded ``data``; every transport frames those same bytes (see ``wire``).

Ids look like ``<epoch>-<seq>``: ``epoch`` names one life of a hub (memory: one process run),
``seq`` is an integer strictly increasing in accept order. Clients treat ids as opaque.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from .errors import BadRequest

__all__ = [
    "Event",
    "Since",
    "format_id",
    "new_epoch",
    "parse_id",
    "parse_since",
    "symbols_of",
]

_ID = re.compile(r"([0-9a-z]{1,32})-(\d{1,30})\Z")
_DURATION = re.compile(r"-(\d+(?:\.\d+)?)(ms|s|m|h|d)\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def new_epoch() -> str:
    """A fresh epoch: the start time in base 36 plus randomness, so two lives never collide."""
    millis = int(time.time() * 1000)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while millis:
        millis, rest = divmod(millis, 36)
        text = digits[rest] + text
    return text + "".join(secrets.choice(digits) for _ in range(3))


def format_id(epoch: str, seq: int) -> str:
    return f"{epoch}-{seq}"


def parse_id(text: str) -> tuple[str, int] | None:
    """``(epoch, seq)`` for a well-formed id, else None."""
    match = _ID.match(text)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def symbols_of(data: Any) -> frozenset[str] | None:
    """The upper-cased ``symbols`` of an event's data, or None when it has no such list."""
    if type(data) is dict:
        symbols = data.get("symbols")
        if type(symbols) is list:
            return frozenset(s.upper() for s in symbols if type(s) is str)
    return None


class Event:
    """One accepted event. Immutable by convention; the wire caches live in the last slots."""

    __slots__ = ("seq", "id", "topic", "ts", "data", "json", "symbols", "policy", "ws", "sse", "sse_chunk")

    def __init__(self, seq: int, id: str, topic: str, ts: int, data: Any, data_json: bytes, policy: Any = None):
        self.seq = seq
        self.id = id
        self.topic = topic
        self.ts = ts
        self.data = data
        # id and topic are restricted to characters that need no JSON escaping.
        self.json = b'{"id":"%s","topic":"%s","ts":%d,"data":%s}' % (
            id.encode(),
            topic.encode(),
            ts,
            data_json,
        )
        self.symbols = symbols_of(data)
        self.policy = policy
        self.ws: bytes | None = None
        self.sse: bytes | None = None
        self.sse_chunk: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "ts": self.ts, "data": self.data}

    def snapshot_json(self) -> bytes:
        """The event marked as a retained value sent on subscribe."""
        return self.json[:-1] + b',"snapshot":true}'

    def __repr__(self) -> str:
        return f"Event({self.id!r}, {self.topic!r})"


@dataclass(frozen=True, slots=True)
class Since:
    """Where a subscriber wants to start: after an event id, or at a time (ms since the epoch)."""

    text: str
    epoch: str | None = None
    seq: int | None = None
    time_ms: int | None = None


def parse_since(value: str, *, now_ms: int | None = None, field: str = "since") -> Since:
    """Parse ``<id>``, an ISO-8601 time (``2026-11-25T10:00:00Z``) or ``-60s`` / ``-5m`` / ``-1h``."""
    text = value.strip()
    if not text:
        raise BadRequest(f"{field}: is empty; expected an event id, an ISO-8601 time or a duration like -60s")
    duration = _DURATION.match(text)
    if duration is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return Since(text, time_ms=now - int(float(duration.group(1)) * _UNIT_MS[duration.group(2)]))
    parsed = parse_id(text)
    if parsed is not None:
        return Since(text, epoch=parsed[0], seq=parsed[1])
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadRequest(
            f"{field}: {text[:80]!r} is neither an event id, an ISO-8601 time (2026-11-25T10:00:00Z) "
            "nor a duration like -60s"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return Since(text, time_ms=int(moment.timestamp() * 1000))


def encode_data(data: Any) -> bytes:
    """Encode an event's data as JSON, translating orjson's refusal into a BadRequest."""
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise BadRequest(f"data: cannot be encoded as JSON ({exc})") from None
