"""Everything stream relies on in uvicorn beyond its documented API, in one place.

uvicorn does not promise these internals, so pyproject pins its minor series (``~=0.54.0``) and
``tests/test_uvicorn_contract.py`` checks each touchpoint below by name. Nothing else in
stream imports uvicorn.

1. ``HttpToolsProtocol`` (``transports/http_protocol.HttpProtocol`` subclasses it): the httptools
   parser callbacks ``on_message_begin`` … ``on_message_complete`` and the ``asyncio.Protocol``
   methods, each extended with ``super()``; the state it sets (``transport``, ``parser``,
   ``cycle``, ``pipeline``, ``app_state``, ``client``, ``loop``, ``flow``, ``connections``) and
   ``cycle.chunked_encoding``. ``HttpProtocol.hand_over`` gives the socket of a started response
   to a protocol of its own, the way uvicorn's WebSocket upgrade does: it moves the socket's
   entry in ``connections`` (the server's set, whose ``shutdown()`` it calls when stopping),
   reads ``flow.write_paused``, and sets ``cycle.response_complete`` so that ``run_asgi`` lets
   the app return without closing the socket.
2. The WebSocket protocol class (``transports/ws.WebSocketProtocol``, given as ``ws=``): uvicorn
   builds it with ``config=``, ``server_state=``, ``app_state=``, feeds it the upgrade request,
   and makes it the transport's protocol only afterwards — so flow control reaches it only
   from the loop's next turn (it defers its first subscribe for that reason).
3. ``Server`` (``server.StreamServer`` subclasses it): the ``startup(sockets)``,
   ``shutdown(sockets)`` and ``handle_exit(sig, frame)`` hooks, and ``started``,
   ``should_exit``, ``servers[0].sockets``. (sse-starlette, imported by ``wire``, replaces
   ``Server.handle_exit`` with a wrapper that calls uvicorn's own; ours still runs first.)
4. The access log: each record's arguments are (client, method, path, HTTP version, status).
"""

from __future__ import annotations

import logging

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["Config", "HttpToolsProtocol", "Server", "access_log_path"]

Config = uvicorn.Config
Server = uvicorn.Server


def access_log_path(record: logging.LogRecord) -> str | None:
    """The request path of one of uvicorn's access log records (touchpoint 4), or None."""
    args = record.args
    return str(args[2]) if isinstance(args, tuple) and len(args) >= 3 else None
