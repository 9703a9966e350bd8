"""Who may subscribe to and publish on which topics: API keys and public patterns.

A key's secret is kept only as a SHA-256 digest. Permissions are patterns: a request for a
pattern is allowed when one granted pattern covers it (``topics.covers``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import Forbidden, Unauthorized
from .settings import KeySettings
from .topics import covers

__all__ = ["Auth", "Principal", "bearer_token"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    max_connections: int | None = None
    publish_rate: float | None = None
    publish_burst: int | None = None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Auth:
    def __init__(self, keys: tuple[KeySettings, ...], public: tuple[str, ...]) -> None:
        self.public = public
        self._by_digest = {
            _digest(k.key): Principal(k.name, k.subscribe, k.publish, k.max_connections, k.publish_rate, k.publish_burst)
            for k in keys
        }
        self.can_anyone_publish = any(k.publish for k in keys)

    def identify(self, token: str | None) -> Principal | None:
        """The caller behind ``token`` (None when anonymous); an unknown token is a 401."""
        if not token:
            return None
        principal = self._by_digest.get(_digest(token))
        if principal is None:
            raise Unauthorized("token: not a known key")
        return principal

    def may_subscribe(self, principal: Principal | None, pattern: str) -> bool:
        granted = self.public + (principal.subscribe if principal is not None else ())
        return any(covers(grant, pattern) for grant in granted)

    def check_subscribe(self, principal: Principal | None, patterns: list[str], field: str = "topics") -> None:
        for pattern in patterns:
            if any(covers(granted, pattern) for granted in self.public):
                continue
            if principal is None:
                raise Unauthorized(f"{field}: subscribing to {pattern!r} needs a key or token")
            if not any(covers(granted, pattern) for granted in principal.subscribe):
                raise Forbidden(f"{field}: key {principal.name!r} may not subscribe to {pattern!r}")

    def check_publish(self, principal: Principal | None, topic: str, field: str = "topic") -> None:
        if not self.can_anyone_publish:
            raise Forbidden("publishing is disabled: no key with publish rights is configured ([[keys]] publish)")
        if principal is None:
            raise Unauthorized("publishing needs a key: send Authorization: Bearer <key>")
        if not any(covers(granted, topic) for granted in principal.publish):
            raise Forbidden(f"{field}: key {principal.name!r} may not publish to {topic!r}")


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from ``Authorization: Bearer …`` or else from ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None
