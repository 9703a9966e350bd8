"""Rate and socket limits. Pure: the caller passes the time and the process's limits."""

from __future__ import annotations

import enum
import ipaddress
import itertools
from collections import Counter, OrderedDict

__all__ = ["AddressCounts", "Admission", "SocketLimits", "TokenBucket", "TrustedProxies", "address_group"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take`` spends one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, count: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= count:
            self.tokens -= count
            return True
        return False

    def spend(self, now: float, count: float) -> float:
        """Spend ``count`` tokens even past zero (the work is done already); the seconds until
        the bucket is out of debt again (0 when it is not in debt)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - count
        self.stamp = now
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def available(self, now: float) -> float:
        """Tokens there are now (none spent)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def wait_time(self, count: float = 1.0) -> float:
        """Seconds until ``count`` tokens are available."""
        return max(0.0, (min(count, self.burst) - self.tokens) / self.rate)


class Admission(enum.Enum):
    """What a new socket may do (SPEC §6: every socket counts against the connection limits)."""

    SERVE = "serve"
    OVER = "over"  # told "over capacity" as soon as its head arrives (health checks still served)
    REFUSE = "refuse"  # closed at once: the file-descriptor margin is reached


# Over-capacity sockets from one address that may wait for their head at the same time: a
# quarter of the room between the limit and the descriptor cap (at least 8). Past it that
# address's sockets are closed at once, so one address cannot take all the room health checks
# and other clients' "over capacity" answers need.
OVER_PER_CLIENT = 8
# Once this share of the limit is open, an address (group) already holding more than FAIR_SHARE
# of the limit gets no new socket, while addresses holding fewer are still served to the limit:
# a few addresses cannot fill the server and leave everyone else "over capacity".
CROWDED, FAIR_SHARE = 0.9, 0.01
# At the descriptor cap, how many of the oldest sockets still waiting for their first head are
# looked at for one to drop in favour of a newcomer from a smaller address (group).
EVICTION_LOOK = 16


def address_group(host: str, ipv6_prefix: int) -> str:
    """The key per-address limits count ``host`` under: an IPv4 address as it is (an
    IPv4-mapped IPv6 address ``::ffff:a.b.c.d`` included), an IPv6 address as its
    ``/ipv6_prefix`` network (one IPv6 client owns a whole /64), anything else as it is."""
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


class AddressCounts:
    """Sockets (and, behind a trusted proxy, streams and requests) held per address group, for
    the per-client limit. This process's own count; with ``--workers`` a table shared by the
    workers of a host takes its place (``workers.SharedCounts``), so the limit holds for the host."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, group: str) -> int:
        return self._counts[group]

    def add(self, group: str, delta: int) -> None:
        self._counts[group] += delta
        if self._counts[group] <= 0:
            del self._counts[group]


class SocketLimits:
    """Counts every open client socket, in all and per client address group, against the limits.

    ``nofile`` is the process's file-descriptor limit and ``reserved`` what its own pools may
    hold (Redis and upstream connections): sockets are served up to
    ``min(max_connections, nofile - reserved - fd_margin)``; past that they are answered "over
    capacity" while the sockets open in all stay under ``nofile - reserved - fd_margin / 2``. At that cap a newcomer takes the place
    of one of the oldest sockets still waiting for their first head, if that socket's address
    holds at least two more sockets than the newcomer's (the attacker holding the most loses its
    idle sockets, a health check gets in); otherwise it is closed at once. So the process never runs
    out of descriptors for its own files, pools and health checks.
    """

    def __init__(
        self, max_connections: int, per_client: int, fd_margin: int, nofile: int, *, reserved: int = 0, clients: AddressCounts | None = None
    ) -> None:
        room = nofile - reserved
        self.limit = max(1, min(max_connections, room - fd_margin))
        self.hard = max(self.limit + 1, room - fd_margin // 2)
        self.per_client = per_client
        self.over_per_client = max(OVER_PER_CLIENT, (self.hard - self.limit) // 4)
        self.crowded = int(self.limit * CROWDED)
        self.fair_share = max(1, int(self.limit * FAIR_SHARE))
        self.clients = clients or AddressCounts()  # per group, for per_client (host-wide with workers)
        self.open: dict[object, tuple[str, Admission, bool]] = {}  # key -> (group, admission, counted by address)
        # Sockets served (not over capacity): what max_connections bounds. Over-capacity ones
        # hold descriptors (``hard``) while they get their answer, not a place among the served.
        self.served = 0
        self.per_host: Counter[str] = Counter()  # this process's sockets per group
        self.over_per_host: Counter[str] = Counter()
        self.fresh: OrderedDict[object, str] = OrderedDict()  # sockets yet to send a head, oldest first
        self.refused: Counter[str] = Counter()  # by reason: over_capacity, per_client, fair_share, fd_margin

    def opened(self, key: object, group: str, *, counted_by_address: bool = True) -> tuple[Admission, object | None]:
        """Admit a new socket (``key`` identifies it until ``closed``), and the key of a socket to
        drop for it (already forgotten here), if any. A trusted proxy's sockets are not limited
        by address: the clients behind it are, per request."""
        evicted = None
        if len(self.open) >= self.hard:
            evicted = self._evict_for(group)
            if evicted is None:
                self.refused["fd_margin"] += 1
                return Admission.REFUSE, None
        elif self.over_per_host[group] >= self.over_per_client and self._over(group, counted_by_address):
            self.refused["per_client"] += 1
            return Admission.REFUSE, None
        admission = Admission.SERVE
        if self.served >= self.limit:
            admission = Admission.OVER
            self.refused["over_capacity"] += 1
        elif counted_by_address and self.clients.count(group) >= self.per_client:
            admission = Admission.OVER
            self.refused["per_client"] += 1
        elif counted_by_address and self.served >= self.crowded and self.per_host[group] > self.fair_share:
            admission = Admission.OVER
            self.refused["fair_share"] += 1
        self.open[key] = (group, admission, counted_by_address)
        self.fresh[key] = group
        self.per_host[group] += 1
        if counted_by_address:
            self.clients.add(group, 1)
        if admission is Admission.OVER:
            self.over_per_host[group] += 1
        else:
            self.served += 1
        return admission, evicted

    def _over(self, group: str, counted_by_address: bool) -> bool:
        return self.served >= self.limit or (counted_by_address and self.clients.count(group) >= self.per_client)

    def _evict_for(self, group: str) -> object | None:
        mine = self.per_host[group]
        for key, owner in itertools.islice(self.fresh.items(), EVICTION_LOOK):
            if self.per_host[owner] > mine + 1:  # still at least as many as the newcomer's after
                self.closed(key)
                return key
        return None

    def engaged(self, key: object) -> None:
        """The socket sent its first request head: it is no longer dropped for a newcomer."""
        self.fresh.pop(key, None)

    def admission(self, key: object) -> Admission | None:
        entry = self.open.get(key)
        return None if entry is None else entry[1]

    def moved(self, key: object, new: object) -> None:
        """The socket known as ``key`` is ``new`` from now on (its TLS transport, once the
        handshake is done). Among the sockets yet to send a head it goes last, as if just
        opened: it has shown it talks, and a place kept in order would cost a walk of them all."""
        entry = self.open.pop(key, None)
        if entry is None:
            return
        self.open[new] = entry
        group = self.fresh.pop(key, None)
        if group is not None:
            self.fresh[new] = group

    def closed(self, key: object) -> None:
        """Forget a socket; idempotent."""
        entry = self.open.pop(key, None)
        if entry is None:
            return
        group, admission, counted = entry
        self.fresh.pop(key, None)
        _decrement(self.per_host, group)
        if counted:
            self.clients.add(group, -1)
        if admission is Admission.OVER:
            _decrement(self.over_per_host, group)
        else:
            self.served -= 1


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class TrustedProxies:
    """``forwarded_allow_ips``: behind a trusted proxy the client is the nearest untrusted
    address in X-Forwarded-For; from anyone else the header is ignored (the default trusts
    nobody, so per-address limits cannot be dodged with a header)."""

    def __init__(self, allowed: list[str] | str | None) -> None:
        items = allowed.split(",") if isinstance(allowed, str) else list(allowed or [])
        items = [item.strip() for item in items if item.strip()]
        self.everyone = "*" in items
        self.networks = []
        for item in items:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                pass  # a hostname or a unix socket path: never a peer address here

    def trusts(self, host: str) -> bool:
        if self.everyone:
            return True
        if not self.networks:  # the default: nobody, decided without parsing the address
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client(self, peer: str, forwarded_for: list[str]) -> str:
        if not forwarded_for or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer
