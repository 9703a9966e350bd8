"""The hostile clients of the benchmark's ``hostile`` scenario, all at once, in one process.

bench/run.py starts it next to a normal fan-out run to see whether stream's defences keep the
measured subscribers' latency and delivery intact. Every socket comes from a 127.0.0.x source
address of its own (default 127.0.0.10 and up; the measured subscribers use 127.0.0.1-8), so
the server's per-address limits apply to the attacker and never to the subscribers.

    (a) slowloris: ``--trickle`` sockets that send a request head one byte per second and
        never finish it, and ``--idle`` sockets that send nothing; each is reopened when the
        server closes it.
    (b) snapshot flood: setup publishes ``--topics`` retained topics (``flood.tNNNNN``) of
        ``--topic-bytes`` each with the bench's publish key; then ``--snapshot`` WebSocket
        clients subscribe to ``flood.>`` with ``snapshot=1`` and never read (SO_RCVBUF 4 KiB),
        reconnecting when closed (noticed from the socket's TCP state; a 6-byte ping every
        2 s makes a server that dropped the socket answer with a reset).
    (c) subscription churn: ``--churn`` WebSocket clients, each subscribing and
        unsubscribing a new unique pattern ``--churn-rate`` times a second, reading answers.

Protocol with the harness, over stdin/stdout (like bench/client.py):

    harness starts:  python bench/attacker.py --url http://127.0.0.1:PORT --key KEY [sizes]
    attacker prints: "ready {json}"   once the setup is done and the sockets are open
    harness writes:  "stop\\n"         when the measured run is over (EOF on stdin too)
    attacker prints: one JSON object with what it did, then exits

Everything is bounded: the setup by --setup-timeout, the ramp by --ramp-timeout, the attack by
--duration (it stops by itself), every reconnect loop by a count; SIGALRM ends the process if
all of that somehow fails.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import signal
import socket
import struct
import sys
import termios
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # the port is picked at connect
TCP_ESTABLISHED = 1
MAX_ATTEMPTS = 500  # connects per slot at most, however fast the server closes them
PING = b"\x89\x80\x00\x00\x00\x00"  # a masked, empty WebSocket ping (mask key 0: XOR changes nothing)


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame; the mask key is zero, so the payload goes as it is."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, 0x80 | length)) + b"\x00\x00\x00\x00" + payload
    return bytes((0x81, 0x80 | 126)) + struct.pack("!H", length) + b"\x00\x00\x00\x00" + payload


def ws_request(host: str, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {os.urandom(16).hex()[:22]}==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Group:
    """The sockets of one kind of attack, from one source address, and what happened to them."""

    def __init__(self, name: str, target: int, source: str) -> None:
        self.name = name
        self.target = target
        self.source = source
        self.open: set[Attack] = set()  # connected (WebSocket groups: upgraded) and not closed
        self.peak = 0
        self.at_stop = 0
        self.samples: list[int] = []  # len(open) every 0.5 s while attacking
        self.attempts = 0
        self.connected = 0
        self.connect_failed = 0
        self.closed_by_server = 0
        self.statuses: Counter[str] = Counter()  # HTTP status lines the server answered with
        self.close_codes: Counter[str] = Counter()  # WebSocket close codes it sent
        self.counts: Counter[str] = Counter()  # group-specific: ops, answers, errors, …

    def held(self, conn: Attack) -> None:
        self.open.add(conn)
        self.peak = max(self.peak, len(self.open))

    def summary(self) -> dict:
        during = self.samples or [0]
        return {
            "source": self.source,
            "target": self.target,
            "held_peak": self.peak,
            "held_mean": round(sum(during) / len(during), 1),
            "held_min": min(during),
            "held_at_stop": self.at_stop,
            "connects": self.connected,
            "connect_failed": self.connect_failed,
            "closed_by_server": self.closed_by_server,
            "statuses": dict(self.statuses),
            "close_codes": dict(self.close_codes),
            **dict(self.counts),
        }


class Attack(asyncio.Protocol):
    """One hostile socket. ``closed`` resolves when it is gone; ``by_us`` tells who ended it."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.by_us = False
        self.buffer = bytearray()
        self.answered = False
        self.last_status = ""
        self.bucket = random.randrange(1 << 30)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.group.connected += 1

    def connection_lost(self, exc) -> None:
        self.group.open.discard(self)
        if not self.by_us:
            self.group.closed_by_server += 1
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        self.by_us = True
        if self.transport is not None:
            self.transport.abort()

    def status(self, data: bytes) -> bytes | None:
        """The server's HTTP answer: counts its status once; returns the bytes after the head."""
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                del self.buffer[:-4]
            return None
        line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
        parts = line.split()
        self.last_status = parts[1].decode(errors="replace") if len(parts) > 1 else "?"
        self.group.statuses[self.last_status] += 1
        self.answered = True
        rest = bytes(self.buffer[end + 4 :])
        self.buffer.clear()
        return rest


