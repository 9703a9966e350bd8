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
from typing import Any

import jwt

from .errors import BadTopic, Forbidden, Unauthorized
from .settings import KeySettings, PublicKey, ServerSettings
from .topics import covers, validate_pattern

__all__ = ["Auth", "Principal", "bearer_token", "mint_token"]


LEEWAY = 10.0  # seconds of clock skew tolerated on a JWT's exp, nbf and iat


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a configured key, or the subject of a JWT."""

    name: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    max_connections: int | None = None
    publish_rate: float | None = None
    publish_burst: int | None = None
    kind: str = "key"  # "key" or "token" (a JWT, named by its sub)
    expires: float | None = None  # Unix time when a JWT's rights end (exp + LEEWAY); None for keys


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Auth:
    def __init__(self, keys: tuple[KeySettings, ...], server: ServerSettings, public_key: PublicKey | None = None) -> None:
        self.public = server.public
        self._by_digest = {
            _digest(k.key): Principal(k.name, k.subscribe, k.publish, k.max_connections, k.publish_rate, k.publish_burst)
            for k in keys
        }
        # One verifying key per accepted algorithm, chosen by the token's own "alg": a token can
        # never get its HS256 signature checked against the public key, or the other way round.
        self._verifiers: dict[str, Any] = {}
        if server.jwt_secret:
            self._verifiers["HS256"] = server.jwt_secret
        if public_key is not None:
            self._verifiers[public_key.algorithm] = public_key.key
        self.audience = server.jwt_audience
        self.issuer = server.jwt_issuer
        self.max_ttl = server.jwt_max_ttl or None
        # A JWT may carry publish rights, so with JWTs configured publishing is not off.
        self.can_anyone_publish = any(k.publish for k in keys) or bool(self._verifiers)

    def identify(self, token: str | None) -> Principal | None:
        """The caller behind ``token`` (None when anonymous); an unknown or bad token is a 401."""
        if not token:
            return None
        principal = self._by_digest.get(_digest(token))
        if principal is not None:
            return principal
        if self._verifiers and token.count(".") == 2:
            return self._from_jwt(token)
        raise Unauthorized("token: not a known key" + (" or a valid JWT" if self._verifiers else ""))

    def _from_jwt(self, token: str) -> Principal:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise Unauthorized("token: not a known key or a valid JWT") from None
        if not isinstance(algorithm, str):
            raise Unauthorized("token: a JWT without an algorithm (alg) is not accepted")
        key = self._verifiers.get(algorithm)
        if key is None:
            accepted = ", ".join(self._verifiers)
            raise Unauthorized(f"token: JWT algorithm {algorithm!r} is not accepted here (accepted: {accepted})")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["sub", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token: {_jwt_problem(exc, self.audience)}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("token: claim 'sub' must be a non-empty string")
        if self.max_ttl is not None and claims["exp"] > time.time() + self.max_ttl + LEEWAY:
            # A stolen token must not stay good for years: the issuer cannot revoke it.
            raise Unauthorized(f"token: exp lies more than {self.max_ttl:g} s ahead (jwt_max_ttl); get one that expires sooner")
        return Principal(
            subject,
            _claimed_patterns(claims, "subscribe"),
            _claimed_patterns(claims, "publish"),
            kind="token",
            expires=float(min(claims["exp"], _FAR_FUTURE)) + LEEWAY,  # as jwt.decode judged it
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
                raise Forbidden(f"{field}: {principal.kind} {principal.name!r} may not subscribe to {pattern!r}")

    def check_may_publish(self, principal: Principal | None) -> None:
        """Whether ``principal`` may publish anything at all: checked from a request's head,
        before its body is read (an anonymous client must not make the server hold a body)."""
        if not self.can_anyone_publish:
            raise Forbidden("publishing is disabled: no key with publish rights is configured ([[keys]] publish)")
        if principal is None:
            raise Unauthorized("publishing needs a key or token: send Authorization: Bearer <key or token>")
        if not principal.publish:
            raise Forbidden(f"{principal.kind} {principal.name!r} may not publish")

    def check_publish(self, principal: Principal | None, topic: str, field: str = "topic") -> None:
        self.check_may_publish(principal)
        assert principal is not None
        if not any(covers(granted, topic) for granted in principal.publish):
            raise Forbidden(f"{field}: {principal.kind} {principal.name!r} may not publish to {topic!r}")


_FAR_FUTURE = 4_102_444_800  # 2100-01-01: an exp past this is treated as this


def _jwt_problem(exc: jwt.PyJWTError, audience: str | None) -> str:
    """What is wrong with a JWT, for the 401 message (never the token itself)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired; get a fresh one"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the JWT has no {exc.claim!r} claim"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not valid yet (nbf or iat in the future)"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature: not signed with the configured key"
    if isinstance(exc, jwt.InvalidAudienceError):
        if audience is None:
            return "the JWT has an 'aud' claim; set server.jwt_audience to accept it"
        return f"claim 'aud' does not include {audience!r}"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "claim 'iss' is not the configured jwt_issuer"
    return f"not a valid JWT ({exc})"


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


def mint_token(secret: str, subject: str, subscribe: list[str], publish: list[str], ttl: float) -> tuple[str, int]:
    """An HS256 JWT for ``subject`` with these rights, valid for ``ttl`` seconds (``stream token``),
    and its ``exp``."""
    now = int(time.time())
    expires = now + max(1, round(ttl))
    claims = {"sub": subject, "iat": now, "exp": expires, "subscribe": subscribe, "publish": publish}
    return jwt.encode(claims, secret, algorithm="HS256"), expires


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token from ``Authorization: Bearer …`` or else from ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None
