"""The source of the ``push`` scenario's headlines (bench/push.py), in a process of its own: one
item every ``--interval`` seconds, by one of four paths.

- ``sse``: an HTTP/1.1 ``text/event-stream`` at ``/events`` (body delimited by the close); each
  item is one ``id:``/``data:`` frame written to every open stream.
- ``websocket``: a WebSocket server at ``/socket`` (the ``websockets`` package); each item is one
  text message to every open connection.
- ``json``: ``GET /items`` answers ``{"items": [the last 50]}``, for a polled ``json`` provider.
  Before ``go`` it holds 50 old items (an hour old), so the provider's first poll primes with
  them (``backfill`` off ignores an empty first answer, then swallows the first real one).
- ``publish``: no upstream; each item, as the providers would normalise it, is POSTed to
  ``/api/publish`` of the server ``go`` names (one keep-alive connection, requests written on
  schedule without waiting for answers, like bench/harness.py's ``publish``): the fan-out
  baseline.

Each item's ``published`` is the wall-clock time (microseconds) taken right before its bytes are
written (``json``: right before it joins the list the next poll reads): the subscribers
(bench/push_client.py) read it from the event. Normalisation keeps only the headline fields, so
the send time rides in ``published``; it also feeds the server's own
``stream_provider_lag_seconds`` (hub accept minus that time).

Protocol with the harness, over stdin/stdout:

    upstream prints:  "listening <url>"              (``publish``: "listening -")
    harness writes:   "wait <seconds>"               upstream answers "connected" once the
                                                     provider is connected (``json``: has polled),
                                                     or "timeout"
    harness writes:   "go <server url>"              upstream pushes ``--items`` items, then prints
                                                     one JSON object: what it did
    harness writes:   "stop" (or closes stdin)       upstream exits
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

import orjson
from websockets.asyncio.server import ServerConnection, serve

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

KEY = "bench-publisher-key"  # bench/stream.toml's publisher
KEEP = 50  # items the json endpoint lists


def stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def item(n: int, sent: float) -> dict:
    """A headline as an upstream sends it."""
    return {"id": f"h{n}", "title": f"Headline {n}", "published": stamp(sent), "symbols": ["AAPL"]}


def normalised(n: int, sent: float, provider: str) -> dict:
    """The same headline as a provider named ``provider`` publishes it (SPEC §7), for the fan-out baseline."""
    return {"id": f"h{n}", "title": f"Headline {n}", "url": None, "source": provider, "published": stamp(sent),
            "summary": "", "symbols": ["AAPL"], "provider": provider}


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.streams: set[asyncio.StreamWriter] = set()  # open SSE streams
        self.sockets: set[ServerConnection] = set()  # open WebSockets
        self.items: list[dict] = [item(-1 - n, time.time() - 3600) for n in range(KEEP)][::-1]  # json: primes the provider
        self.gets = 0
        self.connections = 0  # SSE streams or WebSockets ever opened (a reconnect shows here)
        self.connected = asyncio.Event()
        self.url = "-"

    async def start(self) -> None:
        mode = self.args.mode
        if mode in ("sse", "json"):
            server = await asyncio.start_server(self._http, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}/{'events' if mode == 'sse' else 'items'}"
        elif mode == "websocket":
            server = await serve(self._websocket, "127.0.0.1", 0, max_size=None, compression=None)
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/socket"

    # -- serving ------------------------------------------------------------------------

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()
            return
        path = head.split(b" ", 2)[1].split(b"?")[0]
        if path == b"/items":
            self.gets += 1
            body = orjson.dumps({"items": self.items})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.connected.set()
            await writer.drain()
            writer.close()
            return
        if path != b"/events":
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")
        self.streams.add(writer)
        self.connections += 1
        self.connected.set()
        try:
            await reader.read()  # until the client goes: the body is ours to write
        except ConnectionError:
            pass
        finally:
            self.streams.discard(writer)
            writer.transport.abort()

    async def _websocket(self, socket: ServerConnection) -> None:
        self.sockets.add(socket)
        self.connections += 1
        self.connected.set()
        try:
            async for _ in socket:  # the provider sends nothing here (no subscribe); pings are answered by websockets
                pass
        except Exception:
            pass
        finally:
            self.sockets.discard(socket)

    # -- pushing ------------------------------------------------------------------------

    async def go(self, target: str) -> dict:
        """``--items`` items, one every ``--interval`` seconds; what was done."""
        args = self.args
        loop = asyncio.get_running_loop()
        publisher = await Publisher.open(target) if args.mode == "publish" else None
        late = 0.0
        written = 0  # item writes (to every open stream or socket)
        start = loop.time()
        for n in range(args.items):
            delay = start + n * args.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            late = max(late, loop.time() - (start + n * args.interval))
            sent = time.time()
            if args.mode == "sse":
                frame = b"id: %d\ndata: %s\n\n" % (n, orjson.dumps(item(n, sent)))
                for writer in list(self.streams):
                    writer.write(frame)
                    written += 1
            elif args.mode == "websocket":
                text = orjson.dumps(item(n, sent)).decode()
                for socket in list(self.sockets):
                    await socket.send(text)
                    written += 1
            elif args.mode == "json":
                self.items = [*self.items[1 - KEEP :], item(n, sent)]
                written += 1
            else:
                assert publisher is not None
                publisher.send(normalised(n, sent, args.provider))
                written += 1
        answered = await publisher.close() if publisher is not None else None
        return {"items": args.items, "written": written, "late_max_ms": round(late * 1000, 2), "connections": self.connections,
                "open": len(self.streams) + len(self.sockets), "gets": self.gets, "published_answered": answered,
                "seconds": round(loop.time() - start, 3)}


class Publisher:
    """POST /api/publish over one keep-alive connection: each request written when its item is
    due, answers read (and checked: 202) by a task of their own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer = reader, writer
        self.head = (f"POST /api/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\n").encode()
        self.sent = 0
        self.answered = 0
        self.failure: str | None = None
        self.reading = asyncio.create_task(self._answers())
        self.more = asyncio.Event()

    @classmethod
    async def open(cls, url: str) -> Publisher:
        host = url.split("//")[1].rstrip("/")
        name, port = host.split(":")
        reader, writer = await asyncio.open_connection(name, int(port))
        return cls(reader, writer, host)

    def send(self, data: dict) -> None:
        body = orjson.dumps({"topic": f"news.{data['provider']}", "data": data})
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.sent += 1
        self.more.set()

    async def _answers(self) -> None:
        while True:
            while self.answered >= self.sent:
                self.more.clear()
                await self.more.wait()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lowered = head.lower()
            if b"content-length:" in lowered:
                answer = await self.reader.readexactly(int(lowered.split(b"content-length:")[1].split(b"\r\n")[0]))
            else:
                answer = await self.reader.readuntil(b"0\r\n\r\n")
            if b" 202 " not in head[:16] and self.failure is None:
                self.failure = f"{head[:40]!r} {answer[:200]!r}"
            self.answered += 1

    async def close(self) -> int:
        deadline = time.monotonic() + 30
        while self.answered < self.sent and time.monotonic() < deadline and not self.reading.done():
            await asyncio.sleep(0.01)
        self.reading.cancel()
        self.writer.close()
        if self.failure:
            raise RuntimeError(f"publish refused: {self.failure}")
        return self.answered


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream(args)
    await upstream.start()
    print(f"listening {upstream.url}", flush=True)
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "stop":
            return
        if line[0] == "wait":
            try:
                await asyncio.wait_for(upstream.connected.wait(), float(line[1]))
                print("connected", flush=True)
            except TimeoutError:
                print("timeout", flush=True)
        elif line[0] == "go":
            try:
                report = await upstream.go(line[1])
            except Exception as exc:  # reported to the harness, which raises it
                report = {"error": repr(exc)}
            print(orjson.dumps(report).decode(), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("sse", "websocket", "json", "publish"), required=True)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--provider", default="wire", help="publish: the provider the items pass for (topic news.<provider>)")
    arguments = parser.parse_args()
    if uvloop is not None:
        uvloop.install()
    asyncio.run(main(arguments))
