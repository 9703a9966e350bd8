"""Topic names and NATS-style patterns: validation, matching and containment. Pure.

A topic is 1-8 dot-separated segments of ``[A-Za-z0-9_-]``, at most 200 characters. A pattern
may use ``*`` for exactly one segment and, as its last segment, ``>`` for one or more.
Topics starting with ``_`` belong to the server: a pattern that starts with a wildcard does
not match them (subscribe to ``_system.>`` explicitly).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import BadTopic, TooManySubscriptions

V = TypeVar("V")

__all__ = [
    "MAX_SEGMENTS",
    "MAX_TOPIC_LENGTH",
    "Pattern",
    "PatternIndex",
    "covers",
    "is_system",
    "parse_pattern_list",
    "validate_pattern",
    "validate_topic",
]

MAX_TOPIC_LENGTH = 200
MAX_SEGMENTS = 8
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+\Z")


def is_system(topic: str) -> bool:
    """True for the server's own topics (``_system.providers``), which clients never publish to."""
    return topic.startswith("_")


def _check_shape(text: object, field: str, what: str) -> list[str]:
    if not isinstance(text, str):
        raise BadTopic(f"{field}: expected a {what} string, got {type(text).__name__}")
    if not text:
        raise BadTopic(f"{field}: {what} is empty")
    if len(text) > MAX_TOPIC_LENGTH:
        raise BadTopic(f"{field}: {what} is {len(text)} characters long, at most {MAX_TOPIC_LENGTH} allowed")
    segments = text.split(".")
    if len(segments) > MAX_SEGMENTS:
        raise BadTopic(f"{field}: {what} {text!r} has {len(segments)} segments, at most {MAX_SEGMENTS} allowed")
    return segments


def validate_topic(topic: object, field: str = "topic") -> str:
    """Return ``topic`` if it is a valid concrete topic name, else raise :class:`BadTopic`."""
    segments = _check_shape(topic, field, "topic")
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise BadTopic(
                f"{field}: topic {topic!r} has an invalid segment {segment!r}; "
                "segments are 1+ characters of A-Z a-z 0-9 _ - (no wildcards in a topic)"
            )
    return topic  # type: ignore[return-value]


