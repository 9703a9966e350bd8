"""One exception tree for everything a user (or an upstream) can get wrong.

    StreamError                     code            HTTP
    ├── BadRequest                  bad_request     400
    │   ├── BadTopic                bad_topic       400
    │   └── TooManySubscriptions    too_many_subscriptions 400
    ├── Unauthorized                unauthorized    401
    ├── Forbidden                   forbidden       403
    ├── NotFound                    not_found       404
    ├── PayloadTooLarge             payload_too_large 413
    ├── ValidationFailed            validation_error 422
    ├── HeadTimeout                 head_timeout    408
    ├── HeadTooLarge                head_too_large  431
    ├── LeaseLost                   lease_lost      409 (a provider's publish after its lease moved on;
    │                                                    the poller's, never a client's)
    ├── RateLimited                 rate_limited    429 (a RetryLater: with Retry-After)
    ├── Unavailable                 not_ready / over_capacity 503
    │   └── BrokerUnavailable       broker_unavailable 503 (also a RetryLater)
    └── TooManyTopics               too_many_topics 507
    ConfigError                     (not a request error: `stream check` / startup)
    UpstreamError                   (a provider's upstream misbehaved; kind = poll outcome)

Every error carries a stable ``code`` and a message that names the field at fault. Foreign
exceptions (orjson, pydantic, websockets, redis) are translated into these where they enter.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "BadTopic",
    "BrokerUnavailable",
    "ConfigError",
    "Forbidden",
    "HeadTimeout",
    "HeadTooLarge",
    "LeaseLost",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RetryLater",
    "StreamError",
    "TooManySubscriptions",
    "TooManyTopics",
    "Unauthorized",
    "Unavailable",
    "UpstreamError",
    "ValidationFailed",
]


class StreamError(Exception):
    """A request the service refuses; ``code`` and ``status`` are part of the protocol."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(StreamError):
    code = "bad_request"
    status = 400


class BadTopic(BadRequest):
    code = "bad_topic"


class TooManySubscriptions(BadRequest):
    code = "too_many_subscriptions"


class Unauthorized(StreamError):
    code = "unauthorized"
    status = 401


class Forbidden(StreamError):
    code = "forbidden"
    status = 403


class NotFound(StreamError):
    code = "not_found"
    status = 404


class PayloadTooLarge(StreamError):
    code = "payload_too_large"
    status = 413


class ValidationFailed(StreamError):
    code = "validation_error"
    status = 422


class HeadTimeout(StreamError):
    code = "head_timeout"
    status = 408


class HeadTooLarge(StreamError):
    code = "head_too_large"
    status = 431


class LeaseLost(StreamError):
    """A provider's publish (or save) carried the fence of a lease another node has taken since:
    refused, so a node that lost its lease mid-poll never publishes what the new holder does."""

    code = "lease_lost"
    status = 409


class RetryLater(StreamError):
    """Refused for now: the answer says when to try again (``Retry-After``, seconds)."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    code = "rate_limited"
    status = 429


class Unavailable(StreamError):
    code = "not_ready"
    status = 503


class BrokerUnavailable(Unavailable, RetryLater):
    """The broker (Redis) cannot be reached: a publish is refused, never half accepted."""

    code = "broker_unavailable"


class TooManyTopics(StreamError):
    """A publish would create a retained topic past ``max_topics`` (507 Insufficient Storage)."""

    code = "too_many_topics"
    status = 507


class ConfigError(Exception):
    """The configuration is wrong; ``problems`` holds one line per mistake, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UpstreamError(Exception):
    """An upstream HTTP provider failed one poll. Raised by the poller (which translates httpx
    errors) and by parsers; never reaches a client. ``kind`` is the poll outcome in metrics:
    connect, timeout, status, rate_limited, too_large, empty, bad_body."""

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
