"""Providers: turn an upstream body into items to publish. Pure: bytes in, items out.

``parse(provider, body, content_type=…, location=…)`` dispatches on the provider's kind and
raises ``UpstreamError("bad_body", …)`` for a document it cannot use.
"""

from __future__ import annotations

from ..provider_settings import ProviderSettings
from .base import Item, Parsed
from .demo import DemoMarket, parse_demo
from .feed import parse_feed
from .json import parse_json
from .snapshot import parse_snapshot

__all__ = ["DemoMarket", "Item", "Parsed", "parse"]


def parse(provider: ProviderSettings, body: bytes, *, content_type: str | None = None, location: str | None = None) -> Parsed:
    if provider.kind == "feed":
        return parse_feed(body, provider, content_type=content_type, location=location)
    if provider.kind == "json":
        return parse_json(body, provider)
    if provider.kind == "snapshot":
        return parse_snapshot(body, provider)
    return parse_demo(body, provider, content_type=content_type, location=location)
