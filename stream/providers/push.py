"""Push messages (SPEC §7a): what one message of an ``sse`` or ``websocket`` upstream holds. Pure.

A message's JSON is an object, or an array of them (a batch: each element is a message of its
own). Each element is one of:

- an error, when every pair of ``error`` matches: its text ends the connection;
- data, when every pair of ``where`` matches: read like a ``json`` document (items, headline
  normalisation) or a ``snapshot`` one (``format``);
- anything else is control or heartbeat: it proves the connection alive and publishes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import UpstreamError
from ..provider_settings import ProviderSettings
from .base import Parsed, dig, headline_items
from .snapshot import snapshot_items

__all__ = ["Message", "read_message"]

ERROR_TEXT = ("msg", "message", "error", "reason", "description")  # where an error message says what is wrong


@dataclass
class Message:
    parsed: Parsed = field(default_factory=Parsed)  # the items of its data elements
    data: int = 0  # data elements
    control: int = 0  # control and heartbeat elements
    error: str | None = None  # the upstream said something is wrong (the first error element)
    resume: Any = None  # the last value of ``resume.field`` in a data element
    over: int = 0  # data elements past the budget: not read, dropped


def read_message(raw: bytes | str, provider: ProviderSettings, budget: int | None = None) -> Message:
    """``budget``: how many items may still be taken (the provider's rate); the data elements
    past it are counted in ``over`` and not read, so a batch of 100,000 costs little more than
    telling them apart."""
    message = Message()
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        message.parsed.skip("a message that is not JSON")
        return message
    for element in document if isinstance(document, list) else [document]:
        if provider.error and _matches(element, provider.error):
            message.error = message.error or _error_text(element)
        elif _matches(element, provider.where):
            message.data += 1
            if budget is not None and len(message.parsed.items) >= budget:
                message.over += 1
                continue
            _read_data(element, provider, message)
        else:
            message.control += 1
    return message


def _read_data(element: Any, provider: ProviderSettings, message: Message) -> None:
    parsed = message.parsed
    if provider.resume is not None and (mark := dig(element, provider.resume.field)) is not None:
        message.resume = mark
    if provider.format == "snapshot":
        try:
            snapshot_items(element, provider, parsed)
        except UpstreamError as exc:  # a data message without the value: skipped, like a malformed item
            parsed.skip(exc.message)
        return
    items = dig(element, provider.items)
    if isinstance(items, dict):
        items = [items]  # one item per message, the usual push shape
    if not isinstance(items, list):
        parsed.skip(f"items: expected an object or a list at {provider.items!r}, found {type(items).__name__}")
        return
    fields = dict(provider.fields)
    fields.setdefault("id", provider.id)
    source = provider.source or provider.name
    headline_items(items, provider=provider.name, fields=fields, source=source, topic=provider.topic, parsed=parsed)


def _matches(element: Any, pairs: tuple[tuple[str, Any], ...]) -> bool:
    return all(dig(element, path) == value for path, value in pairs)


def _error_text(element: Any) -> str:
    if isinstance(element, dict):
        for name in ERROR_TEXT:
            if isinstance(text := element.get(name), str) and text:
                code = element.get("code")
                return f"{text} (code {code})" if isinstance(code, int | str) and code != "" else text
    return orjson.dumps(element).decode()[:200]
