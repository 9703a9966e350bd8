"""The HTTP API (SPEC §3) and the ``/sse`` entry point: routes only.

Each route checks its input, asks the hub, and shapes the answer; errors are StreamErrors,
which the app turns into ``{"error": {"code", "message"}}`` with the matching status.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
from fastapi import APIRouter, Request, Response

from ..auth import bearer_token
from ..errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    RetryLater,
    StreamError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from ..events import Event, parse_since
from ..hub import Draft
from ..runtime import Runtime
from ..topics import parse_pattern_list, validate_topic
from .params import check_origin, parse_symbols, subscribe_request
from .sse import EventStream, retry_later

__all__ = ["Gate", "error_parts", "router"]

# /api/topics answers at most this many topics per request, and examines at most TOPICS_SCAN
# retained topics to find them (a caller allowed to see few topics gets short pages).
TOPICS_PAGE = 1000
TOPICS_SCAN = 10 * TOPICS_PAGE
# Longest decimal Content-Length we parse: anything longer is over every body limit anyway.
_MAX_LENGTH_DIGITS = 18

log = logging.getLogger("stream.http")

router = APIRouter()


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _runtime(request: Request) -> Runtime:
    return request.state.stream


def _principal(request: Request, runtime: Runtime):
    token = bearer_token(request.headers.get("authorization"), request.query_params.get("token"))
    return runtime.auth.identify(token)


@router.get("/healthz", tags=["operations"])
async def healthz() -> JSON:
    """200 while the process serves."""
    return JSON({"status": "ok"})


@router.get("/readyz", tags=["operations"])
async def readyz(request: Request) -> JSON:
    """200 when the hub and its broker are usable, else 503 with the reason."""
    problem = _runtime(request).problem()
    if problem is not None:
        raise Unavailable(f"not ready: {problem}")
    return JSON({"status": "ready"})


def _need_credentials(request: Request, runtime: Runtime, public: bool, what: str) -> None:
    """Endpoints an operator may close to the public (``metrics_public``, ``providers_public``)."""
    if not public and _principal(request, runtime) is None:
        raise Unauthorized(f"Authorization: {what} needs a key or token (Authorization: Bearer …)")


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    runtime = _runtime(request)
    _need_credentials(request, runtime, runtime.settings.server.metrics_public, "/metrics")
    return Response(await request.state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _event_dict(event: Event) -> dict[str, Any]:
    return event.to_dict()


@router.get("/api/topics", tags=["api"])
async def topics(request: Request) -> JSON:
    """Topics with a retained value the caller may read, sorted, with last id, time and
    subscribers; at most ``limit`` per answer, and a ``Link: <…>; rel="next"`` header while more remain."""
    runtime = _runtime(request)
    hub, auth = runtime.hub, runtime.auth
    principal = _principal(request, runtime)
    limit = _int_param(request, "limit", TOPICS_PAGE, 1, TOPICS_PAGE)
    after = request.query_params.get("cursor") or ""
    names, more = hub.store.topics_after(after, TOPICS_SCAN)
    page = []
    last = after
    for name in names:
        last = name
        if auth.may_subscribe(principal, name):
            event = hub.store.retained[name]
            page.append({"topic": name, "last_id": event.id, "last_ts": event.ts, "subscribers": hub.subscriber_count(name)})
            if len(page) >= limit:
                more = more or name != names[-1]
                break
    headers = {}
    if more:
        headers["Link"] = f'</api/topics?cursor={quote(last, safe="")}&limit={limit}>; rel="next"'
    return JSON(page, headers=headers)


@router.get("/api/topics/{topic}", tags=["api"])
async def topic(topic: str, request: Request) -> Response:
    """The retained (latest) event of one topic."""
    runtime = _runtime(request)
    validate_topic(topic, "topic")
    runtime.auth.check_subscribe(_principal(request, runtime), [topic], "topic")
    event = runtime.hub.store.retained.get(topic)
    if event is None:
        raise NotFound(f"topic: {topic!r} has no retained value")
    return Response(event.json, media_type="application/json")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) > 12:
            raise ValueError
        value = int(raw)
    except ValueError:
        raise ValidationFailed(f"{name}: expected an integer {low}-{high}, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ValidationFailed(f"{name}: expected an integer {low}-{high}, got {value}")
    return value


@router.get("/api/events", tags=["api"])
async def events(request: Request) -> Response:
    """History after ``since`` (or the latest events), long-polling up to ``wait`` seconds."""
    runtime = _runtime(request)
    params = request.query_params
    patterns = parse_pattern_list(params.get("topics") or ">", "topics", limit=runtime.settings.server.max_patterns)
    runtime.auth.check_subscribe(_principal(request, runtime), patterns)
    since_text = params.get("since")
    since = parse_since(since_text) if since_text else None
    limit = _int_param(request, "limit", 100, 1, 1000)
    wait = _int_param(request, "wait", 0, 0, 60)
    symbols = parse_symbols(params.get("symbols"))
    hub = runtime.hub
    found, position, gap = hub.reader.read(patterns, since, limit, symbols)
    if not found and not gap and wait:
        cursor = parse_since(position)
        # A long-poll ends when its socket does: what it subscribed to is not held for `wait`
        # seconds after the client left.
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await hub.wait(patterns, cursor, wait, symbols, until=gone)
        finally:
            gone.cancel()
        if gone.done() and not gone.cancelled():
            return Response(status_code=499)  # nobody to answer; uvicorn drops it (the socket is gone)
        found, position, gap = hub.reader.read(patterns, cursor, limit, symbols)
    # The events' own JSON, spliced in: no decode and re-encode of every event per request.
    body = b'{"events":[%s],"next":"%s","gap":%s}' % (
        b",".join(event.json for event in found),
        position.encode(),
        b"true" if gap else b"false",
    )
    return Response(body, media_type="application/json")


async def _disconnected(receive: Any) -> None:
    """Returns once the client has gone (ASGI http.disconnect); a GET's body is read on the way."""
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get("/api/providers", tags=["api"])
async def providers(request: Request) -> JSON:
    """Poller status, one object per provider."""
    runtime = _runtime(request)
    _need_credentials(request, runtime, runtime.settings.server.providers_public, "/api/providers")
    return JSON(runtime.pollers.statuses())


