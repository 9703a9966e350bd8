"""Composition root: ``build(settings)`` makes every part of one process, in one place.

    settings ─▶ Store ─▶ MemoryBroker | RedisBroker ─▶ Hub ◀─ Pollers (providers, Leases)
                                          │
          Metrics (hooks) ─▶ Runtime (connections, limits, auth) ─▶ FastAPI app ─▶ Gate (ASGI entry)

No other module constructs a hub, broker, poller set, auth or runtime. The lifespan starts the
runtime (hub, broker, heartbeat ticker) and publishes it, and the demo market, to every request
through the ASGI lifespan state; WebSocket connections find them the same way, through
uvicorn's ``app_state``. ``create_app(settings)`` is the same, for running under any ASGI server.
"""

from __future__ import annotations

import logging
import resource
import ssl
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from . import __version__
from .auth import Auth
from .errors import StreamError
from .hub import Broker, Hub, HubConfig, MemoryBroker, Policy
from .hub.store import Store
from .leases import Leases
from .limits import SocketLimits, TrustedProxies
from .metrics import Metrics
from .pollers import Pollers
from .providers import DemoMarket
from .runtime import Runtime
from .settings import Settings, load_settings
from .siblings import HostMetrics, Seat, SharedCounts
from .transports import demo
from .transports.http import Gate, error_parts, router

__all__ = ["Service", "build", "create_app"]

log = logging.getLogger("stream")

def _static_dir() -> Path:
    """The dashboard: inside the package when installed from a wheel (``stream/static``), at the
    top of the repository in a source checkout or an editable install."""
    here = Path(__file__).resolve().parent
    packaged = here / "static"
    return packaged if packaged.is_dir() else here.parent / "static"


STATIC = _static_dir()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _stream_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StreamError)
    status, headers, body = error_parts(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no such endpoint or file: {request.url.path}"
    return _error(exc.status_code, code, message, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body"))
    return _error(422, "validation_error", f"{field or 'request'}: {first.get('msg', 'invalid')}")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal", "internal error; it has been logged")


@dataclass(frozen=True)
class Service:
    """One process's parts, as ``build`` wired them."""

    settings: Settings
    runtime: Runtime
    metrics: Metrics
    app: FastAPI
    entry: Gate  # what the server runs: over-capacity answers and the publish path, then the app


def create_app(settings: Settings | None = None) -> FastAPI:
    return build(settings or load_settings()).app


def build(settings: Settings, seat: Seat | None = None, tls: ssl.SSLContext | None = None) -> Service:
    """Every part of one process; ``seat``: its place among the workers of a host (--workers),
    whose metrics and per-address counts it then shares; ``tls``: serve TLS itself (tls.py)."""
    server = settings.server
    metrics = Metrics()
    store = Store(server.history_size, server.history_ttl, server.history_bytes, server.max_topics)
    broker: Broker
    leases = Leases()
    if server.broker.startswith(("redis://", "rediss://")):
        from .hub.redis_broker import RedisBroker  # redis-py is loaded only for a Redis hub
        from .redis_leases import RedisLeases

        broker = RedisBroker(
            server.broker, store, history_size=server.history_size, history_ttl=server.history_ttl, timeout=server.redis_timeout
        )
        # A pool of their own, so publishes never delay a renewal: a keeper and a save per provider.
        pool = 2 * sum(1 for provider in settings.providers if provider.enabled) + 1
        leases = RedisLeases(broker.link.client(pool), broker.node, server.lease_ttl, server.redis_timeout, pool)
    else:
        broker = MemoryBroker(store)
    hub = Hub(_hub_config(settings), broker)
    hub.observe(metrics.fanned_out)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    pollers = Pollers(settings.providers, hub, on_poll=metrics.polled, on_lag=metrics.lagged, leases=leases)
    runtime = Runtime(
        settings,
        hub=hub,
        pollers=pollers,
        auth=Auth(settings.keys, server, settings.jwt_public_key),
        sockets=SocketLimits(
            server.max_connections,
            server.max_connections_per_client,
            server.fd_margin,
            1 << 20 if nofile == resource.RLIM_INFINITY else nofile,
            # Descriptors the process's own pools may hold come off the sockets' room first.
            reserved=pollers.connections + broker.connections + leases.connections,
            clients=SharedCounts(seat) if seat is not None else None,
        ),
        proxies=TrustedProxies(list(server.forwarded_allow_ips)),
        workers=seat.count if seat is not None else 1,
        tls=tls,
    )
    metrics.watch(runtime)
    if seat is not None:
        metrics.siblings = HostMetrics(seat, metrics.render)
    market = DemoMarket(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        if metrics.siblings is not None:
            await metrics.siblings.start()
        try:
            yield {"stream": runtime, "metrics": metrics, "demo": market}
        finally:
            await runtime.drain()
            await runtime.stop()
            if metrics.siblings is not None:
                await metrics.siblings.close()

    app = FastAPI(
        title="stream",
        version=__version__,
        summary="Real-time push: WebSocket, Server-Sent Events and HTTP over one hub.",
        lifespan=lifespan,
        # /docs is static/docs/, on Swagger UI's own files (below): FastAPI's page loads them
        # from a CDN, with an inline script the dashboard's CSP would refuse.
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(StreamError, _stream_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    origins = list(settings.server.allowed_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
    )
    app.include_router(router)
    app.include_router(demo.router)
    app.mount("/docs/assets", _SecurityHeaders(StaticFiles(directory=swagger_ui_path)), name="swagger-ui")
    if STATIC.is_dir():
        app.mount("/", _SecurityHeaders(StaticFiles(directory=STATIC, html=True)), name="dashboard")
    return Service(settings, runtime, metrics, app, Gate(app, runtime))


def _hub_config(settings: Settings) -> HubConfig:
    server = settings.server
    overflow = list(settings.overflow)
    overflow += [(p.topic_pattern(), p.overflow) for p in settings.providers if p.overflow]
    return HubConfig(
        history_size=server.history_size,
        history_ttl=server.history_ttl,
        history_bytes=server.history_bytes,
        max_event_bytes=server.max_event_bytes,
        max_topics=server.max_topics,
        subscriber_buffer=server.subscriber_buffer,
        max_patterns=server.max_patterns,
        write_delay=server.write_delay,
        write_load=server.write_load,
        overflow=tuple((pattern, Policy(policy)) for pattern, policy in overflow),
    )


# The dashboard and the API docs load only their own scripts, styles and connections, cannot be
# framed, and leak no URL (a #token= fragment never leaves the page anyway) to anyone.
_DASHBOARD_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        b"base-uri 'none'; form-action 'none'; object-src 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_DASHBOARD_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
