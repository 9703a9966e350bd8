"""Floor: a raw uvloop server that writes one pre-built WebSocket frame to every socket.

The issue's "floor" row: no framework, no subscriptions, no buffering, no checks; the least a
Python fan-out can do. It speaks just enough HTTP/1.1 for the harness: the WebSocket upgrade,
GET /healthz, and POST /api/publish (pipelined, Content-Length bodies), answering 202.
Incoming WebSocket frames are ignored. Not a server anyone should run: a yardstick for what the
machine and the harness allow, so stream's figures can be read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib

import orjson
import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ACCEPTED = b'HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
HEALTHY = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'

sockets: set[asyncio.Transport] = set()


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.websocket = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        sockets.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.websocket:
            return
        self.buffer += data
        while not self.websocket:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.request(head[0].split(" ")[:2], headers, body)

    def request(self, line: list[str], headers: dict[str, str], body: bytes) -> None:
        method, path = line
        if headers.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.websocket = True
            sockets.add(self.transport)
        elif method == "POST" and path == "/api/publish":
            parsed = orjson.loads(body)
            for item in parsed if isinstance(parsed, list) else [parsed]:
                frame = text_frame(orjson.dumps(item["data"]))
                for transport in sockets:
                    transport.write(frame)
            self.transport.write(ACCEPTED)
        else:
            self.transport.write(HEALTHY)


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.install()
    asyncio.run(main(parser.parse_args().port))
