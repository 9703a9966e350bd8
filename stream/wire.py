"""Bytes on the wire: WebSocket frames and Server-Sent Events. Pure.

The hub frames each event once per format during its fan-out and hands the very same bytes
object to every subscriber of that format (websockets' ``broadcast()`` does the same). Nothing
is cached on the event: history keeps one encoded copy of it.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from sse_starlette.event import ServerSentEvent

from .events import Event

__all__ = [
    "sse_chunk",
    "sse_comment",
    "sse_control",
    "sse_event",
    "sse_event_chunk",
    "sse_position",
    "sse_retry",
    "sse_snapshot",
    "ws_event",
    "ws_frame",
    "ws_gap",
    "ws_message",
    "ws_snapshot",
]

_TEXT = 0x81  # FIN + text opcode; server frames are never masked


def ws_frame(payload: bytes) -> bytes:
    """One complete, unmasked server text frame."""
    length = len(payload)
    if length < 126:
        return bytes((_TEXT, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", _TEXT, 126, length) + payload
    return struct.pack("!BBQ", _TEXT, 127, length) + payload


def ws_event(event: Event) -> bytes:
    return ws_frame(b'{"type":"event",' + event.json[1:])


def ws_snapshot(event: Event) -> bytes:
    return ws_frame(b'{"type":"event",' + event.snapshot_json()[1:])


def ws_message(message: dict[str, Any]) -> bytes:
    return ws_frame(orjson.dumps(message))


def ws_gap(after: str | None, reason: str) -> bytes:
    return ws_message({"type": "gap", "after": after, "reason": reason})


def _sse(**fields: Any) -> bytes:
    return ServerSentEvent(sep="\n", **fields).encode()


def sse_event(event: Event) -> bytes:
    return b"id: %s\ndata: %s\n\n" % (event.id.encode(), event.json)


def sse_snapshot(event: Event) -> bytes:
    # No id line: a retained value must not move the client's Last-Event-ID.
    return _sse(data=event.snapshot_json().decode())


def sse_control(name: str, payload: dict[str, Any]) -> bytes:
    """A named control event (``gap``, ``error``): EventSource.onmessage does not see it."""
    return _sse(event=name, data=orjson.dumps(payload).decode())


def sse_position(event_id: str) -> bytes:
    """An id with no data: EventSource records it as Last-Event-ID without dispatching anything."""
    return _sse(id=event_id)


def sse_retry(millis: int) -> bytes:
    return _sse(retry=millis)


def sse_comment(text: str) -> bytes:
    return _sse(comment=text)


def sse_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk of a chunked response body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event_chunk(event: Event) -> bytes:
    """The event's SSE bytes as one HTTP chunk of a chunked stream."""
    return sse_chunk(sse_event(event))
