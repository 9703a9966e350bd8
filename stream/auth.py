"""Who may subscribe to and publish on which topics: API keys, JWTs and public patterns.

A key's secret is kept only as a SHA-256 digest. A JWT (SPEC §6) is checked with PyJWT against
``jwt_secret`` (HS256) or ``jwt_public_key`` (RS256 / ES256); its ``subscribe`` and ``publish``
claims are pattern lists like a key's, and its ``exp`` ends the connections it opened.
Permissions are patterns: a request for a pattern is allowed when one granted pattern covers it
(``topics.covers``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from .errors import BadTopic, Forbidden, Unauthorized
from .settings import KeySettings, ServerSettings
from .topics import covers, validate_pattern

__all__ = ["Auth", "Principal", "bearer_token", "mint_token"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    max_connections: int | None = None
    publish_rate: float | None = None
    publish_burst: int | None = None
    expires: float | None = None  # Unix time when a JWT's rights end; None for keys


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Auth:
    def __init__(self, keys: tuple[KeySettings, ...], server: ServerSettings) -> None:
        self.public = server.public
        self._by_digest = {
            _digest(k.key): Principal(k.name, k.subscribe, k.publish, k.max_connections, k.publish_rate, k.publish_burst)
            for k in keys
        }
        self._jwt_keys: list[tuple[Any, list[str]]] = []
        if server.jwt_secret:
            self._jwt_keys.append((server.jwt_secret, ["HS256"]))
        if server.jwt_public_key:
            self._jwt_keys.append(_public_key(server.jwt_public_key))
        # A JWT may carry publish rights, so with JWTs configured publishing is not off.
        self.can_anyone_publish = any(k.publish for k in keys) or bool(self._jwt_keys)

    def identify(self, token: str | None) -> Principal | None:
        """The caller behind ``token`` (None when anonymous); an unknown or bad token is a 401."""
        if not token:
            return None
        principal = self._by_digest.get(_digest(token))
        if principal is not None:
            return principal
        if self._jwt_keys and token.count(".") == 2:
            return self._from_jwt(token)
        raise Unauthorized("token: not a known key" + (" or a valid JWT" if self._jwt_keys else ""))

    def _from_jwt(self, token: str) -> Principal:
        claims: dict[str, Any] | None = None
        for key, algorithms in self._jwt_keys:
            try:
                claims = jwt.decode(token, key, algorithms=algorithms, options={"require": ["sub", "exp"]})
                break
            except jwt.ExpiredSignatureError:
                raise Unauthorized("token: expired; get a fresh one") from None
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthorized(f"token: the JWT has no {exc.claim!r} claim") from None
            except jwt.ImmatureSignatureError:
                raise Unauthorized("token: not valid yet (nbf/iat in the future)") from None
            except jwt.InvalidTokenError:
                continue  # bad signature or another algorithm: try the next key
        if claims is None:
            raise Unauthorized("token: not a JWT signed with the configured key (or a bad signature)")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("token: claim 'sub' must be a non-empty string")
        return Principal(
            f"jwt:{subject}",
            _claimed_patterns(claims, "subscribe"),
            _claimed_patterns(claims, "publish"),
            expires=float(claims["exp"]),
        )

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
            raise Unauthorized("publishing needs a key or token: send Authorization: Bearer <key or token>")
        if not any(covers(granted, topic) for granted in principal.publish):
            raise Forbidden(f"{field}: key {principal.name!r} may not publish to {topic!r}")


def _public_key(path: str) -> tuple[Any, list[str]]:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(Path(path).read_bytes())  # checked by settings.public_key_problem
    return key, ["RS256"] if isinstance(key, rsa.RSAPublicKey) else ["ES256"]


def _claimed_patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Unauthorized(f"token: claim {name!r} must be a list of topic patterns")
    for pattern in value:
        try:
            validate_pattern(pattern, f"token claim {name!r}")
        except BadTopic as exc:
            raise Unauthorized(f"token: {exc.message}") from None
    return tuple(value)


def mint_token(secret: str, subject: str, subscribe: list[str], publish: list[str], ttl: float) -> str:
    """An HS256 JWT for ``subject`` with these rights, valid for ``ttl`` seconds (``stream token``)."""
    now = int(time.time())
    claims = {"sub": subject, "iat": now, "exp": now + int(ttl), "subscribe": subscribe, "publish": publish}
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from ``Authorization: Bearer …`` or else from ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None
