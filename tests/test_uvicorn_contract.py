"""What stream relies on in uvicorn's internals, one test per touchpoint.

stream runs its own protocol classes under uvicorn; `stream/uvicorn_seam.py` lists every
internal it relies on, numbered, and is the only module that imports uvicorn. uvicorn does not
promise these, so pyproject pins its minor series; each test here checks one touchpoint and fails
with its name, instead of a mysterious streaming failure after an upgrade.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from stream.logs import configure_logging
from stream.transports.http_protocol import HttpProtocol

PARSER_CALLBACKS = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete")
PROTOCOL_METHODS = ("connection_made", "connection_lost", "data_received", "pause_writing", "resume_writing")


def _source(function) -> str:
    return inspect.getsource(function)


@pytest.mark.parametrize("name", PARSER_CALLBACKS + PROTOCOL_METHODS)
def test_httptools_protocol_has_the_callbacks_stream_overrides(name):
    """HttpProtocol extends these HttpToolsProtocol methods and calls super() in each."""
    assert callable(getattr(HttpToolsProtocol, name, None)), f"uvicorn's HttpToolsProtocol no longer has {name}()"


def test_httptools_protocol_keeps_the_state_stream_reads():
    """HttpProtocol reads self.transport, self.parser, self.cycle, self.pipeline, self.app_state,
    self.client and self.loop, set by HttpToolsProtocol.__init__ / connection_made."""
    source = _source(HttpToolsProtocol.__init__) + _source(HttpToolsProtocol.connection_made)
    for attribute in ("self.transport", "self.parser", "self.cycle", "self.pipeline", "self.app_state", "self.client", "self.loop"):
        assert f"{attribute} =" in source or f"{attribute}:" in source, f"HttpToolsProtocol no longer sets {attribute}"
    assert "chunked_encoding" in _source(RequestResponseCycle.send), "/sse relies on cycle.chunked_encoding"


def test_a_started_response_can_be_handed_over():
    """HttpProtocol.hand_over relies on: run_asgi closing the socket of an app that returns with
    its response incomplete unless cycle.response_complete is set; flow.write_paused; and the
    server calling shutdown() on every member of server_state.connections when it stops."""
    run_asgi = _source(RequestResponseCycle.run_asgi)
    assert "elif not self.response_complete and not self.disconnected:" in run_asgi, "run_asgi changed how it ends a response"
    init = _source(HttpToolsProtocol.__init__) + _source(HttpToolsProtocol.connection_made)
    for attribute in ("self.flow =", "self.connections ="):
        assert attribute in init, f"HttpToolsProtocol no longer sets {attribute[:-2]}"
    assert "write_paused" in _source(FlowControl.__init__), "FlowControl no longer keeps write_paused"
    shutdown = _source(uvicorn.Server.shutdown)
    assert "for connection in list(self.server_state.connections):" in shutdown and "connection.shutdown()" in shutdown


def test_websocket_upgrade_hands_over_after_the_handshake():
    """handle_websocket_upgrade builds the WebSocket protocol with config=, server_state=,
    app_state=, feeds it the request, and only then makes it the transport's protocol: the
    WebSocket protocol defers its first subscribe for that reason (flow control reaches it only
    after set_protocol)."""
    source = _source(HttpToolsProtocol.handle_websocket_upgrade)
    for keyword in ("config=", "server_state=", "app_state="):
        assert keyword in source, f"the WebSocket protocol is no longer built with {keyword}"
    order = [source.index(call) for call in ("protocol.connection_made(", "protocol.data_received(", "set_protocol(")]
    assert order == sorted(order), "handle_websocket_upgrade changed the order of connection_made / data_received / set_protocol"


def test_server_hooks_stream_overrides():
    """StreamServer overrides startup(sockets), shutdown(sockets) and handle_exit(sig, frame), and
    reads started, should_exit and servers[0].sockets."""
    for name, parameters in (("startup", ["self", "sockets"]), ("shutdown", ["self", "sockets"]), ("handle_exit", ["self", "sig", "frame"])):
        method = getattr(uvicorn.Server, name, None)
        assert method is not None, f"uvicorn.Server.{name} is gone"
        if name == "handle_exit" and method.__qualname__.startswith("AppStatus."):
            # sse-starlette (imported by stream.wire) swaps in a wrapper that calls uvicorn's own.
            from sse_starlette.sse import AppStatus

            method = AppStatus.original_handler
        assert list(inspect.signature(method).parameters) == parameters, f"uvicorn.Server.{name} changed its parameters"
    source = _source(uvicorn.Server.__init__) + _source(uvicorn.Server.startup)
    for attribute in ("self.started", "self.should_exit", "self.servers"):
        assert attribute in source, f"uvicorn.Server no longer keeps {attribute}"


def test_access_log_arguments_put_the_path_third():
    """logs.py's filter of the demo providers' own polling reads the path as the access log
    record's third argument: (client, method, path, http version, status)."""
    source = _source(RequestResponseCycle.send)
    call = source[source.index("self.access_logger.info(") :]
    call = call[: call.index(")\n") + 1]
    arguments = [line.strip().rstrip(",") for line in call.splitlines()[2:7]]
    assert arguments[2].startswith("get_path_with_query_string"), f"access log arguments changed: {arguments}"
    configure_logging("info")
    try:
        access = logging.getLogger("uvicorn.access")
        demo = access.makeRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', ("c", "GET", "/demo/quotes", "1.1", 200), None)
        other = access.makeRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', ("c", "GET", "/healthz", "1.1", 200), None)
        assert not access.filter(demo) and access.filter(other)
    finally:
        logging.getLogger().handlers.clear()


def test_stream_runs_on_the_pinned_uvicorn_series():
    """pyproject pins uvicorn ~=0.54.0: these contracts were checked against that series."""
    assert uvicorn.__version__.startswith("0.54."), f"uvicorn {uvicorn.__version__}: re-check this file, then move the pin"
    assert issubclass(HttpProtocol, HttpToolsProtocol)


def test_only_the_seam_imports_uvicorn():
    """Every other module reaches uvicorn through stream/uvicorn_seam.py."""
    from pathlib import Path

    package = Path(__file__).parent.parent / "stream"
    importers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(line.startswith(("import uvicorn", "from uvicorn")) for line in path.read_text().splitlines())
    )
    assert importers == ["uvicorn_seam.py"], importers
