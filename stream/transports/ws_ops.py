"""What a WebSocket client can ask (SPEC §5): subscribe, unsubscribe, publish, ping.

Each op gets the connection, the decoded frame and its ``ref``; it answers through the
connection, and a StreamError it raises becomes an ``error`` frame (the connection stays open).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..auth import Principal
from ..errors import BadRequest, StreamError
from ..hub import Charge, Draft, Subscriber
from ..runtime import Runtime
from ..topics import parse_pattern_list
from .params import subscribe_request

__all__ = ["OPS", "Connection"]


class Connection(Protocol):
    """What an op needs of its WebSocket connection (``ws.WebSocketProtocol`` is one)."""

    runtime: Runtime | None
    sub: Subscriber | None
    principal: Principal | None
    client_group: str
    loop: asyncio.AbstractEventLoop
    tasks: set[asyncio.Task[None]]

    def send_json(self, message: dict[str, Any]) -> None: ...

    def send_error(self, exc: StreamError, ref: Any) -> None: ...

log = logging.getLogger("stream.ws")


def subscribe(conn: Connection, message: dict[str, Any], ref: Any) -> None:
    """``subscribe``: answer ``subscribed`` with the position, then snapshot / replay / live."""
    assert conn.runtime is not None and conn.sub is not None
    request = subscribe_request(message, max_patterns=conn.runtime.settings.server.max_patterns)
    conn.runtime.auth.check_subscribe(conn.principal, request.topics)
    held = len(conn.sub.wants)

    def announce(position: str) -> None:
        conn.send_json({"type": "subscribed", "topics": request.topics, "position": position, "ref": ref})

    conn.runtime.hub.subscribe(
        conn.sub,
        request.topics,
        since=request.since,
        snapshot=request.snapshot,
        symbols=request.symbols,
        announce=announce,
    )
    # Each pattern added is work (the op itself was charged when it arrived): a refused
    # subscribe costs its address 1, not its pattern count.
    conn.runtime.charge_ops(conn.client_group, max(0, len(conn.sub.wants) - held - 1))


def unsubscribe(conn: Connection, message: dict[str, Any], ref: Any) -> None:
    assert conn.runtime is not None and conn.sub is not None
    topics = parse_pattern_list(message.get("topics"), "topics", limit=conn.runtime.settings.server.max_patterns)
    removed = conn.runtime.hub.unsubscribe(conn.sub, topics)
    conn.runtime.charge_ops(conn.client_group, max(0, len(removed) - 1))
    conn.send_json({"type": "unsubscribed", "topics": topics, "ref": ref})


def publish(conn: Connection, message: dict[str, Any], ref: Any) -> None:
    """``publish``: validated and charged now; ``published`` once the event is accepted."""
    assert conn.runtime is not None
    if "data" not in message:
        raise BadRequest("data: required (any JSON value)")
    hub = conn.runtime.hub
    draft = hub.draft(message.get("topic"), message["data"])
    conn.runtime.auth.check_publish(conn.principal, draft.topic)
    charge = conn.runtime.publish_charge(conn.principal, 1)
    task = conn.loop.create_task(_publish(conn, draft, charge, ref))
    conn.tasks.add(task)
    task.add_done_callback(conn.tasks.discard)


async def _publish(conn: Connection, draft: Draft, charge: Charge | None, ref: Any) -> None:
    assert conn.runtime is not None
    try:
        (event,) = await conn.runtime.hub.publish_many([draft], charge=charge)
    except StreamError as exc:
        conn.send_error(exc, ref)
    except Exception:
        log.exception("publish over WebSocket failed")
        conn.send_error(StreamError("internal error: the event was not published"), ref)
    else:
        conn.send_json({"type": "published", "id": event.id, "ref": ref})


def ping(conn: Connection, message: dict[str, Any], ref: Any) -> None:
    conn.send_json({"type": "pong", "ref": ref})


OPS: dict[str, Callable[[Connection, dict[str, Any], Any], None]] = {
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "publish": publish,
    "ping": ping,
}

