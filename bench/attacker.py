"""The hostile clients of the benchmark's ``hostile``, ``attack`` and ``fdchurn`` scenarios, all at
once, in one process.

bench/run.py starts it next to a normal fan-out run to see whether stream's defences keep the
measured subscribers' latency and delivery intact. Every socket comes from a 127.0.0.x source
address of its own (the measured subscribers use 127.0.0.1-8), so the server's per-address
limits apply to the attacker and never to the subscribers. Each group is sized by an option;
0 leaves it out.

The ``hostile`` scenario's groups, from ``--first-source`` (127.0.0.10) and the next three:

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

The ``attack`` scenario's groups (bench/attacks.py says what each socket does; their addresses
are ``attacks.SOURCES``): ``--batch`` stalled subscribers while ``--batch-events`` events of
``--batch-bytes`` are published every ``--batch-every`` seconds (5), ``--unread`` sockets that
leave a big answer unread while the server closes them (6), ``--gone-rate`` long-polls a second
whose sockets leave at once (7), ``--continuation`` floods of empty continuation frames (8),
``--anonymous-publish`` bodies without credentials (9), ``--big-head`` 100 KiB heads (10),
``--forwarded`` and ``--forwarded-v6`` long-polls through a trusted proxy for one client (11),
``--fd-flood`` idle sockets from 12 addresses, each reopened when the server closes it, enough
to take the server to its descriptor cap (11; they start ``--fd-flood-after`` seconds
after ready, once the measured run has opened its own connections), ``--giant`` refused
subscribes of ``--giant-patterns`` patterns (16) and ``--fill`` WebSockets from 12 addresses
up to the connection limit (17). The ``fdchurn`` scenario's: ``--fd-churn`` idle sockets from
12 addresses, reopened likewise, against a server under ``ulimit -n 1024`` (18).

Protocol with the harness, over stdin/stdout (like bench/client.py):

    harness starts:  python bench/attacker.py --url http://127.0.0.1:PORT --key KEY [sizes]
    attacker prints: "ready {json}"   once the setup is done and the sockets are open
    harness writes:  "stop\\n"         when the measured run is over (EOF on stdin too)
    attacker prints: one JSON object with what it did, then exits

Everything is bounded: the setup by --setup-timeout, the ramp by --ramp-timeout, the attack by
--duration (it stops by itself), every reconnect loop by a count and a pause; SIGALRM ends the
process if all of that somehow fails.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import resource
import signal
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
import orjson
from attacks import (  # bench/ is this script's directory, so it is on sys.path
    PING,
    SOURCES,
    AnonymousPublish,
    Attack,
    BigHead,
    EmptyContinuation,
    ForwardedLongPoll,
    GiantSubscribe,
    Group,
    StalledSubscriber,
    UnreadAnswer,
    WebSocketAttack,
    client_socket,
    hit_and_run,
    ws_frame,
    ws_request,
)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

MAX_ATTEMPTS = 5000  # connects per slot at most; each is followed by a pause, so time bounds them too
GONE_TICK = 0.01  # seconds between (7)'s ticks: at 100 a second, one long-poll each
IPV6_CLIENTS = tuple(f"2001:db8:aa:bb::{n:x}" for n in range(1, 256))  # one /64: one client


class Slowloris(Attack):
    """Holds a socket open with a request head that never ends (ticks: a byte a second), or
    with nothing at all (a group without ticks)."""

    HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    def __init__(self, group: Group) -> None:
        super().__init__(group)
        self.sent = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.group.held(self)

    def tick(self, tick: int) -> None:  # every 0.1 s, a tenth of the sockets
        if self.bucket % 10 == tick % 10:
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

    def tick(self, tick: int) -> None:
        unread = self.check(PING if tick % 2 == 0 else b"")
        if unread is not None:
            self.group.counts["unread_bytes_max"] = max(self.group.counts["unread_bytes_max"], unread)


class Churn(WebSocketAttack):
    """A reading WebSocket client that subscribes and unsubscribes unique patterns."""

    number = 0  # unique per connection, across reconnects

    def __init__(self, group: Group, request: bytes) -> None:
        super().__init__(group, request)
        Churn.number += 1
        self.id = Churn.number
        self.ops = 0

    def message(self, payload: bytes) -> None:
        if b'"subscribed"' in payload[:30]:
            self.group.counts["subscribed"] += 1
        elif b'"unsubscribed"' in payload[:30]:
            self.group.counts["unsubscribed"] += 1
        else:
            super().message(payload)

    def tick(self, tick: int) -> None:  # five buckets: each connection every fifth tick
        if self.bucket % 5 == tick % 5:
            self.op()

    def op(self) -> None:
        """The next op: subscribe a new pattern, then unsubscribe it."""
        number = self.ops // 2
        pattern = f"churn.c{self.id}.n{number}.>" if number % 2 else f"*.c{self.id}n{number}"
        kind = "unsubscribe" if self.ops % 2 else "subscribe"
        self.ops += 1
        self.group.counts["ops_sent"] += 1
        self.transport.write(ws_frame(orjson.dumps({"op": kind, "topics": [pattern]})))


def build_groups(args: argparse.Namespace, host: str) -> list[Group]:
    """Every group the options ask for (size 0: left out)."""
    first = [int(x) for x in args.first_source.split(".")]
    hostile = [".".join(map(str, [*first[:3], first[3] + i])) for i in range(4)]
    for source in hostile:
        if not source.startswith("127."):
            raise SystemExit(f"source addresses must be 127.0.0.x, got {source}")
    snapshot = ws_request(host, "/ws?topics=flood.>&snapshot=1")
    plain = ws_request(host, "/ws")
    stalled = ws_request(host, "/ws?topics=batch.>")
    giant = ws_frame(orjson.dumps({"op": "subscribe", "topics": [f"g.{n}" for n in range(args.giant_patterns)]}))
    groups = [
        Group("slowloris_trickle", args.trickle, (hostile[0],), Slowloris, every=0.1),
        Group("slowloris_idle", args.idle, (hostile[1],), Slowloris),
        Group("snapshot_flood", args.snapshot, (hostile[2],), lambda g: Snapshot(g, snapshot), every=1.0, rcvbuf=4096),
        Group("churn", args.churn, (hostile[3],), lambda g: Churn(g, plain), every=1 / (5 * args.churn_rate)),
        Group("batch_stalled", args.batch, SOURCES["batch_stalled"], lambda g: StalledSubscriber(g, stalled), every=1.0, rcvbuf=4096),
        Group("unread_close", args.unread, SOURCES["unread_close"], UnreadAnswer, every=0.5, rcvbuf=4096),
        Group("gone_long_polls", 0, SOURCES["gone_long_polls"], Attack),  # rate-driven: Attacker.gone
        Group("empty_continuation", args.continuation, SOURCES["empty_continuation"], lambda g: EmptyContinuation(g, plain),
              every=0.05, ramp=0),
        Group("anonymous_publish", args.anonymous_publish, SOURCES["anonymous_publish"], AnonymousPublish, every=1.0, ramp=0),
        Group("big_head", args.big_head, SOURCES["big_head"], BigHead, ramp=0),
        Group("forwarded_v4", args.forwarded, SOURCES["forwarded_v4"], lambda g: ForwardedLongPoll(g, ("198.51.100.7",)),
              ramp=0, backoff=1.0, max_life=40),
        Group("forwarded_v6", args.forwarded_v6, SOURCES["forwarded_v6"], lambda g: ForwardedLongPoll(g, IPV6_CLIENTS),
              ramp=0, backoff=1.0, max_life=40),
        Group("giant_subscribe", args.giant, SOURCES["giant_subscribe"], lambda g: GiantSubscribe(g, plain, giant),
              every=1 / max(args.giant_rate, 0.1), ramp=0),
        Group("fill", args.fill, SOURCES["fill"], lambda g: WebSocketAttack(g, plain), ramp=0, backoff=5.0),
        Group("fd_flood", args.fd_flood, SOURCES["fd_flood"], Slowloris, ramp=0, after=args.fd_flood_after),
        Group("fd_churn", args.fd_churn, SOURCES["fd_churn"], Slowloris, ramp=0, reopen=0.02),
    ]
    return [g for g in groups if g.target or (g.name == "gone_long_polls" and args.gone_rate)]


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parts = urlsplit(args.url)
        self.address = (parts.hostname, parts.port)
        self.host = parts.netloc
        self.groups = build_groups(args, self.host)
        self.setup_source = self._hostile_address(2)
        self.live: set[Attack] = set()
        self.stopping = False
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()  # set once "ready" is printed: the late groups' cue
        self.started = time.monotonic()
        self.attack_started: float | None = None
        self.hard_deadline = self.started + args.setup_timeout + args.ramp_timeout + args.duration + 5
        self.setup_result: dict = {}
        self.totals: list[int] = []  # sockets held, all groups, every 0.5 s while attacking
        self.in_flight: set[asyncio.Task] = set()  # (7)'s connections under way

    def _hostile_address(self, offset: int) -> str:
        first = self.args.first_source.rsplit(".", 1)
        return f"{first[0]}.{int(first[1]) + offset}"

    def going(self) -> bool:
        return not self.stopping and time.monotonic() < self.hard_deadline

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    # -- setup: the retained topics the snapshot clients (and (6)'s answers) are made of -----

    async def setup(self) -> None:
        args = self.args
        started = time.monotonic()
        statuses: Counter[str] = Counter()
        pad = "y" * max(0, args.topic_bytes - 20)
        batches = [range(i, min(i + 100, args.topics)) for i in range(0, args.topics, 100)]
        batches.reverse()
        transport = httpx.AsyncHTTPTransport(local_address=self.setup_source)
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

    async def slot(self, group: Group, index: int) -> None:
        """Keep one socket of ``group`` open: connect, wait until it is closed, reconnect."""
        loop = asyncio.get_running_loop()
        if group.after:
            await self.ready.wait()
            await asyncio.sleep(group.after)
        await asyncio.sleep(index / self.args.connect_rate)  # a ramp, not a thundering herd
        source = group.sources[index % len(group.sources)]
        for _ in range(MAX_ATTEMPTS):
            if not self.going():
                return
            group.attempts += 1
            try:
                sock = client_socket(source, group.rcvbuf)
            except OSError:
                group.connect_failed += 1
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.wait_for(loop.sock_connect(sock, self.address), 5)
                _, conn = await loop.create_connection(lambda: group.factory(group), sock=sock)
            except (TimeoutError, OSError):
                sock.close()
                group.connect_failed += 1
                await asyncio.sleep(1.0)
                continue
            self.live.add(conn)
            if self.stopping:
                conn.abort()
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), group.max_life)
            except TimeoutError:
                conn.abort()
                await conn.closed
            self.live.discard(conn)
            await asyncio.sleep(group.pause(conn))

    async def every(self, period: float, action) -> None:
        """Call ``action(tick)`` every ``period`` seconds while attacking (no catching up); an
        action that returns an awaitable is awaited before the next."""
        tick = 0
        next_at = time.monotonic()
        while self.going():
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -1.0:
                next_at = time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            tick += 1
            result = action(tick)
            if inspect.isawaitable(result):
                await result

    def gone(self, group: Group, request: bytes):
        """(7)'s ticker, every ``GONE_TICK`` s: that share of --gone-rate hit-and-run long-polls
        (500 under way at most), spread over the second rather than sent in bursts."""
        share = self.args.gone_rate * GONE_TICK

        def tick(number: int) -> None:
            due = int(number * share) - int((number - 1) * share)
            for _ in range(due):
                if len(self.in_flight) >= 500:
                    group.counts["skipped_in_flight"] += 1
                    continue
                task = asyncio.ensure_future(hit_and_run(group, self.address, request))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)

        return tick

    async def publish_batches(self, group: Group) -> None:
        """(5)'s publisher: --batch-events events of --batch-bytes each on batch.x, in one request
        with the key, every --batch-every seconds."""
        args = self.args
        body = orjson.dumps([{"topic": "batch.x", "data": {"n": n, "pad": "b" * args.batch_bytes}} for n in range(args.batch_events)])
        transport = httpx.AsyncHTTPTransport(local_address=SOURCES["batch_publisher"][0])
        headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(transport=transport, base_url=args.url, headers=headers, timeout=10) as client:

            async def post(_: int) -> None:
                try:
                    answer = await client.post("/api/publish", content=body)
                    group.counts[f"batches_{answer.status_code}"] += 1
                except httpx.HTTPError as exc:
                    group.counts[f"batches_{type(exc).__name__}"] += 1

            await self.every(args.batch_every, post)

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
        while not all(g.ramped() for g in self.groups):
            await asyncio.sleep(0.1)

    def start(self) -> tuple[list[asyncio.Future], list[asyncio.Future]]:
        """The slots of every group, and the tickers (ticks, sampling, (7)'s hits, (5)'s batches)."""
        args = self.args
        tasks = [asyncio.ensure_future(self.slot(group, index)) for group in self.groups for index in range(group.target)]
        tickers = [asyncio.ensure_future(self.every(g.every, g.tick)) for g in self.groups if g.every]
        tickers.append(asyncio.ensure_future(self.every(0.5, self.sample)))
        gone = self.group("gone_long_polls")
        if gone is not None:
            patterns = ",".join(f"gone.p{n}" for n in range(args.gone_patterns))
            request = f"GET /api/events?topics={patterns}&wait=60 HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
            gone.counts["per_second"] = round(args.gone_rate)
            tickers.append(asyncio.ensure_future(self.every(GONE_TICK, self.gone(gone, request))))
        batch = self.group("batch_stalled")
        if batch is not None:
            tickers.append(asyncio.ensure_future(self.publish_batches(batch)))
        return tasks, tickers

    async def run(self) -> dict:
        args = self.args
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        except (OSError, ValueError, PermissionError):
            pass  # stdin is not a pipe: --duration alone ends the attack
        if args.topics and not await self.until_stopped(self.setup(), args.setup_timeout):
            self.setup_result.setdefault("timed_out", not self.stop_event.is_set())
        tasks, tickers = self.start()
        if not self.stop_event.is_set():
            ramped = await self.until_stopped(self.ramped(), args.ramp_timeout)
            held = {g.name: len(g.open) for g in self.groups}
            print("ready " + orjson.dumps({"held": held, "ramped": ramped, "setup": self.setup_result}).decode(), flush=True)
            self.ready.set()
            self.attack_started = time.monotonic()
            stopped_by = "duration" if await self.until_stopped(asyncio.sleep(args.duration), args.duration + 1) else "harness"
        else:
            stopped_by = "harness"
        attacked = time.monotonic() - (self.attack_started or time.monotonic())
        held_at_stop = sum(len(g.open) for g in self.groups)
        for group in self.groups:
            group.at_stop = len(group.open)
        self.stopping = True
        for conn in list(self.live):
            conn.abort()
        for task in [*tasks, *tickers, *self.in_flight]:  # slots may sleep for seconds before they would look
            task.cancel()
        await asyncio.wait(tasks + tickers, timeout=5)
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
    parser.add_argument("--key", required=True, help="a key that may publish flood.* and batch.* (setup, (5))")
    parser.add_argument("--first-source", default="127.0.0.10", help="the hostile scenario's four groups use this address and the next three")
    parser.add_argument("--trickle", type=int, default=500, help="slowloris sockets trickling a head, a byte a second")
    parser.add_argument("--idle", type=int, default=500, help="slowloris sockets that send nothing")
    parser.add_argument("--topics", type=int, default=20_000, help="retained topics the setup publishes")
    parser.add_argument("--topic-bytes", type=int, default=1000, help="about this many bytes of data each")
    parser.add_argument("--snapshot", type=int, default=20, help="WebSocket clients asking for all of them, never reading")
    parser.add_argument("--churn", type=int, default=300, help="WebSocket clients subscribing and unsubscribing")
    parser.add_argument("--churn-rate", type=float, default=20, help="ops per second per churn client")
    parser.add_argument("--batch", type=int, default=0, help="(5) WebSocket subscribers to batch.> that stop reading")
    parser.add_argument("--batch-every", type=float, default=1.0, help="(5) seconds between batches")
    parser.add_argument("--batch-events", type=int, default=16, help="(5) events per batch")
    parser.add_argument("--batch-bytes", type=int, default=60_000, help="(5) bytes of padding per event")
    parser.add_argument("--unread", type=int, default=0, help="(6) sockets leaving a ~1 MB answer unread while the server closes them")
    parser.add_argument("--gone-rate", type=float, default=0, help="(7) long-polls a second whose sockets close at once")
    parser.add_argument("--gone-patterns", type=int, default=100, help="(7) patterns per long-poll")
    parser.add_argument("--continuation", type=int, default=0, help="(8) WebSockets sending empty continuation frames")
    parser.add_argument("--anonymous-publish", type=int, default=0, help="(9) publish bodies sent without credentials")
    parser.add_argument("--big-head", type=int, default=0, help="(10) sockets sending 100 KiB heads")
    parser.add_argument("--forwarded", type=int, default=0, help="(11) long-polls through the proxy for 198.51.100.7")
    parser.add_argument("--forwarded-v6", type=int, default=0, help="(11) long-polls through the proxy for one IPv6 /64")
    parser.add_argument("--giant", type=int, default=0, help="(16) WebSockets sending refused giant subscribes")
    parser.add_argument("--giant-patterns", type=int, default=5000, help="(16) patterns per subscribe")
    parser.add_argument("--giant-rate", type=float, default=10, help="(16) subscribes a second per socket, each once the last was answered")
    parser.add_argument("--fill", type=int, default=0, help="(17) WebSockets from 12 addresses, opened until refused")
    parser.add_argument("--fd-flood", type=int, default=0, help="(11) idle sockets from 12 addresses, reopened at once: the descriptor cap")
    parser.add_argument("--fd-flood-after", type=float, default=3.0,
                        help="(11) seconds after ready the flood begins: the measured run's own connections are open by then")
    parser.add_argument("--fd-churn", type=int, default=0, help="(18) idle sockets from 12 addresses, reopened at once")
    parser.add_argument("--connect-rate", type=float, default=500, help="new sockets per second per group while ramping up")
    parser.add_argument("--setup-timeout", type=float, default=120)
    parser.add_argument("--ramp-timeout", type=float, default=20)
    parser.add_argument("--duration", type=float, default=60, help="seconds of attack at most, after ready")
    args = parser.parse_args()
    # The last resort: whatever happens, the process is gone a little after its bounds.
    signal.alarm(int(args.setup_timeout + args.ramp_timeout + args.duration + 30))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the fill group alone holds thousands
    if uvloop is not None:
        uvloop.install()

    async def go() -> dict:
        return await Attacker(args).run()

    print(orjson.dumps(asyncio.run(go())).decode(), flush=True)


if __name__ == "__main__":
    main()
