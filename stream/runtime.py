"""The running service's shared state: open connections, their limits, readiness, shutdown.

One ``Runtime`` per app, built with its parts (hub, pollers, auth, socket limits) by the
composition root, ``stream.app.build``. The transports reach it through the ASGI lifespan state
(``scope["state"]["stream"]``); the CLI's server calls :meth:`Runtime.drain` on SIGTERM before
uvicorn closes anything, so clients are told to come back before the process goes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import Counter
from typing import Protocol

from .auth import Auth, Principal
from .errors import RateLimited, Unavailable
from .hub import Charge, Hub
from .limits import SocketLimits, TokenBucket, TrustedProxies, address_group
from .pollers import Pollers
from .settings import Settings
from .tls import own_certificate

__all__ = ["Connection", "Runtime"]

_MAX_BUCKETS = 10_000  # per-address op buckets and turns kept before they are forgotten

log = logging.getLogger("stream")


class Connection(Protocol):
    """An open WebSocket or SSE stream, as the runtime sees it."""

    transport_name: str
    client_host: str  # the client's address (behind a trusted proxy: the one it forwarded)
    client_group: str  # what per-address limits count it under (Runtime.group)
    forwarded: bool  # it came through a trusted proxy: its socket is not counted by address
    principal: Principal | None

    def shutdown(self) -> None:
        """Tell the client the server is going away (WS 1001, SSE retry hint) and close."""

    def tick(self, now: float) -> None:
        """Periodic housekeeping (SSE heartbeat)."""

    def expire(self) -> None:
        """The token it was opened with has expired: WS close 1008, SSE error event and end."""


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        hub: Hub,
        pollers: Pollers,
        auth: Auth,
        sockets: SocketLimits,
        proxies: TrustedProxies,
        workers: int = 1,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.tls = tls  # stream's own TLS: sockets are accepted plain and shaken hands with (HttpProtocol)
        # With --workers the kernel spreads an address's connections over the workers, so each
        # keeps its share of the per-address op rate: together they hold the host to it.
        self.ops_rate = settings.server.ws_ops_rate_per_client / workers
        self.ops_burst = max(1.0, settings.server.ws_ops_burst_per_client / workers)
        self.hub = hub
        self.pollers = pollers
        self.auth = auth
        self.connections: set[Connection] = set()
        self.sockets = sockets
        self.proxies = proxies
        self.closed: Counter[str] = Counter()  # sockets the server closed on a client, by reason
        self.ops_refused = 0  # WebSocket ops and control frames refused by the op rate
        self.ops_throttled = 0  # times a connection's reading was paused for its address's op share
        self._client_ops: dict[str, TokenBucket] = {}  # per address, may go into debt
        self._ops_turns: dict[str, float] = {}  # per address: when the last connection waiting for its share wakes
        self._ops_spent: Counter[str] = Counter()  # op work not yet charged to its address's bucket
        self._per_key: Counter[str] = Counter()
        self._expiries: dict[Connection, asyncio.TimerHandle] = {}  # connections opened with a JWT
        self.started = False
        self.stopping = False  # readiness off and no new streams; set as soon as SIGTERM arrives
        self._drained = False
        self.started_at = time.time()
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.hub.start()
        if self.settings.server.sse_heartbeat is not None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(self.settings.server.sse_heartbeat))
        self.started = True
        log.info("hub ready: epoch %s, broker %s", self.hub.epoch, self.settings.server.broker.split("@")[-1])
        sockets = self.sockets
        log.info(
            "serving up to %d sockets (max_connections %d, ulimit -n less fd_margin), %d per client address",
            sockets.limit,
            self.settings.server.max_connections,
            sockets.per_client,
        )

    async def drain(self) -> None:
        """Graceful shutdown, first step: not ready, and every client told to go."""
        if self._drained:
            return
        self._drained = self.stopping = True
        await self.pollers.stop()
        count = len(self.connections)
        log.info("shutting down: closing %d streaming connections", count)
        for connection in list(self.connections):
            try:
                connection.shutdown()
            except Exception:
                log.exception("closing a %s connection failed", connection.transport_name)
        deadline = time.monotonic() + self.settings.server.shutdown_timeout
        # Connections end in callbacks of their own protocols; polling the set is the simplest wait.
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("%d connections did not close in time", len(self.connections))

    def start_pollers(self, base_url: str) -> None:
        """Start polling; the server calls this once it listens, since demo providers poll it
        (over TLS they trust the certificate it serves)."""
        certfile = self.settings.server.ssl_certfile
        self.pollers.start(base_url, own_certificate(certfile) if self.tls is not None and certfile else None)

    async def stop(self) -> None:
        self.stopping = True
        await self.pollers.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        await self.hub.close()

    @property
    def close_grace(self) -> float:
        """Seconds a socket the server closes may take to drain what was written before the
        close; then it is dropped: ``close_timeout``, and never more than ``write_stall_timeout``."""
        server = self.settings.server
        return min(server.close_timeout, server.write_stall_timeout or server.close_timeout)

    def problem(self) -> str | None:
        """Why the service should not get traffic now (``/readyz``), or None."""
        if self.stopping:
            return "shutting down"
        if not self.started:
            return "starting"
        return self.hub.broker.problem()

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in list(self.connections):
                try:
                    connection.tick(now)
                except Exception:
                    log.exception("housekeeping of a %s connection failed", connection.transport_name)

    # -- connections ----------------------------------------------------------------------

    def group(self, host: str) -> str:
        """What per-address limits count ``host`` under (``limits.address_group``)."""
        return address_group(host, self.settings.server.ipv6_prefix)

    def admit(self, connection: Connection) -> None:
        """Count a new streaming connection in, or refuse it (503 / 1013) when over capacity.

        Its socket was already counted against the connection limits when it opened; here
        streams count per key and, behind a trusted proxy, per forwarded client address."""
        if self.stopping:
            raise Unavailable("the server is shutting down; reconnect in a moment")
        principal = connection.principal
        if principal is not None and principal.max_connections is not None:
            if self._per_key[principal.name] >= principal.max_connections:
                raise Unavailable(
                    f"over capacity: key {principal.name!r} has its {principal.max_connections} connections open",
                    code="over_capacity",
                )
        if connection.forwarded:
            self.enter_forwarded(connection.client_group, connection.client_host)
        if principal is not None and principal.max_connections is not None:
            self._per_key[principal.name] += 1
        self.connections.add(connection)
        if principal is not None and principal.expires is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, principal.expires - time.time())
            self._expiries[connection] = loop.call_later(delay, self._expire, connection)

    def enter_forwarded(self, group: str, host: str) -> None:
        """A client behind a trusted proxy begins a request or a stream: counted against the
        per-client limit as its own socket would be (the proxy's socket is not), or refused."""
        limit = self.settings.server.max_connections_per_client
        clients = self.sockets.clients
        if clients.count(group) >= limit:
            self.sockets.refused["per_client"] += 1
            raise Unavailable(f"over capacity: {limit} connections from {host} are open", code="over_capacity")
        clients.add(group, 1)

    def leave_forwarded(self, group: str) -> None:
        self.sockets.clients.add(group, -1)

    def _expire(self, connection: Connection) -> None:
        self._expiries.pop(connection, None)
        log.info("closing a %s connection from %s: token expired", connection.transport_name, connection.client_host)
        connection.expire()

    def limit_send_buffer(self, transport) -> None:
        """Cap the kernel's send buffer so a stalled client shows up as slow after kilobytes, not
        megabytes (Linux autotunes it up to tcp_wmem's 4 MiB), and kernel memory stays bounded."""
        size = self.settings.server.socket_send_buffer
        sock = transport.get_extra_info("socket")
        if size is not None and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            except OSError:
                log.debug("could not set SO_SNDBUF", exc_info=True)

    def release(self, connection: Connection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            if connection.forwarded:
                self.leave_forwarded(connection.client_group)
            if connection.principal is not None and connection.principal.max_connections is not None:
                _decrement(self._per_key, connection.principal.name)
            timer = self._expiries.pop(connection, None)
            if timer is not None:
                timer.cancel()

    def publish_charge(self, principal: Principal | None, count: int) -> Charge | None:
        """What publishing ``count`` events costs ``principal``'s rate (SPEC §6), for the broker to
        spend with the publish itself (so the rate holds for the whole hub); a batch over the
        burst can never pass and is refused here."""
        if principal is None:
            return None
        server = self.settings.server
        rate = principal.publish_rate or server.publish_rate
        burst = principal.publish_burst or server.publish_burst
        if count > burst:
            self.hub.stats.rate_limited += 1
            raise RateLimited(f"body: {count} events exceed this key's burst of {burst}; split the batch", retry_after=count / rate)
        return Charge(f"{principal.kind} {principal.name!r}", f"{principal.kind}:{principal.name}", rate, burst, count)

    def charge_ops(self, host: str, cost: int = 1) -> None:
        """WebSocket op work from ``host``: 1 per op or control frame, plus 1 per pattern beyond
        the first of a (un)subscribe (all of an address's connections share a rate). Settled
        against the address's bucket by ``ops_debt``."""
        self._ops_spent[host] += cost

    def ops_debt(self, host: str, now: float) -> float:
        """Seconds ``host`` must wait before its connections are read again (0: within its share)."""
        bucket = self._client_ops.get(host)
        if bucket is None:
            if len(self._client_ops) >= _MAX_BUCKETS:
                self._client_ops.clear()  # a fresh share for everyone is only ever more lenient
            bucket = self._client_ops[host] = TokenBucket(self.ops_rate, self.ops_burst, now)
        return bucket.spend(now, self._ops_spent.pop(host, 0))

    def ops_turn(self, host: str, now: float, wait: float) -> float:
        """Seconds a connection of ``host`` in debt by ``wait`` seconds sleeps: its turn comes after
        the turns already given to that address's connections, one op's time apart. Turns of
        connections that closed meanwhile are not given back, so a turn may come up to
        ``max_connections_per_client / ws_ops_rate_per_client`` (2 s) later than the debt alone needs."""
        turns = self._ops_turns
        if host not in turns and len(turns) >= _MAX_BUCKETS:
            turns.clear()  # forgetting who waits only lets them read sooner
        turn = turns[host] = max(now + wait, turns.get(host, 0.0) + 1 / self.ops_rate)
        return turn - now

    def count(self, transport: str) -> int:
        return sum(1 for connection in self.connections if connection.transport_name == transport)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
