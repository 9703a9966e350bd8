"""Graceful shutdown (SPEC §8): SIGTERM with 1,000 open streams ends the process within 10 s, and
every client is told: WebSockets get 1001, SSE streams end with a retry hint."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import httpx
import pytest
from websockets.asyncio.client import connect

from .support import KEYS, RawWebSocket, Server, publish

pytestmark = pytest.mark.slow


async def _open_sse(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /sse?topics=bye.> HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


async def _sse_end(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until the chunked body ends (or the socket closes)."""
    body = b""
    while not body.endswith(b"0\r\n\r\n"):
        chunk = await reader.read(65536)
        if not chunk:
            break
        body += chunk
    return body


async def test_sigterm_with_1000_open_streams_exits_within_10_seconds():
    """500 WebSockets + 500 SSE streams: exit < 10 s, WS close code 1001, SSE ends with retry:."""
    # Every socket counts against the per-address limit, and all of these come from 127.0.0.1.
    server = Server(KEYS + "\n[server]\nmax_connections_per_client = 2000\n").start()
    try:
        sockets = [await connect(server.ws_url + "?topics=bye.>") for _ in range(500)]
        streams = [await _open_sse(server.port) for _ in range(500)]
        for ws in sockets:
            await ws.recv(), await ws.recv()
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{server.url}/metrics")).text
        assert 'stream_connections{transport="ws"} 500.0' in metrics
        assert 'stream_connections{transport="sse"} 500.0' in metrics

        ready_after_sigterm = None
        started = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient() as http:
            try:
                ready_after_sigterm = (await http.get(f"{server.url}/readyz", timeout=2)).status_code
            except httpx.HTTPError:
                ready_after_sigterm = "refused"
        ws_codes = await asyncio.gather(*(ws.wait_closed() for ws in sockets))
        sse_ends = await asyncio.gather(*(_sse_end(reader) for reader, _ in streams))
        exit_code = await asyncio.to_thread(server.proc.wait, 15)
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    print(f"\nSIGTERM -> exit with 1000 open streams: {elapsed:.2f} s")
    assert elapsed < 10
    # uvicorn re-raises the signal after a graceful shutdown, so the status says "terminated by SIGTERM".
    assert exit_code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.output()
    assert ready_after_sigterm in (503, "refused")
    assert ws_codes and all(ws.close_code == 1001 for ws in sockets)
    assert all(b"retry: " in body and body.endswith(b"0\r\n\r\n") for body in sse_ends)
    for _, writer in streams:
        writer.close()


async def test_sigterm_with_stalled_clients_still_exits_promptly_and_cleanly():
    """Clients that stopped reading (SSE and WS, with data queued) cannot hold shutdown hostage."""
    server = Server(KEYS).start()
    try:
        stalled_sse = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /sse?topics=stall.> HTTP/1.1\r\nHost: x\r\n\r\n")
            stalled_sse.append(sock)
        stalled_ws = [RawWebSocket(server.port, "/ws?topics=stall.>") for _ in range(3)]
        async with httpx.AsyncClient() as http:
            for _ in range(10):
                await publish(http, server, [{"topic": "stall.a", "data": "x" * 60_000} for _ in range(10)])
        started = time.monotonic()
        elapsed = server.stop()
    finally:
        server.stop()
    print(f"\nSIGTERM -> exit with 6 stalled clients: {elapsed:.2f} s")
    assert elapsed < 10
    assert time.monotonic() - started < 10
    output = server.output()
    assert "Exception in ASGI application" not in output and "Traceback" not in output
    for sock in stalled_sse:
        sock.close()
    for raw in stalled_ws:
        raw.close()


def test_ctrl_c_is_a_graceful_stop_with_one_closing_line_and_no_traceback():
    """SIGINT (Ctrl-C) drains like SIGTERM and ends with one closing line (JSON under
    --log-json), no KeyboardInterrupt traceback, and the process dies by SIGINT as
    docs/operations.md says (a shell shows 130)."""
    import signal

    import orjson

    from .support import Server

    for env in ({}, {"STREAM_LOG_JSON": "true"}):
        server = Server(None, env=env).start()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(15)
        server.stop()
        output = server.output()
        last = output.splitlines()[-1]
        assert code == -signal.SIGINT, (code, output[-2000:])
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-2000:]
        if env:
            assert orjson.loads(last)["message"] == "stream 0.1.0: stopped by SIGINT after a graceful shutdown"
        else:
            assert last == "stream 0.1.0: stopped by SIGINT after a graceful shutdown", last