def validate_pattern(pattern: object, field: str = "topics") -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise :class:`BadTopic`."""
    segments = _check_shape(pattern, field, "pattern")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "*" or (segment == ">" and index == last):
            continue
        if segment == ">":
            raise BadTopic(f"{field}: pattern {pattern!r} uses '>' before its last segment")
        if not _SEGMENT.match(segment):
            raise BadTopic(
                f"{field}: pattern {pattern!r} has an invalid segment {segment!r}; "
                "segments are 1+ characters of A-Z a-z 0-9 _ -, or '*', or a final '>'"
            )
    return pattern  # type: ignore[return-value]


def parse_pattern_list(value: object, field: str = "topics", limit: int | None = None) -> list[str]:
    """Patterns from a list of strings or a comma-separated string, validated, duplicates removed.
    A list longer than ``limit`` is refused (``too_many_subscriptions``) before any is checked."""
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise BadTopic(f"{field}: expected a list of patterns or a comma-separated string")
    if not items:
        raise BadTopic(f"{field}: at least one pattern is required")
    if limit is not None and len(items) > limit:
        raise TooManySubscriptions(f"{field}: at most {limit} patterns per request, got {len(items)}")
    seen: dict[str, None] = {}
    for index, item in enumerate(items):
        seen[validate_pattern(item, f"{field}[{index}]")] = None
    return list(seen)


class Pattern:
    """A validated pattern, split once, that answers ``matches(topic)``."""

    __slots__ = ("_head", "_literal", "_tail", "_wild_start", "text")

    def __init__(self, text: str) -> None:
        self.text = validate_pattern(text)
        segments = text.split(".")
        self._tail = segments[-1] == ">"
        self._head = tuple(segments[:-1] if self._tail else segments)
        self._wild_start = segments[0] in ("*", ">")
        self._literal = not self._tail and "*" not in segments

    @property
    def literal(self) -> bool:
        """True when the pattern has no wildcard: it names one topic."""
        return self._literal

    def matches(self, topic: str) -> bool:
        if self._literal:
            return topic == self.text
        if self._wild_start and topic.startswith("_"):
            return False
        segments = topic.split(".")
        head = self._head
        if self._tail:
            if len(segments) <= len(head):
                return False
        elif len(segments) != len(head):
            return False
        for want, got in zip(head, segments, strict=False):
            if want != "*" and want != got:
                return False
        return True

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


class _Node(Generic[V]):
    __slots__ = ("children", "star", "tail", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.star: _Node[V] | None = None
        self.tail: V | None = None  # the value of the pattern that ends here with '>'
        self.value: V | None = None  # the value of the pattern that ends exactly here

    def empty(self) -> bool:
        return not self.children and self.star is None and self.tail is None and self.value is None


class PatternIndex(Generic[V]):
    """Patterns mapped to values, matched against a topic segment by segment (NATS's sublist).

    A lookup walks the topic's (at most 8) segments through the branches that can match; its
    cost does not grow with the number of patterns held, and adding or removing a pattern
    touches only that pattern's path. So no client can slow everyone's routing by subscribing.
    """

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _path(self, text: str, create: bool) -> tuple[list[_Node[V]], list[str], bool]:
        segments = text.split(".")
        tail = segments[-1] == ">"
        if tail:
            segments = segments[:-1]
        nodes = [self._root]
        for segment in segments:
            node = nodes[-1]
            child = node.star if segment == "*" else node.children.get(segment)
            if child is None:
                if not create:
                    return [], segments, tail
                child = _Node()
                if segment == "*":
                    node.star = child
                else:
                    node.children[segment] = child
            nodes.append(child)
        return nodes, segments, tail

    def get(self, text: str) -> V | None:
        nodes, _, tail = self._path(text, create=False)
        if not nodes:
            return None
        return nodes[-1].tail if tail else nodes[-1].value

    def add(self, text: str, value: V) -> None:
        """Map the (validated) pattern ``text`` to ``value``, replacing any value it had."""
        nodes, _, tail = self._path(text, create=True)
        node = nodes[-1]
        if (node.tail if tail else node.value) is None:
            self._size += 1
        if tail:
            node.tail = value
        else:
            node.value = value

    def remove(self, text: str) -> None:
        nodes, segments, tail = self._path(text, create=False)
        if not nodes:
            return
        node = nodes[-1]
        if (node.tail if tail else node.value) is None:
            return
        self._size -= 1
        if tail:
            node.tail = None
        else:
            node.value = None
        # Prune the branch back to the root so churn leaves nothing behind.
        for depth in range(len(segments), 0, -1):
            child, parent, segment = nodes[depth], nodes[depth - 1], segments[depth - 1]
            if not child.empty():
                break
            if segment == "*":
                parent.star = None
            else:
                del parent.children[segment]

    def match(self, topic: str) -> list[V]:
        """The values of every pattern that matches the concrete ``topic``."""
        found: list[V] = []
        segments = topic.split(".")
        last = len(segments) - 1
        nodes = [self._root]
        for index, segment in enumerate(segments):
            following: list[_Node[V]] = []
            for node in nodes:
                # Wildcards in a pattern's first segment never match the server's '_' topics.
                wild = index > 0 or not segment.startswith("_")
                if node.tail is not None and wild:
                    found.append(node.tail)
                child = node.children.get(segment)
                if child is not None:
                    following.append(child)
                if node.star is not None and wild:
                    following.append(node.star)
            if not following:
                return found
            nodes = following
            if index == last:
                for node in nodes:
                    if node.value is not None:
                        found.append(node.value)
        return found

    def values(self) -> Iterator[V]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.value is not None:
                yield node.value
            if node.tail is not None:
                yield node.tail
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)


def covers(outer: str, inner: str) -> bool:
    """True when every topic ``inner`` can match is matched by ``outer`` (permissions).

    Ignores the rule that wildcards skip ``_`` topics: a grant of ``>`` covers ``_system.>``.
    """
    o = outer.split(".")
    i = inner.split(".")
    if o[-1] == ">":
        fixed = o[:-1]
        if len(i) < len(fixed) + 1:
            return False
    else:
        fixed = o
        if i[-1] == ">" or len(i) != len(o):
            return False
    return all(want == "*" or (got not in ("*", ">") and got == want) for want, got in zip(fixed, i, strict=False))
