"""``[[providers]]``: one upstream source each (SPEC §7), read and checked like the rest of the
config; every mistake becomes one problem line naming ``providers[i].key``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import BadTopic
from .topics import validate_topic

__all__ = ["DEMO_PATHS", "KINDS", "ProviderSettings", "read_providers"]

KINDS = ("feed", "json", "snapshot", "demo")
DEMO_PATHS = ("/demo/quotes", "/demo/news.rss", "/demo/news.json")
HEADLINE_FIELDS = ("id", "title", "url", "source", "published", "summary", "symbols")
HEADLINE_PLACEHOLDERS = frozenset({"id", "title", "source", "provider", "name"})
POLICIES = ("disconnect", "drop", "conflate")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ProviderSettings:
    """One upstream source. ``url`` of a ``demo`` provider is a path on this server."""

    name: str
    kind: str
    url: str
    topic: str  # template: {field} placeholders are filled from each item
    interval: float = 30.0  # seconds between polls, at least 1
    jitter: float = 0.1  # +/- this fraction of interval, so providers do not poll in lockstep
    timeout: float = 10.0  # seconds for a whole poll: connect, headers and body
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    params: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_bytes: int = 5 * 1024 * 1024  # decoded body
    backfill: bool = False  # publish what the first poll finds (else it only primes dedup)
    dedup_size: int = 10_000  # item ids (or snapshot keys) remembered
    overflow: str | None = None  # overflow policy for this provider's topics
    enabled: bool = True
    items: str = ""  # json: dotted path to the list of items ("" = the document itself)
    id: str = "id"  # json: dotted path to an item's id (falls back to url / link)
    path: str = ""  # snapshot: dotted path to the value inside the document
    split: str | None = None  # snapshot: path (inside `path`) to a mapping or list; one topic per key
    key: str = ""  # snapshot: with a list to split, the field holding each entry's key
    fields: tuple[tuple[str, str], ...] = ()  # headline field -> dotted path in the upstream item
    source: str | None = None  # headline source when an item names none (default: feed title / name)

    @property
    def headlines(self) -> bool:
        """Whether this provider publishes headlines (feed, json, demo news) rather than values."""
        return self.kind in ("feed", "json") or (self.kind == "demo" and self.url != "/demo/quotes")

    def topic_pattern(self) -> str:
        """The subscription pattern covering every topic this provider can publish."""
        return ".".join("*" if "{" in part else part for part in self.topic.split("."))


_FIELDS = {f.name: f for f in fields(ProviderSettings)}


def _default_topic(kind: str, name: str, split: bool, url: Any) -> str:
    if kind == "demo" and url == "/demo/quotes":
        return "quotes.{key}"
    if kind == "snapshot":
        return f"{name}.{{key}}" if split else name
    return f"news.{name}"


def read_providers(items: Any, env: Mapping[str, str], problems: list[str]) -> tuple[ProviderSettings, ...]:
    if not isinstance(items, list):
        problems.append("providers: expected an array of tables ([[providers]])")
        return ()
    providers: list[ProviderSettings] = []
    seen: set[str] = set()
    for index, table in enumerate(items):
        where = f"providers[{index}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table")
            continue
        before = len(problems)
        provider = _provider(table, where, env, problems)
        if provider is not None and provider.name in seen:
            problems.append(f"{where}.name: {provider.name!r} is used by another provider")
        elif provider is not None and len(problems) == before:
            seen.add(provider.name)
            providers.append(provider)
    return tuple(providers)


def _provider(table: dict[str, Any], where: str, env: Mapping[str, str], problems: list[str]) -> ProviderSettings | None:
    for key in table:
        if key not in _FIELDS:
            problems.append(f"{where}.{key}: unknown setting")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"{where}.name: expected 1-64 characters of A-Z a-z 0-9 _ -, got {name!r}")
        return None
    kind: Any = table.get("kind")
    known_kind = kind in KINDS
    if not known_kind:
        problems.append(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        kind = "snapshot"  # check the settings every kind shares, so every problem is reported at once
    values: dict[str, Any] = {"name": name, "kind": kind}
    url = table.get("url", "/demo/quotes" if kind == "demo" else None)
    if kind == "demo":
        if url not in DEMO_PATHS:
            problems.append(f"{where}.url: a demo provider polls one of {', '.join(DEMO_PATHS)}, got {url!r}")
    elif not isinstance(url, str) or not url.startswith(("http://", "https://")):
        problems.append(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    values["url"] = url

    def number(key: str, low: float, *, integer: bool = False, high: float | None = None) -> None:
        if key not in table:
            return
        value = table[key]
        ok = (
            isinstance(value, int if integer else (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        )
        if not ok or value < low or (high is not None and value > high):
            span = f"{low:g}-{high:g}" if high is not None else f"at least {low:g}"
            problems.append(f"{where}.{key}: expected {'an integer' if integer else 'a number'} {span}, got {value!r}")
            return
        values[key] = value if integer else float(value)

    number("interval", 1)
    number("jitter", 0, high=1)
    number("timeout", 0.1)
    number("max_bytes", 1024, integer=True)
    number("dedup_size", 1, integer=True)
    for key in ("backfill", "enabled"):
        if key in table:
            if isinstance(table[key], bool):
                values[key] = table[key]
            else:
                problems.append(f"{where}.{key}: expected true or false, got {table[key]!r}")
    for key in ("items", "id", "path", "split", "key", "source"):
        if key in table:
            if isinstance(table[key], str):
                values[key] = table[key]
            else:
                problems.append(f"{where}.{key}: expected a string (a dotted path), got {table[key]!r}")
    if "overflow" in table:
        if table["overflow"] in POLICIES:
            values["overflow"] = table["overflow"]
        else:
            problems.append(f"{where}.overflow: expected one of {', '.join(POLICIES)}, got {table['overflow']!r}")
    for key in ("headers", "params"):
        values[key] = _strings(table.get(key, {}), f"{where}.{key}", env, problems)
    fields_table = table.get("fields", {})
    if isinstance(fields_table, dict):
        for target, path in fields_table.items():
            if target not in HEADLINE_FIELDS:
                problems.append(f"{where}.fields.{target}: not a headline field ({', '.join(HEADLINE_FIELDS)})")
            elif not isinstance(path, str):
                problems.append(f"{where}.fields.{target}: expected a dotted path string, got {path!r}")
        values["fields"] = tuple((k, v) for k, v in fields_table.items() if isinstance(v, str))
    else:
        problems.append(f"{where}.fields: expected a table of headline field = dotted path")
    split = values.get("split") is not None
    topic = table.get("topic", _default_topic(kind, name, split, url))
    if not isinstance(topic, str):
        problems.append(f"{where}.topic: expected a topic template string, got {topic!r}")
        return None
    if kind in ("feed", "json") or (kind == "demo" and url != "/demo/quotes"):
        # News topics may use headline fields; state topics may name any field of their values.
        unknown = [name for name in _PLACEHOLDER.findall(topic) if name not in HEADLINE_PLACEHOLDERS]
        if unknown:
            allowed = ", ".join(sorted(HEADLINE_PLACEHOLDERS))
            problems.append(f"{where}.topic: unknown placeholder {{{unknown[0]}}} (allowed here: {allowed})")
    sample = _PLACEHOLDER.sub("x", topic)
    try:
        validate_topic(sample, f"{where}.topic")
    except BadTopic as exc:
        problems.append(exc.message)
    values["topic"] = topic
    return ProviderSettings(**values) if known_kind else None


def _strings(table: Any, where: str, env: Mapping[str, str], problems: list[str]) -> tuple[tuple[str, str], ...]:
    """A table of strings with ``${VAR}`` replaced from the environment."""
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table of name = \"value\"")
        return ()
    result = []
    for name, value in table.items():
        if not isinstance(value, str):
            problems.append(f"{where}.{name}: expected a string, got {value!r}")
            continue
        missing = [var for var in _ENV.findall(value) if not env.get(var)]
        if missing:
            problems.append(f"{where}.{name}: environment variable {missing[0]!r} is not set or empty")
            continue
        result.append((name, _ENV.sub(lambda m: env[m.group(1)], value)))
    return tuple(result)
