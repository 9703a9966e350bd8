"""Provider leases on Redis: which node of a hub polls each provider (SPEC §10).

``RedisLeases`` runs one keeper task per provider on each node: every
``lease_ttl / 3`` (a failed attempt again after 0.25 s) it takes or renews that provider's lease (``SET NX PX``, renewed only by its
holder), or reads the holder's last saved status. Keepers are independent of each other and
of publishing (a connection pool of their own), and each renewal is bounded by
``redis_timeout`` (or half the hold left, if longer), so one slow command delays no other lease. A node counts a lease as held for
two thirds of the TTL after the renewal was asked, so a node that cannot reach Redis stops
polling before the lease can pass to another node.

Fencing: each time a node takes a lease it increments the provider's fence in Redis and keeps
the value. Its publishes, primes and saves carry it (``Fence``) and Redis refuses them once the
fence moved on: a node whose poll outlived its lease (a stalled process, a partition) never
publishes what the next holder publishes, nor overwrites what it saved. The holder saves the
provider's dedup memory and conditional-GET validators after each poll; the next holder starts
from them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from .errors import BrokerUnavailable, LeaseLost
from .hub import Fence
from .hub.redis_link import redis_failure
from .hub.redis_scripts import HOLD, PREFIX, RELEASE, SAVE
from .leases import Leases

__all__ = ["RedisLeases"]

log = logging.getLogger("stream.leases")

RETRY_AFTER = 0.25  # seconds before a failed renewal is tried again


class RedisLeases(Leases):
    def __init__(self, redis: Any, node: str, ttl: float, timeout: float, connections: int = 0) -> None:
        super().__init__()
        self.redis = redis
        self.connections = connections  # its pool's size: descriptors the server keeps for it
        self.node: str = node
        self.ttl = ttl
        self.timeout = timeout
        self._hold = redis.register_script(HOLD)
        self._release = redis.register_script(RELEASE)
        self._save = redis.register_script(SAVE)
        self._names: list[str] = []
        self._held_until: dict[str, float] = {}  # monotonic deadline of each lease held here
        self._fences: dict[str, str] = {}  # the fence this node got when it last took each lease
        self._holders: dict[str, str | None] = {}  # as of the last renewal (None: unknown)
        self._statuses: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, names: list[str]) -> None:
        self._names = list(names)
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._keep(name), name=f"lease {name}") for name in self._names]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = [name for name in self._names if self.holds(name)]
        self._held_until.clear()
        try:
            # Bounded: with Redis away, shutdown must not wait on it; the leases then expire by themselves.
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(self._release(keys=[self._key("lease", name)], args=[self.node]) for name in held))
        except Exception as exc:
            log.info("leases: could not release %s (%s); they expire within %.0f s", ", ".join(held), redis_failure(exc), self.ttl)

    def holds(self, name: str) -> bool:
        return time.monotonic() < self._held_until.get(name, 0.0)

    def fence(self, name: str) -> Fence:
        return Fence(self._key("fence", name), self._fences.get(name, ""))

    def holder(self, name: str) -> str | None:
        return self.node if self.holds(name) else self._holders.get(name)

    def status_elsewhere(self, name: str) -> dict[str, Any] | None:
        return None if self.holds(name) else self._statuses.get(name)

    async def load(self, name: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.redis.hget(self._key("poller", name), "state")
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"could not read the provider's saved state from Redis ({redis_failure(exc)})") from None
        return None if raw is None else orjson.loads(raw)

    async def save(self, name: str, state: dict[str, Any], fence: Fence | None) -> None:
        await self._save_field(name, "state", state, fence)

    async def save_status(self, name: str, status: dict[str, Any], fence: Fence | None) -> None:
        await self._save_field(name, "status", status, fence)

    async def _save_field(self, name: str, field: str, value: dict[str, Any], fence: Fence | None) -> None:
        token = (fence or self.fence(name)).token
        try:
            async with asyncio.timeout(self.timeout):
                saved = await self._save(keys=[self._key("poller", name), self._key("fence", name)], args=[token, field, orjson.dumps(value)])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"could not save the provider's {field} in Redis ({redis_failure(exc)}); it is saved after the next poll") from None
        if not saved:
            raise LeaseLost(f"provider {name}: the lease passed to another node; its {field} was not saved")

    def _key(self, kind: str, name: str) -> str:
        return f"{PREFIX}{kind}:{name}"

    async def _keep(self, name: str) -> None:
        while True:
            try:
                async with asyncio.timeout(self._patience(name)):
                    await self._renew(name)
                pause = self.ttl / 3
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not renewed: tried again soon, while the lease is still held here; if no renewal
                # gets through, it lapses here (holds() turns false) before Redis lets it go.
                self._holders[name] = None
                log.debug("leases: renewing %s failed: %s", name, redis_failure(exc))
                pause = min(self.ttl / 3, RETRY_AFTER)
            await asyncio.sleep(pause)

    def _patience(self, name: str) -> float:
        """How long one renewal may take: ``redis_timeout``, or half of what is left of the hold
        if that is longer. The hold lapses on time whatever the renewal does, so a slow answer
        costs no safety; cutting it short would, through a slow link, cost a reconnect (more
        round trips) on every retry, and the lease would lapse for want of patience."""
        return max(self.timeout, (self._held_until.get(name, 0.0) - time.monotonic()) / 2)

    async def _renew(self, name: str) -> None:
        asked = time.monotonic()
        keys = [self._key("lease", name), self._key("fence", name), self._key("poller", name)]
        holder_raw, extra = await self._hold(keys=keys, args=[self.node, int(self.ttl * 1000)])
        holder = holder_raw.decode()
        had = self.holds(name)
        if holder == self.node:
            self._held_until[name] = asked + self.ttl * 2 / 3
            self._fences[name] = fence = extra.decode()
            self._statuses.pop(name, None)  # another node's, from before this node held it
            if not had:
                self.changes += 1
                log.info("leases: this node (%s) now polls provider %s (fence %s)", self.node, name, fence.split()[0])
        else:
            self._held_until.pop(name, None)
            if had:
                self.changes += 1
                log.warning("leases: provider %s is now polled by %s", name, holder)
            if extra is not None:
                self._statuses[name] = orjson.loads(extra)
        self._holders[name] = holder
