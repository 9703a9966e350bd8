"""Which subscribers an event reaches (a Route per pattern, grouped by wire format), which
events a set of patterns wants (Matcher), and the sink of a long-poll waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..events import Event, symbols_match
from ..topics import Pattern, PatternIndex
from .subscriber import Subscriber, Want

__all__ = ["Matcher", "Route", "WakeSink"]

_Group = tuple[Callable[[Event], bytes], str, tuple[tuple[Subscriber, "frozenset[str] | None"], ...]]


class Route:
    """The subscribers of one pattern, with their symbol filters, grouped by wire format."""

    __slots__ = ("_groups", "members", "pattern")

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.members: dict[Subscriber, frozenset[str] | None] = {}
        self._groups: tuple[_Group, ...] | None = None

    def add(self, sub: Subscriber, symbols: frozenset[str] | None) -> None:
        self.members[sub] = symbols
        self._groups = None

    def discard(self, sub: Subscriber) -> bool:
        """Remove ``sub``; False when it was not a member."""
        if self.members.pop(sub, _ABSENT) is _ABSENT:
            return False
        self._groups = None
        return True

    def groups(self) -> tuple[_Group, ...]:
        """(encode, transport, members) per wire format: each event is framed once per group.
        A frozen copy, rebuilt after a change: a delivery may detach a subscriber mid-fan-out."""
        if self._groups is None:
            grouped: dict[tuple[Callable[[Event], bytes], str], list] = {}
            for sub, symbols in self.members.items():
                grouped.setdefault((sub.sink.encode, sub.transport_name), []).append((sub, symbols))
            self._groups = tuple((encode, name, tuple(members)) for (encode, name), members in grouped.items())
        return self._groups


_ABSENT = object()


class Matcher:
    """Which events a set of patterns wants, each pattern from its own starting point."""

    __slots__ = ("_index",)

    def __init__(self, wants: list[Want]) -> None:
        self._index: PatternIndex[Want] = PatternIndex()
        for want in wants:
            self._index.add(want.pattern.text, want)

    def accepts(self, event: Event) -> bool:
        """A history event newer than a matching pattern's start, passing its symbol filter."""
        for want in self._index.match(event.topic):
            if event.seq > want.start and symbols_match(want.symbols, event.symbols):
                return True
        return False

    def wants(self, event: Event) -> bool:
        """A retained value (whatever its seq) matching a pattern and its symbol filter."""
        return any(symbols_match(want.symbols, event.symbols) for want in self._index.match(event.topic))


class WakeSink:
    """A sink that only notes that something arrived (long-poll waiters)."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def encode(self, event: Event) -> bytes:
        return b"."

    encode_snapshot = encode

    def encode_gap(self, after: str | None, reason: str) -> bytes:
        return b"."

    def write(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def overflowed(self) -> None:
        self.write(b"")
