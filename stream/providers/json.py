"""``json``: a JSON document holding a list of items, one headline per new item. Pure."""

from __future__ import annotations

import orjson

from ..provider_settings import ProviderSettings
from .base import Parsed, bad_body, dig, headline_items

__all__ = ["load_json", "parse_json"]


def load_json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        start = body.lstrip()[:100].lower()
        if start.startswith((b"<!doctype html", b"<html")):
            raise bad_body("an HTML page, not JSON") from None
        raise bad_body(f"malformed JSON: {exc}") from None


def parse_json(body: bytes, provider: ProviderSettings) -> Parsed:
    document = load_json(body)
    items = dig(document, provider.items)
    if not isinstance(items, list):
        where = f"at {provider.items!r}" if provider.items else "at the document root"
        found = "nothing" if items is None else type(items).__name__
        raise bad_body(f"items: expected a list {where}, found {found}")
    parsed = Parsed()
    fields = dict(provider.fields)
    fields.setdefault("id", provider.id)
    headline_items(
        items,
        provider=provider.name,
        fields=fields,
        source=provider.source or provider.name,
        topic=provider.topic,
        parsed=parsed,
    )
    return parsed
