"""``snapshot``: a JSON document whose value (or each keyed part of it) is state. Pure.

Without ``split`` the whole value is one item; with ``split`` every key of a mapping (or every
entry of a list, keyed by ``key``) is its own item and topic (``quotes.{key}``). The poller
publishes only the values that changed.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadTopic
from ..provider_settings import ProviderSettings
from .base import Item, Parsed, bad_body, dig, render_topic
from .json import load_json

__all__ = ["parse_snapshot", "snapshot_items"]


def parse_snapshot(body: bytes, provider: ProviderSettings) -> Parsed:
    parsed = Parsed()
    snapshot_items(load_json(body), provider, parsed)
    return parsed


def snapshot_items(document: Any, provider: ProviderSettings, parsed: Parsed) -> None:
    """The values of ``document`` (at ``path``, split by ``split``) into ``parsed.items``."""
    value = dig(document, provider.path)
    if value is None:
        raise bad_body(f"path: nothing at {provider.path!r}" if provider.path else "the document is null")
    if provider.split is None:
        _add(parsed, provider, "", value)
        return
    container = dig(value, provider.split)
    if isinstance(container, dict):
        pairs = list(container.items())
    elif isinstance(container, list):
        if not provider.key:
            raise bad_body("split: found a list; set `key` to the field that names each entry")
        pairs = []
        for entry in container:
            key = dig(entry, provider.key) if isinstance(entry, dict) else None
            if key is None or isinstance(key, (dict, list)):
                parsed.skip(f"entry without {provider.key!r}")
                continue
            pairs.append((str(key), entry))
    else:
        found = "nothing" if container is None else type(container).__name__
        raise bad_body(f"split: expected a mapping or a list at {provider.split!r}, found {found}")
    for key, entry in pairs:
        _add(parsed, provider, str(key), entry)


def _add(parsed: Parsed, provider: ProviderSettings, key: str, value: Any) -> None:
    values = dict(value) if isinstance(value, dict) else {}
    values.update(key=key, name=provider.name, provider=provider.name)
    try:
        topic = render_topic(provider.topic, values)
    except BadTopic as exc:
        parsed.skip(exc.message)
        return
    parsed.items.append(Item(key, topic, value))
