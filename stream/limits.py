"""Rate and socket limits. Pure: the caller passes the time and the process's limits."""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter

__all__ = ["Admission", "SocketLimits", "TokenBucket", "TrustedProxies"]


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


class SocketLimits:
    """Counts every open client socket, in all and per client address, against the limits.

    ``nofile`` is the process's file-descriptor limit: sockets are served up to
    ``min(max_connections, nofile - fd_margin)``; past that they are answered "over capacity"
    until ``nofile - fd_margin / 2``, and refused beyond, so the process never runs out of
    descriptors for its own files, upstream connections and health checks.
    """

    def __init__(self, max_connections: int, per_client: int, fd_margin: int, nofile: int) -> None:
        self.limit = max(1, min(max_connections, nofile - fd_margin))
        self.hard = max(self.limit + 1, nofile - fd_margin // 2)
        self.per_client = per_client
        self.over_per_client = max(OVER_PER_CLIENT, (self.hard - self.limit) // 4)
        self.open: dict[object, tuple[str, Admission]] = {}
        self.per_host: Counter[str] = Counter()
        self.over_per_host: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # by reason: over_capacity, per_client, fd_margin

    def opened(self, key: object, host: str, *, counted_by_address: bool = True) -> Admission:
        """Admit a new socket (``key`` identifies it until ``closed``). A trusted proxy's
        sockets are not limited by address: the clients behind it are, per request."""
        total = len(self.open)
        if total >= self.hard or (self.over_per_host[host] >= self.over_per_client and self._over(total, host, counted_by_address)):
            self.refused["fd_margin" if total >= self.hard else "per_client"] += 1
            return Admission.REFUSE
        admission = Admission.SERVE
        if total >= self.limit:
            admission = Admission.OVER
            self.refused["over_capacity"] += 1
        elif counted_by_address and self.per_host[host] >= self.per_client:
            admission = Admission.OVER
            self.refused["per_client"] += 1
        self.open[key] = (host, admission)
        self.per_host[host] += 1
        if admission is Admission.OVER:
            self.over_per_host[host] += 1
        return admission

    def _over(self, total: int, host: str, counted_by_address: bool) -> bool:
        return total >= self.limit or (counted_by_address and self.per_host[host] >= self.per_client)

    def admission(self, key: object) -> Admission | None:
        entry = self.open.get(key)
        return None if entry is None else entry[1]

    def closed(self, key: object) -> None:
        """Forget a socket; idempotent."""
        entry = self.open.pop(key, None)
        if entry is None:
            return
        host, admission = entry
        _decrement(self.per_host, host)
        if admission is Admission.OVER:
            _decrement(self.over_per_host, host)


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
