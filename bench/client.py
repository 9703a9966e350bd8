"""A cheap subscriber process for the benchmark: many WebSocket or SSE connections on uvloop.

It is deliberately minimal (a hand-written frame / chunk parser, orjson) so that the clients
are not the bottleneck. Protocol with the harness (bench/run.py), over stdin/stdout:

    harness starts:  python bench/client.py --transport ws --url ... --count N [--stall K]
    client prints:   "ready <seconds to connect>"      once every connection is subscribed
    harness writes:  "stop\n" to stdin                 when the run is over
    client prints:   one JSON object with counts; latencies go to --latencies FILE (float64)

Every message carries {"seq": n, "t": publish time}; per connection the seqs must arrive in
order without gaps or repeats. Connections in --stall stop reading after the handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import struct
import sys
import time
from array import array
from urllib.parse import urlsplit

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


class Stats:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.received = 0
        self.out_of_order = 0
        self.duplicates = 0
        self.closed = 0
        self.first_seq: dict[int, int] = {}

    def message(self, conn: Connection, payload: bytes) -> None:
        # Cheap on purpose: every message is checked for order by its seq (found with bytes
        # operations); only sampled connections decode the JSON to measure latency.
        start = payload.find(b'"seq":')
        if start < 0:
            return  # welcome, subscribed, …
        end = payload.find(b",", start)
        seq = int(payload[start + 6 : end])
        if conn.sampled:
            message = orjson.loads(payload)
            data = message["data"] if isinstance(message.get("data"), dict) else message
            self.latencies.append(time.time() - data["t"])
        if seq <= conn.last_seq:
            self.duplicates += 1
        elif conn.last_seq >= 0 and seq != conn.last_seq + 1:
            self.out_of_order += 1
        conn.last_seq = max(conn.last_seq, seq)
        conn.count += 1
        self.received += 1


class Connection(asyncio.Protocol):
    def __init__(self, stats: Stats, request: bytes, sse: bool, ready: asyncio.Future, stall: bool, sampled: bool) -> None:
        self.stats = stats
        self.sampled = sampled
        self.request = request
        self.sse = sse
        self.ready = ready
        self.stall = stall
        self.buffer = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.last_seq = -1
        self.count = 0
        self.chunk_left = 0  # SSE: bytes left in the current HTTP chunk
        self.text = bytearray()  # SSE: decoded body not yet split into lines

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.stats.closed += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before subscribing"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 101 " not in status and b" 200 " not in status:
                self.ready.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            del self.buffer[: end + 4]
            self.upgraded = True
            if not self.ready.done():
                self.ready.set_result(None)
            if self.stall:
                self.transport.pause_reading()
                return
        if self.sse:
            self._sse()
        else:
            self._frames()

    def _frames(self) -> None:
        buffer = self.buffer
        position = 0
        while len(buffer) - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if len(buffer) - position < 4:
                    break
                (length,) = struct.unpack_from("!H", buffer, position + 2)
                header = 4
            elif length == 127:
                if len(buffer) - position < 10:
                    break
                (length,) = struct.unpack_from("!Q", buffer, position + 2)
                header = 10
            if len(buffer) - position < header + length:
                break
            payload = bytes(buffer[position + header : position + header + length])
            position += header + length
            opcode = first & 0x0F
            if opcode == 0x1:
                self.stats.message(self, payload)
            elif opcode == 0x9:  # ping: answer with a masked pong
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + mask + masked)
        del buffer[:position]

    def _sse(self) -> None:
        # Decode HTTP/1.1 chunked transfer encoding, then split events on blank lines.
        buffer = self.buffer
        while buffer:
            if self.chunk_left == 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                size = buffer[:end].strip()
                if not size:
                    del buffer[: end + 2]
                    continue
                self.chunk_left = int(size, 16) + 2  # data + CRLF
                del buffer[: end + 2]
                if self.chunk_left == 2:
                    self.chunk_left = 0
                    break
            take = min(self.chunk_left, len(buffer))
            self.text += buffer[:take]
            del buffer[:take]
            self.chunk_left -= take
            if self.chunk_left == 0:
                del self.text[-2:]  # the CRLF after the chunk data
        if b"\r" in self.text:  # sse-starlette separates lines with CRLF
            self.text = bytearray(self.text.replace(b"\r\n", b"\n"))
        while True:
            end = self.text.find(b"\n\n")
            if end < 0:
                break
            block = bytes(self.text[:end])
            del self.text[: end + 2]
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    self.stats.message(self, line[6:])


def request_for(transport: str, url: str, path: str) -> bytes:
    parts = urlsplit(url)
    host = parts.netloc
    if transport == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    parts = urlsplit(args.url)
    request = request_for(args.transport, args.url, args.path)
    connections = []
    started = time.monotonic()
    pending = []
    for index in range(args.count):
        ready = loop.create_future()
        stall = index < args.stall
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if stall:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if args.source:
            sock.bind((args.source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (parts.hostname, parts.port))
        _, protocol = await loop.create_connection(
            lambda r=ready, s=stall, m=(index % args.sample == 0): Connection(stats, request, args.transport == "sse", r, s, m),
            sock=sock,
        )
        connections.append(protocol)
        pending.append(ready)
        if len(pending) >= 200:  # keep the handshake backlog moderate
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    # The subscribe answers arrive right after the upgrade; give them a moment.
    await asyncio.sleep(0.2)
    print(f"ready {time.monotonic() - started:.3f}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    # Drain: report once nothing has arrived for 0.3 s (at most 10 s), not while still behind.
    deadline = time.monotonic() + 10
    seen = -1
    while stats.received != seen and time.monotonic() < deadline:
        seen = stats.received
        await asyncio.sleep(0.3)
    counts = [c.count for c in connections if not c.stall]
    if args.latencies:
        with open(args.latencies, "wb") as out:  # noqa: ASYNC230 - once, after the measurement
            stats.latencies.tofile(out)
    print(
        orjson.dumps(
            {
                "connections": len(connections),
                "stalled": args.stall,
                "received": stats.received,
                "min_per_connection": min(counts) if counts else 0,
                "max_per_connection": max(counts) if counts else 0,
                "out_of_order": stats.out_of_order,
                "duplicates": stats.duplicates,
                "closed": stats.closed,
            }
        ).decode(),
        flush=True,
    )
    for connection in connections:
        if connection.transport is not None:
            connection.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=("ws", "sse"), default="ws")
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/ws?topics=bench.>")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--stall", type=int, default=0, help="this many connections stop reading")
    parser.add_argument("--source", default="", help="local address to connect from (127.0.0.x)")
    parser.add_argument("--latencies", default="")
    parser.add_argument("--sample", type=int, default=5, help="measure latency on every n-th connection")
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.install()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