@router.get("/api/news", tags=["api"])
async def news(request: Request) -> JSON:
    """Latest headlines across news providers, newest first, from what the hub published."""
    runtime = _runtime(request)
    params = request.query_params
    limit = _int_param(request, "limit", 50, 1, 500)
    symbols = parse_symbols(params.get("symbols"))
    words = (params.get("q") or "").strip() or None
    principal = _principal(request, runtime)
    found = runtime.pollers.news(limit, symbols, words, lambda event: runtime.auth.may_subscribe(principal, event.topic))
    return JSON({"headlines": [_event_dict(event) for event in found]})


def _check_length(declared: str | None, limit: int) -> None:
    if declared and declared.isdigit() and (len(declared) > _MAX_LENGTH_DIGITS or int(declared) > limit):
        raise PayloadTooLarge(f"body: Content-Length {declared[:40]} is over the {limit}-byte limit")


@router.post("/api/publish", status_code=202, tags=["api"])
async def publish(request: Request) -> Response:
    """Publish ``{"topic", "data"}`` or a list of them; 202 once accepted into history."""
    status, headers, body = await answer_publish(_runtime(request), request.scope, request.receive)
    return Response(body, status_code=status, headers={name.decode(): value.decode() for name, value in headers})


async def answer_publish(runtime: Runtime, scope: Any, receive: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The one publish path, for the route and for ``Gate``: credentials, body, validation,
    publish; the answer as (status, headers, body), errors in the one error shape."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name, value)  # the first of repeated headers, as Starlette reads them
    try:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        principal = runtime.auth.identify(bearer_token(authorization, (query.get("token") or [None])[-1]))
        runtime.auth.check_may_publish(principal)
    except StreamError as exc:
        # Answered from the head alone, and the socket closed: its body is never read.
        status, response_headers, payload = error_parts(exc)
        return status, [*response_headers, (b"connection", b"close")], payload
    try:
        body = await _read(receive, headers.get(b"content-length", b""), runtime.settings.server.max_batch_bytes)
        ids = await publish_body(runtime, principal, body)
    except StreamError as exc:
        return error_parts(exc)
    except Exception:
        log.exception("publish failed")
        return error_parts(StreamError("internal error; it has been logged"))
    return 202, [(b"content-type", b"application/json")], orjson.dumps({"ids": ids})


async def publish_body(runtime: Runtime, principal: Any, body: bytes) -> list[str]:
    """Validate a publish body whole, then publish it; the ids of the accepted events."""
    server = runtime.settings.server
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if isinstance(document, dict):
        items = [document]
    elif isinstance(document, list):
        if not document:
            raise ValidationFailed("body: an empty list publishes nothing; send at least one event")
        if len(document) > server.max_batch_events:
            raise ValidationFailed(f"body: a batch holds at most {server.max_batch_events} events, got {len(document)}")
        items = document
    else:
        raise ValidationFailed('body: expected {"topic": ..., "data": ...} or a list of them')
    drafts: list[Draft] = []
    hub = runtime.hub
    for index, item in enumerate(items):
        where = "body" if isinstance(document, dict) else f"body[{index}]"
        if not isinstance(item, dict):
            raise ValidationFailed(f'{where}: expected an object {{"topic": ..., "data": ...}}')
        for name in ("topic", "data"):
            if name not in item:
                raise ValidationFailed(f"{where}.{name}: required")
        extra = set(item) - {"topic", "data"}
        if extra:
            raise ValidationFailed(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        draft = hub.draft(item["topic"], item["data"], field=f"{where}.topic")
        runtime.auth.check_publish(principal, draft.topic, f"{where}.topic")
        drafts.append(draft)
    charge = runtime.publish_charge(principal, len(drafts))
    return [event.id for event in await hub.publish_many(drafts, charge=charge)]


def error_parts(exc: StreamError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A StreamError as (status, headers, body) in the one error shape of SPEC §3."""
    headers = [(b"content-type", b"application/json")]
    if isinstance(exc, RetryLater):
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    return exc.status, headers, orjson.dumps({"error": exc.to_dict()})


# Answered even on a socket past the connection limits: monitoring must see the process.
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
# Requests a trusted proxy forwards are counted per client by Gate, but for these: health checks
# (never refused) and /sse (counted as a stream by Runtime.admit).
_COUNTED_ELSEWHERE = _HEALTH_PATHS | {"/sse"}


class Gate:
    """The ASGI entry point in front of the app.

    1. A socket past the connection limits (``HttpProtocol.over_capacity``) gets its answer
       here, before any routing: ``/sse`` 200 with a ``retry:`` hint and an immediate end (a
       non-200 would stop EventSource for good), health checks their normal answer, anything
       else 503 with ``Retry-After``; each then closes the socket.
    2. ``POST /api/publish`` is served without FastAPI's routing and middleware, which cost more
       than the fan-out itself (~1 ms of CPU per request on the bench machine). Same code
       (``publish_body``), same answers; requests with an ``Origin`` (browsers, CORS) and
       everything else go to the app.
    """

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        protocol = scope.get("extensions", {}).get("stream.http")
        if protocol is not None and protocol.over_capacity:
            return await self._over_capacity(scope, receive, send)
        if protocol is not None and protocol.via_proxy and scope["path"] not in _COUNTED_ELSEWHERE:
            return await self._forwarded(scope, receive, send)
        return await self._route(scope, receive, send)

    async def _forwarded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A request a trusted proxy forwarded counts against its client's per-client limit
        while it runs, as the client's own socket would (a long-poll for its whole wait)."""
        runtime = self.runtime
        host = scope["client"][0] if scope.get("client") else ""
        group = runtime.group(host)
        try:
            runtime.enter_forwarded(group, host)
        except Unavailable as exc:
            status, headers, payload = error_parts(exc)
            headers += [(b"retry-after", b"%d" % max(1, runtime.settings.server.sse_retry // 1000)), (b"content-length", b"%d" % len(payload))]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        try:
            await self._route(scope, receive, send)
        finally:
            runtime.leave_forwarded(group)

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] != "/api/publish" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if any(name == b"origin" for name, _ in scope["headers"]):
            return await self.app(scope, receive, send)  # browsers: the app's CORS middleware
        status, response_headers, payload = await answer_publish(self.runtime, scope, receive)
        response_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})

    async def _over_capacity(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if scope["path"] in _HEALTH_PATHS:
            return await self.app(scope, receive, closing)
        server = self.runtime.settings.server
        exc = Unavailable("over capacity: too many connections; retry later", code="over_capacity")
        if scope["path"] == "/sse":
            body = retry_later(server.sse_retry, exc.message)
            await closing({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        status, headers, payload = error_parts(exc)
        headers += [(b"retry-after", b"%d" % max(1, server.sse_retry // 1000)), (b"content-length", b"%d" % len(payload))]
        await closing({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read(receive: Any, declared: bytes, limit: int) -> bytes:
    _check_length(declared.decode("latin-1"), limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BadRequest("body: the client went away before sending it")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body: over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


@router.get("/sse", tags=["streaming"], status_code=200, response_model=None, response_class=EventStream)
async def sse(request: Request) -> EventStream:
    """Server-Sent Events: ``topics`` patterns, ``since`` / ``Last-Event-ID``, ``snapshot``, ``symbols``."""
    runtime = _runtime(request)
    check_origin(request.headers.get("origin"), runtime.settings.server.allowed_origins)
    principal = _principal(request, runtime)
    params = dict(request.query_params)
    subscription = subscribe_request(params, since_override=request.headers.get("last-event-id"), max_patterns=runtime.settings.server.max_patterns)
    runtime.auth.check_subscribe(principal, subscription.topics)
    runtime.hub.reader.resolve(subscription.since)  # a since from the future is a 400 before streaming
    client = request.client.host if request.client else ""  # behind a trusted proxy, the forwarded client
    protocol = request.scope.get("extensions", {}).get("stream.http")
    return EventStream(runtime, subscription, principal, client, forwarded=bool(protocol and protocol.via_proxy))
