"""Who polls each provider: exactly one node of a hub at a time (SPEC §10).

With the memory broker one process is the whole hub, so ``Leases`` holds every lease and keeps
nothing. With Redis, ``RedisLeases`` runs one keeper task per node: every ``lease_ttl / 3`` it
takes or renews each provider's lease (``SET NX PX``, renewed only by its holder) and reads the
holder's last saved status for the providers it does not hold. A node counts a lease as held
for two thirds of the TTL after its last confirmed renewal, so a node that cannot reach Redis
stops polling before the lease can pass to another node. The holder saves the provider's dedup
memory and conditional-GET validators after each poll; the next holder starts from them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

__all__ = ["Leases", "RedisLeases"]

log = logging.getLogger("stream.leases")


class Leases:
    """One process: every lease is held here, and provider state lives in its pollers."""

    node: str | None = None  # named only in a cluster

    def __init__(self) -> None:
        self.changes = 0  # leases gained or lost by this node (a metric)

    def start(self, names: list[str]) -> None:
        """Begin holding the leases of ``names`` (called once the pollers start)."""

    async def stop(self) -> None:
        """Stop renewing; held leases are released so another node takes over at once."""

    def holds(self, name: str) -> bool:
        return True

    def term(self, name: str) -> int:
        """Which term of holding ``name`` this is: it changes each time this node gains it."""
        return 0

    def holder(self, name: str) -> str | None:
        return self.node

    def status_elsewhere(self, name: str) -> dict[str, Any] | None:
        """The status the holder last saved, when another node holds the lease."""
        return None

    async def load(self, name: str) -> dict[str, Any] | None:
        """The provider state the previous holder saved (None: start fresh)."""
        return None

    async def save(self, name: str, state: dict[str, Any]) -> None:
        """Keep the provider's state for whichever node holds the lease next."""

    async def save_status(self, name: str, status: dict[str, Any]) -> None:
        """Publish the provider's status to the nodes that do not poll it."""


# Renews the lease if this node holds it, takes it if nobody does; returns the holder.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return holder
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"""
# Gives the lease up only if this node still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLeases(Leases):
    def __init__(self, redis: Any, node: str, ttl: float, prefix: str = "stream:") -> None:
        super().__init__()
        self.redis = redis
        self.node: str = node
        self.ttl = ttl
        self.prefix = prefix
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self._names: list[str] = []
        self._held_until: dict[str, float] = {}  # monotonic deadline of each lease held here
        self._holders: dict[str, str | None] = {}
        self._statuses: dict[str, dict[str, Any]] = {}
        self._terms: dict[str, int] = {}  # per name: how many times this node gained the lease
        self._task: asyncio.Task[None] | None = None

    def start(self, names: list[str]) -> None:
        self._names = list(names)
        if self._names and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="provider leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        held = [name for name in self._names if self.holds(name)]
        self._held_until.clear()
        try:
            # Bounded: with Redis away, shutdown must not wait on it; the leases then expire by themselves.
            async with asyncio.timeout(2.0):
                for name in held:
                    await self._release(keys=[self._key("lease", name)], args=[self.node])
        except Exception as exc:
            log.info("leases: could not release %s (%s); they expire within %.0f s", ", ".join(held), exc.__class__.__name__, self.ttl)

    def holds(self, name: str) -> bool:
        return time.monotonic() < self._held_until.get(name, 0.0)

    def term(self, name: str) -> int:
        return self._terms.get(name, 0)

    def holder(self, name: str) -> str | None:
        return self.node if self.holds(name) else self._holders.get(name)

    def status_elsewhere(self, name: str) -> dict[str, Any] | None:
        return None if self.holds(name) else self._statuses.get(name)

    async def load(self, name: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self._key("poller", name), "state")
        return None if raw is None else orjson.loads(raw)

    async def save(self, name: str, state: dict[str, Any]) -> None:
        await self.redis.hset(self._key("poller", name), "state", orjson.dumps(state))

    async def save_status(self, name: str, status: dict[str, Any]) -> None:
        await self.redis.hset(self._key("poller", name), "status", orjson.dumps(status))

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def _keep(self) -> None:
        while True:
            for name in self._names:
                try:
                    await self._renew(name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Not renewed: it lapses here (holds() turns false) before Redis lets it go.
                    log.debug("leases: renewing %s failed: %s", name, exc.__class__.__name__)
            await asyncio.sleep(self.ttl / 3)

    async def _renew(self, name: str) -> None:
        asked = time.monotonic()
        holder = (await self._hold(keys=[self._key("lease", name)], args=[self.node, int(self.ttl * 1000)])).decode()
        had = self.holds(name)
        if holder == self.node:
            self._held_until[name] = asked + self.ttl * 2 / 3
            if not had:
                self._terms[name] = self._terms.get(name, 0) + 1
                self.changes += 1
                log.info("leases: this node (%s) now polls provider %s", self.node, name)
        else:
            self._held_until.pop(name, None)
            if had:
                self.changes += 1
                log.warning("leases: provider %s is now polled by %s", name, holder)
            raw = await self.redis.hget(self._key("poller", name), "status")
            if raw is not None:
                self._statuses[name] = orjson.loads(raw)
        self._holders[name] = holder
