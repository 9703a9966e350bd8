"""Real faults for the tests: a loopback TCP link that can be delayed, blackholed or cut (between a
node and Redis, or a client and a node), a process paused with SIGSTOP, and the check that every
subscriber got every accepted event once or was told of a gap.

The link runs on an event loop of its own in a thread, so a test that blocks its own loop (a
synchronous HTTP call, a ``time.sleep`` in a helper) never stalls the traffic it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .support import free_port


class Link:
    """A TCP proxy on loopback in front of ``target_port``: ``url`` replaces the target's URL.

    - ``delay(seconds)``: every chunk, both ways, arrives that much later (order kept);
    - ``blackhole()``: nothing passes any more, new connections included, and nothing is refused
      either: like a network that drops packets, or a peer that hangs; ``heal()`` lets what
      waited through, as TCP's retransmissions would;
    - ``cut()``: every connection through it is reset at once (new ones work).
    """

    def __init__(self, target_port: int, scheme: str = "redis", path: str = "/0") -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}{path}"
        self.loop = asyncio.new_event_loop()
        self._delay = 0.0
        self._open: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault link", daemon=True)
        self.connections = 0  # accepted so far

    def start(self) -> Link:
        self._thread.start()
        self._call(self._start)
        return self

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def _call(self, make, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def blackhole(self) -> None:
        self.loop.call_soon_threadsafe(self._open.clear)  # type: ignore[union-attr]

    def heal(self) -> None:
        self._delay = 0.0
        self.loop.call_soon_threadsafe(self._open.set)  # type: ignore[union-attr]

    def cut(self) -> None:
        async def cut() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(cut)

    def stop(self) -> None:
        async def stop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            self._call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        assert self._open is not None
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while True:
                await self._open.wait()
                data = await source.read(65536)
                if not data:
                    break
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._open.wait()  # a chunk read just before a blackhole waits too
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()
            self._writers.discard(sink)


@contextlib.contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """The process is frozen (SIGSTOP) inside the block: its sockets stay open and its kernel
    still accepts bytes, but nothing answers. Resumed (SIGCONT) on the way out, whatever happened."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def seq(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


@dataclass
class Gap:
    """A gap notice a subscriber received: events after ``after`` (None: from an unknown point)
    up to the next event it received may be missing."""

    after: str | None
    reason: str
    before: str | None = None  # the id of the last event received before it
    upto: str | None = None  # the id of the first event received after it (None: none yet)


@dataclass
class Received:
    """What one subscriber got, in order: event ids and gap notices."""

    ids: list[str] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    _open_gaps: list[Gap] = field(default_factory=list)

    def event(self, event_id: str) -> None:
        self.ids.append(event_id)
        for gap in self._open_gaps:
            gap.upto = event_id
        self._open_gaps.clear()

    def gap(self, after: str | None, reason: str) -> None:
        notice = Gap(after, reason, self.ids[-1] if self.ids else None)
        self.gaps.append(notice)
        self._open_gaps.append(notice)

    def covered(self, event_id: str) -> bool:
        """Whether ``event_id`` lies inside the range of a gap notice this subscriber received."""
        value = seq(event_id)
        for gap in self.gaps:
            low = -1 if gap.after is None else seq(gap.after)
            high = None if gap.upto is None else seq(gap.upto)
            if value > low and (high is None or value < high):
                return True
        return False


def delivery_problems(accepted: list[str], received: Received, *, since: str | None = None) -> list[str]:
    """Every way ``received`` breaks the promise for the ``accepted`` ids (those newer than
    ``since``): an id twice, out of order, not accepted, or missing without a gap notice that
    covers it. Empty when the promise held."""
    problems = []
    seqs = [seq(event_id) for event_id in received.ids]
    if len(set(seqs)) != len(seqs):
        twice = sorted({event_id for event_id in received.ids if received.ids.count(event_id) > 1})
        problems.append(f"received twice: {twice[:5]}")
    if seqs != sorted(seqs):
        problems.append("received out of order")
    wanted = [event_id for event_id in accepted if since is None or seq(event_id) > seq(since)]
    got = set(received.ids)
    extra = got - set(accepted)
    if extra:
        problems.append(f"{len(extra)} ids never accepted, e.g. {sorted(extra)[:3]}")
    missing = [event_id for event_id in wanted if event_id not in got and not received.covered(event_id)]
    if missing:
        problems.append(f"{len(missing)} of {len(wanted)} accepted ids missing without a gap, e.g. {missing[:3]}")
    return problems


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float:
    """Poll ``predicate`` until it holds; the seconds it took. Fails if ``timeout`` passes."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


class RawSSE:
    """An SSE subscriber over a plain socket with a small receive buffer, so a test can stop
    reading (the server's flow control then holds its replay where it is) and resume later."""

    def __init__(self, port: int, path: str, *, last_event_id: str | None = None, rcvbuf: int = 4096) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
        if last_event_id:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        self.sock.sendall((head + "\r\n").encode())
        self.buffer = b""
        self.received = Received()
        self._head_done = False

    def read(self, until, timeout: float = 15.0) -> None:
        """Read and parse until ``until(received)`` holds."""
        deadline = time.monotonic() + timeout
        while not until(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"SSE: condition not met within {timeout} s ({len(self.received.ids)} events)")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the stream")
            self.buffer += chunk
            self._parse()

    def _parse(self) -> None:
        import orjson

        if not self._head_done:
            if b"\r\n\r\n" not in self.buffer:
                return
            self.buffer = self.buffer.split(b"\r\n\r\n", 1)[1]
            self._head_done = True
        # Chunked transfer encoding: the server writes whole SSE messages per chunk, so the
        # chunk-size lines can simply be dropped between messages.
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            kind, data = "message", None
            for line in block.split(b"\n"):
                line = line.strip(b"\r")
                if line.startswith(b"event:"):
                    kind = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data = line[5:].strip()
            if data is None:
                continue
            if kind == "gap":
                gap = orjson.loads(data)
                self.received.gap(gap["after"], gap["reason"])
            elif kind == "message":
                self.received.event(orjson.loads(data)["id"])

    def close(self) -> None:
        self.sock.close()
