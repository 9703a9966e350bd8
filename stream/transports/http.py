"""The HTTP API (SPEC §3) and the ``/sse`` entry point: routes only.

Each route checks its input, asks the hub, and shapes the answer; errors are StreamErrors,
which the app turns into ``{"error": {"code", "message"}}`` with the matching status.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from ..auth import bearer_token
from ..errors import BadRequest, NotFound, PayloadTooLarge, TooManySubscriptions, Unavailable, ValidationFailed
from ..events import Event, parse_since
from ..hub import Draft
from ..runtime import Runtime
from ..topics import parse_pattern_list, validate_topic
from .params import check_origin, parse_symbols, subscribe_request
from .sse import EventStream

__all__ = ["router"]

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


def _check_pattern_count(runtime: Runtime, patterns: list[str]) -> None:
    limit = runtime.settings.server.max_patterns
    if len(patterns) > limit:
        raise TooManySubscriptions(f"topics: at most {limit} patterns per request, got {len(patterns)}")


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


@router.get("/metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _event_dict(event: Event) -> dict[str, Any]:
    return event.to_dict()


@router.get("/api/topics", tags=["api"])
async def topics(request: Request) -> JSON:
    """Every topic with a retained value the caller may read, with its last id, time and subscribers."""
    runtime = _runtime(request)
    hub, auth = runtime.hub, runtime.auth
    principal = _principal(request, runtime)
    return JSON(
        [
            {"topic": t, "last_id": e.id, "last_ts": e.ts, "subscribers": hub.subscriber_count(t)}
            for t, e in sorted(hub.retained.items())
            if auth.may_subscribe(principal, t)
        ]
    )


@router.get("/api/topics/{topic}", tags=["api"])
async def topic(topic: str, request: Request) -> JSON:
    """The retained (latest) event of one topic."""
    runtime = _runtime(request)
    validate_topic(topic, "topic")
    runtime.auth.check_subscribe(_principal(request, runtime), [topic], "topic")
    event = runtime.hub.retained.get(topic)
    if event is None:
        raise NotFound(f"topic: {topic!r} has no retained value")
    return JSON(_event_dict(event))


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed(f"{name}: expected an integer {low}-{high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ValidationFailed(f"{name}: expected an integer {low}-{high}, got {value}")
    return value


@router.get("/api/events", tags=["api"])
async def events(request: Request) -> JSON:
    """History after ``since`` (or the latest events), long-polling up to ``wait`` seconds."""
    runtime = _runtime(request)
    params = request.query_params
    patterns = parse_pattern_list(params.get("topics") or ">", "topics")
    _check_pattern_count(runtime, patterns)
    runtime.auth.check_subscribe(_principal(request, runtime), patterns)
    since_text = params.get("since")
    since = parse_since(since_text) if since_text else None
    limit = _int_param(request, "limit", 100, 1, 1000)
    wait = _int_param(request, "wait", 0, 0, 60)
    symbols = parse_symbols(params.get("symbols"))
    hub = runtime.hub
    found, position, gap = hub.read(patterns, since, limit, symbols)
    if not found and not gap and wait:
        cursor = parse_since(position)
        await hub.wait(patterns, cursor, wait, symbols)
        found, position, gap = hub.read(patterns, cursor, limit, symbols)
    return JSON({"events": [_event_dict(e) for e in found], "next": position, "gap": gap})


@router.get("/api/providers", tags=["api"])
async def providers(request: Request) -> JSON:
    """Poller status, one object per provider."""
    return JSON(_runtime(request).pollers.statuses())


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


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: {declared} bytes, over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body: over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/api/publish", status_code=202, tags=["api"])
async def publish(request: Request) -> JSON:
    """Publish ``{"topic", "data"}`` or a list of them; 202 once accepted into history."""
    runtime = _runtime(request)
    server = runtime.settings.server
    principal = _principal(request, runtime)
    body = await _body(request, server.max_batch_bytes)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if isinstance(document, dict):
        items, prefix = [document], "body"
    elif isinstance(document, list):
        if not document:
            raise ValidationFailed("body: an empty list publishes nothing; send at least one event")
        if len(document) > server.max_batch_events:
            raise ValidationFailed(
                f"body: a batch holds at most {server.max_batch_events} events, got {len(document)}"
            )
        items, prefix = document, "body"
    else:
        raise ValidationFailed('body: expected {"topic": ..., "data": ...} or a list of them')
    drafts: list[Draft] = []
    hub = runtime.hub
    for index, item in enumerate(items):
        where = prefix if isinstance(document, dict) else f"{prefix}[{index}]"
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
    runtime.charge_publish(principal, len(drafts))
    accepted = await hub.publish_many(drafts)
    return JSON({"ids": [event.id for event in accepted]}, status_code=202)


@router.get("/sse", tags=["streaming"], status_code=200, response_model=None, response_class=EventStream)
async def sse(request: Request) -> EventStream:
    """Server-Sent Events: ``topics`` patterns, ``since`` / ``Last-Event-ID``, ``snapshot``, ``symbols``."""
    runtime = _runtime(request)
    check_origin(request.headers.get("origin"), runtime.settings.server.allowed_origins)
    principal = _principal(request, runtime)
    params = dict(request.query_params)
    subscription = subscribe_request(params, since_override=request.headers.get("last-event-id"))
    runtime.auth.check_subscribe(principal, subscription.topics)
    _check_pattern_count(runtime, subscription.topics)
    runtime.hub.resolve(subscription.since)  # a since from the future is a 400 before streaming
    client = request.client.host if request.client else ""
    return EventStream(runtime, subscription, principal, client)