class Slowloris(Attack):
    """Holds a socket open with a request head that never ends (or with nothing at all)."""

    HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    def __init__(self, group: Group) -> None:
        super().__init__(group)
        self.sent = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.group.held(self)

    def trickle(self) -> None:
        byte = self.HEAD[self.sent : self.sent + 1] or b"a"
        self.sent += 1
        self.group.counts["bytes_sent"] += 1
        self.transport.write(byte)

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.status(data)


class Snapshot(Attack):
    """Subscribes with snapshot=1 to every flood topic, then never reads."""

    def __init__(self, group: Group, request: bytes) -> None:
        super().__init__(group)
        self.request = request

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.request)
        transport.pause_reading()  # whatever the server sends stays in its buffers and ours
        self.group.held(self)

    def data_received(self, data: bytes) -> None:
        # uvloop may start reading once after connection_made even so: stop again, and count it.
        self.group.counts["bytes_read"] += len(data)
        self.transport.pause_reading()

    def check(self, ping: bool) -> None:
        """Notice a server that has let go of the socket, which reading cannot tell us."""
        sock = self.transport.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            unread = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            state, unread = 0, 0
        self.group.counts["unread_bytes_max"] = max(self.group.counts["unread_bytes_max"], unread)
        if state != TCP_ESTABLISHED:
            self.transport.abort()  # connection_lost counts it as closed by the server
        elif ping:
            self.transport.write(PING)


