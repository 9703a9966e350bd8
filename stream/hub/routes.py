"""Which subscribers an event reaches (a Route per pattern, grouped by wire format), which
history events a set of patterns wants (Matcher), and the sink of a long-poll waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..events import Event
from ..topics import Pattern
from .subscriber import Subscriber, _Want

__all__ = ["Matcher", "Route", "WakeSink", "symbols_ok"]

_Group = tuple[Callable[[Event], bytes], str, tuple[tuple[Subscriber, "frozenset[str] | None"], ...]]


class Route:
    """The subscribers of one pattern, with their symbol filters, grouped by wire format."""

    __slots__ = ("pattern", "members", "_groups")

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.members: dict[Subscriber, frozenset[str] | None] = {}
        self._groups: tuple[_Group, ...] | None = None

    def groups(self) -> tuple[_Group, ...]:
        """(encode, transport, members) per wire format: each event is framed once per group.
        A frozen copy, rebuilt after a change: a delivery may detach a subscriber mid-fan-out."""
        if self._groups is None:
            grouped: dict[tuple[Callable[[Event], bytes], str], list] = {}
            for sub, symbols in self.members.items():
                grouped.setdefault((sub._encode, sub.transport_name), []).append((sub, symbols))
            self._groups = tuple((encode, name, tuple(members)) for (encode, name), members in grouped.items())
        return self._groups



class Matcher:
    """Which history events a set of patterns wants; pattern matching is done once per topic."""

    def __init__(self, wants: list[_Want]) -> None:
        self.wants = wants
        self._topics: dict[str, list[_Want]] = {}

    def accepts(self, event: Event) -> bool:
        matching = self._topics.get(event.topic)
        if matching is None:
            matching = self._topics[event.topic] = [w for w in self.wants if w.pattern.matches(event.topic)]
        for want in matching:
            if event.seq > want.start and (
                want.symbols is None or event.symbols is None or not want.symbols.isdisjoint(event.symbols)
            ):
                return True
        return False


def symbols_ok(wants: list[_Want], event: Event) -> bool:
    symbols = wants[0].symbols if wants else None
    return symbols is None or event.symbols is None or not symbols.isdisjoint(event.symbols)


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
