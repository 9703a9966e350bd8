"""The Event value type, its id, and ``since`` positions. Pure.

An event is ``{"id", "topic", "ts", "data"}``. Its JSON is built once, when the hub accepts it,
from the already-encoded ``data``; every transport frames those same bytes (see ``wire``).

Ids look like ``<epoch>-<seq>``: ``epoch`` names one life of a hub (memory: one process run),
``seq`` is an integer strictly increasing in accept order. Clients treat ids as opaque.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
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
    "symbols_match",
    "symbols_of",
]

_ID = re.compile(r"([0-9a-z]{1,32})-(\d{1,30})\Z")
_DURATION = re.compile(r"-(\d{1,15}(?:\.\d{1,9})?)(ms|s|m|h|d)\Z")
_MAX_DURATION_MS = 10 * 366 * 86_400_000  # ten years: far beyond any history
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


def symbols_match(wanted: frozenset[str] | None, carried: frozenset[str] | None) -> bool:
    """The one symbol filter (SPEC §5): no filter, or an event without ``symbols``, passes;
    otherwise the event must share a symbol with the filter."""
    return wanted is None or carried is None or not wanted.isdisjoint(carried)


class Event:
    """One accepted event, immutable by convention.

    It holds one encoded copy of itself (``json``); ``data`` is decoded from it on demand
    (the HTTP API), and wire forms are framed from it during fan-out and not kept, so history
    memory is one copy per event (``size`` counts it, see ``History``).
    """

    __slots__ = ("_data_at", "id", "json", "policy", "primed", "seq", "size", "symbols", "topic", "ts")

    def __init__(self, seq: int, id: str, topic: str, ts: int, data: Any, data_json: bytes, policy: Any = None):
        self.seq = seq
        self.id = id
        self.topic = topic
        self.ts = ts
        # id and topic are restricted to characters that need no JSON escaping.
        head = b'{"id":"%s","topic":"%s","ts":%d,"data":' % (id.encode(), topic.encode(), ts)
        self.json = head + data_json + b"}"
        self._data_at = len(head)
        self.symbols = symbols_of(data)
        self.policy = policy
        self.primed = False  # a retained value set by a provider's first poll: never in history
        self.size = (
            _EVENT_BYTES
            + sys.getsizeof(self.json)
            + sys.getsizeof(id)
            + sys.getsizeof(topic)
            + (0 if self.symbols is None else _symbols_bytes(self.symbols))
        )

    @property
    def data(self) -> Any:
        return orjson.loads(memoryview(self.json)[self._data_at : -1])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "ts": self.ts, "data": self.data}

    def snapshot_json(self) -> bytes:
        """The event marked as a retained value sent on subscribe."""
        return self.json[:-1] + b',"snapshot":true}'

    def __repr__(self) -> str:
        return f"Event({self.id!r}, {self.topic!r})"


# The object itself: sys.getsizeof of an Event (112 on CPython 3.11) plus its GC header.
_EVENT_BYTES = 128


def _symbols_bytes(symbols: frozenset[str]) -> int:
    return sys.getsizeof(symbols) + sum(sys.getsizeof(symbol) for symbol in symbols)


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
        back = float(duration.group(1)) * _UNIT_MS[duration.group(2)]
        if back > _MAX_DURATION_MS:
            raise BadRequest(f"{field}: {text[:40]!r} reaches back more than ten years; history is far shorter")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return Since(text, time_ms=now - int(back))
    if text.startswith("-"):
        raise BadRequest(f"{field}: {text[:40]!r} is not a duration like -60s, -5m, -1h or -2d")
    parsed = parse_id(text)
    if parsed is not None:
        return Since(text, epoch=parsed[0], seq=parsed[1])
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return Since(text, time_ms=int(moment.timestamp() * 1000))
    except (ValueError, OverflowError, OSError):
        raise BadRequest(
            f"{field}: {text[:80]!r} is neither an event id, an ISO-8601 time (2026-11-25T10:00:00Z) "
            "nor a duration like -60s"
        ) from None


def encode_data(data: Any) -> bytes:
    """Encode an event's data as JSON, translating orjson's refusal into a BadRequest."""
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise BadRequest(f"data: cannot be encoded as JSON ({exc})") from None