class Churn(Attack):
    """A reading WebSocket client that subscribes and unsubscribes unique patterns."""

    number = 0  # unique per connection, across reconnects

    def __init__(self, group: Group, request: bytes) -> None:
        super().__init__(group)
        self.request = request
        Churn.number += 1
        self.id = Churn.number
        self.upgraded = False
        self.ops = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            rest = self.status(data)
            if rest is None:
                return
            if self.last_status != "101":  # refused (503 over capacity, 4xx): the server closes it
                self.transport.close()
                return
            self.upgraded = True
            self.group.held(self)
            data = rest
        self.buffer += data
        self.frames()

    def frames(self) -> None:
        buffer = self.buffer
        position = 0
        counts = self.group.counts
        while len(buffer) - position >= 2:
            first, length = buffer[position], buffer[position + 1] & 0x7F
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
                if b'"subscribed"' in payload[:30]:
                    counts["subscribed"] += 1
                elif b'"unsubscribed"' in payload[:30]:
                    counts["unsubscribed"] += 1
                elif b'"error"' in payload[:20]:
                    code = payload.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode(errors="replace")
                    counts[f"error_{code}"] += 1
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.group.close_codes[str(code)] += 1
                self.transport.close()
                break
            elif opcode == 0x9:
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload)
        del buffer[:position]

    def op(self) -> None:
        """The next op: subscribe a new pattern, then unsubscribe it."""
        number = self.ops // 2
        pattern = f"churn.c{self.id}.n{number}.>" if number % 2 else f"*.c{self.id}n{number}"
        kind = "unsubscribe" if self.ops % 2 else "subscribe"
        self.ops += 1
        self.group.counts["ops_sent"] += 1
        self.transport.write(ws_frame(orjson.dumps({"op": kind, "topics": [pattern]})))


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parts = urlsplit(args.url)
        self.address = (parts.hostname, parts.port)
        self.host = parts.netloc
        first = [int(x) for x in args.first_source.split(".")]
        sources = [".".join(map(str, [*first[:3], first[3] + i])) for i in range(4)]
        for source in sources:
            if not source.startswith("127."):
                raise SystemExit(f"source addresses must be 127.0.0.x, got {source}")
        self.trickle = Group("slowloris_trickle", args.trickle, sources[0])
        self.idle = Group("slowloris_idle", args.idle, sources[1])
        self.snapshot = Group("snapshot_flood", args.snapshot, sources[2])
        self.churn = Group("churn", args.churn, sources[3])
        self.groups = [self.trickle, self.idle, self.snapshot, self.churn]
        self.live: set[Attack] = set()
        self.stopping = False
        self.stop_event = asyncio.Event()
        self.started = time.monotonic()
        self.attack_started: float | None = None
        self.hard_deadline = self.started + args.setup_timeout + args.ramp_timeout + args.duration + 5
        self.setup_result: dict = {}
        self.totals: list[int] = []  # sockets held, all groups, every 0.5 s while attacking

    def going(self) -> bool:
        return not self.stopping and time.monotonic() < self.hard_deadline

    # -- (b) setup: the retained topics the snapshot clients will ask for ---------------------

    async def setup(self) -> None:
        args = self.args
        started = time.monotonic()
        statuses: Counter[str] = Counter()
        pad = "y" * max(0, args.topic_bytes - 20)
        batches = [range(i, min(i + 100, args.topics)) for i in range(0, args.topics, 100)]
        batches.reverse()
        transport = httpx.AsyncHTTPTransport(local_address=self.snapshot.source)
        headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url=args.url, headers=headers, timeout=30) as client:

            async def worker() -> None:
                while batches and not self.stopping:
                    batch = batches.pop()
                    body = orjson.dumps([{"topic": f"flood.t{i:05d}", "data": {"i": i, "pad": pad}} for i in batch])
                    try:
                        answer = await client.post("/api/publish", content=body)
                        statuses[str(answer.status_code)] += len(batch)
                    except httpx.HTTPError as exc:
                        statuses[type(exc).__name__] += len(batch)

            await asyncio.gather(worker(), worker())
        self.setup_result = {"topics": args.topics, "topic_bytes": args.topic_bytes, "statuses": dict(statuses),
                             "seconds": round(time.monotonic() - started, 2)}

    # -- the sockets ------------------------------------------------------------------------

    async def slot(self, group: Group, factory, index: int, rcvbuf: int = 0) -> None:
        """Keep one socket of ``group`` open: connect, wait until it is closed, reconnect."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(index / self.args.connect_rate)  # a ramp, not a thundering herd
        for _ in range(MAX_ATTEMPTS):
            if not self.going():
                return
            group.attempts += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.bind((group.source, 0))
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, self.address), 5)
                _, conn = await loop.create_connection(lambda: factory(group), sock=sock)
            except (TimeoutError, OSError):
                sock.close()
                group.connect_failed += 1
                await asyncio.sleep(1.0)
                continue
            self.live.add(conn)
            if isinstance(conn, Snapshot) and not conn.transport.is_closing():
                conn.transport.pause_reading()
            if self.stopping:
                conn.abort()
            await conn.closed
            self.live.discard(conn)
            await asyncio.sleep(0.2 + random.random() * 0.3)

    async def every(self, period: float, action) -> None:
        """Call ``action(tick)`` every ``period`` seconds while attacking (no catching up)."""
        tick = 0
        next_at = time.monotonic()
        while self.going():
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            tick += 1
            action(tick)

    def trickle_tick(self, tick: int) -> None:  # every 0.1 s a tenth of the sockets: a byte a second each
        for conn in list(self.trickle.open):
            if conn.bucket % 10 == tick % 10 and not conn.transport.is_closing():
                conn.trickle()

    def churn_tick(self, tick: int) -> None:  # five buckets: each connection every fifth tick
        for conn in list(self.churn.open):
            if conn.bucket % 5 == tick % 5 and not conn.transport.is_closing():
                conn.op()

    def snapshot_tick(self, tick: int) -> None:
        for conn in list(self.snapshot.open):
            if not conn.transport.is_closing():
                conn.check(ping=tick % 2 == 0)

    def sample(self, tick: int) -> None:
        if self.attack_started is not None:
            for group in self.groups:
                group.samples.append(len(group.open))
            self.totals.append(sum(len(group.open) for group in self.groups))

    # -- the run ----------------------------------------------------------------------------

    async def until_stopped(self, awaitable, timeout: float) -> bool:
        """Run ``awaitable`` until it ends, the harness says stop, or ``timeout``; True if it ended."""
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stop_event.wait())
        done, _ = await asyncio.wait({task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            task.result()
            return True
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return False

    async def ramped(self) -> None:
        while not all(len(g.open) >= 0.9 * g.target for g in self.groups):
            await asyncio.sleep(0.1)

    async def run(self) -> dict:
        args = self.args
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        except (OSError, ValueError, PermissionError):
            pass  # stdin is not a pipe: --duration alone ends the attack
        stopped_by = "duration"
        if args.topics and not await self.until_stopped(self.setup(), args.setup_timeout):
            self.setup_result.setdefault("timed_out", not self.stop_event.is_set())
        snapshot_request = ws_request(self.host, "/ws?topics=flood.>&snapshot=1")
        churn_request = ws_request(self.host, "/ws")
        tasks = [asyncio.ensure_future(self.slot(self.trickle, Slowloris, i)) for i in range(args.trickle)]
        tasks += [asyncio.ensure_future(self.slot(self.idle, Slowloris, i)) for i in range(args.idle)]
        tasks += [asyncio.ensure_future(self.slot(self.snapshot, lambda g: Snapshot(g, snapshot_request), i, 4096)) for i in range(args.snapshot)]
        tasks += [asyncio.ensure_future(self.slot(self.churn, lambda g: Churn(g, churn_request), i)) for i in range(args.churn)]
        tickers = [
            asyncio.ensure_future(self.every(0.1, self.trickle_tick)),
            asyncio.ensure_future(self.every(1 / (5 * args.churn_rate), self.churn_tick)),
            asyncio.ensure_future(self.every(1.0, self.snapshot_tick)),
            asyncio.ensure_future(self.every(0.5, self.sample)),
        ]
        if not self.stop_event.is_set():
            ramped = await self.until_stopped(self.ramped(), args.ramp_timeout)
            held = {g.name: len(g.open) for g in self.groups}
            print("ready " + orjson.dumps({"held": held, "ramped": ramped, "setup": self.setup_result}).decode(), flush=True)
            self.attack_started = time.monotonic()
            if await self.until_stopped(asyncio.sleep(args.duration), args.duration + 1):
                stopped_by = "duration"
            else:
                stopped_by = "harness"
        else:
            stopped_by = "harness"
        attacked = time.monotonic() - (self.attack_started or time.monotonic())
        held_at_stop = sum(len(g.open) for g in self.groups)
        for group in self.groups:
            group.at_stop = len(group.open)
        self.stopping = True
        for conn in list(self.live):
            conn.abort()
        for task in tickers:
            task.cancel()
        await asyncio.wait(tasks + tickers, timeout=5)
        for task in tasks:
            task.cancel()
        usage = os.times()
        totals = self.totals or [0]
        return {
            "stopped_by": stopped_by,
            "seconds_attacking": round(attacked, 2),
            "cpu_s": round(usage.user + usage.system, 2),
            "setup": self.setup_result,
            "held_total_peak": max(totals),
            "held_total_mean": round(sum(totals) / len(totals), 1),
            "held_total_at_stop": held_at_stop,
            "closed_by_server": sum(g.closed_by_server for g in self.groups),
            "groups": {g.name: g.summary() for g in self.groups},
        }

    def on_stdin(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data or b"stop" in data:
            asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            self.stop_event.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, http://127.0.0.1:PORT")
    parser.add_argument("--key", required=True, help="a key that may publish flood.* (for the setup)")
    parser.add_argument("--first-source", default="127.0.0.10", help="the four groups use this address and the next three")
    parser.add_argument("--trickle", type=int, default=500, help="slowloris sockets trickling a head, a byte a second")
    parser.add_argument("--idle", type=int, default=500, help="slowloris sockets that send nothing")
    parser.add_argument("--topics", type=int, default=20_000, help="retained topics the setup publishes")
    parser.add_argument("--topic-bytes", type=int, default=1000, help="about this many bytes of data each")
    parser.add_argument("--snapshot", type=int, default=20, help="WebSocket clients asking for all of them, never reading")
    parser.add_argument("--churn", type=int, default=300, help="WebSocket clients subscribing and unsubscribing")
    parser.add_argument("--churn-rate", type=float, default=20, help="ops per second per churn client")
    parser.add_argument("--connect-rate", type=float, default=500, help="new sockets per second per group while ramping up")
    parser.add_argument("--setup-timeout", type=float, default=120)
    parser.add_argument("--ramp-timeout", type=float, default=20)
    parser.add_argument("--duration", type=float, default=60, help="seconds of attack at most, after ready")
    args = parser.parse_args()
    # The last resort: whatever happens, the process is gone a little after its bounds.
    signal.alarm(int(args.setup_timeout + args.ramp_timeout + args.duration + 30))
    if uvloop is not None:
        uvloop.install()

    async def go() -> dict:
        return await Attacker(args).run()

    print(orjson.dumps(asyncio.run(go())).decode(), flush=True)


if __name__ == "__main__":
    main()
