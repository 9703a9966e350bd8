"""A node's connections to Redis, and its verdict on whether Redis answers (SPEC §10).

A Redis that hangs (a stopped process, a partition that drops packets rather than refusing
them) answers nothing and refuses nothing, so every command is bounded: each connection has a
socket timeout of ``timeout`` (``redis_timeout``, 1 s), a pool hands out a connection within
that time or refuses, and a health check asks Redis its TIME (a PING that also tells Redis's
clock) on a connection of its own every ``HEALTH_EVERY`` seconds. The node counts Redis as
unreachable from the first check that fails (at most ``HEALTH_EVERY + timeout`` after Redis
stops answering) until one succeeds again.
A single slow or failed command never decides that: it fails alone.

Commands are never retried by redis-py: a publish whose answer was lost must not be added twice.
A command that timed out may still run when Redis wakes up (it was sent), so a publish carries a
deadline in Redis's own clock (``deadline``): the health check reads Redis's TIME and keeps the
offset to this node's clock, and the publish script refuses to run past the deadline, which
falls ``DEADLINE_MARGIN`` before this node gives up waiting. A publish answered 503 is then not
in Redis, and retrying it adds it once, unless the answer itself was lost or late (a link cut
or slowed after Redis ran it): then the outcome is unknown (``Broker.settle`` tells a poller).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = ["HEALTH_EVERY", "RedisLink", "redis_failure"]

log = logging.getLogger("stream.broker")

HEALTH_EVERY = 0.5  # seconds between health checks
DEADLINE_MARGIN = 0.25  # of redis_timeout: a publish's deadline comes this share of it before the node gives up


def redis_failure(exc: BaseException) -> str:
    """What went wrong, for /readyz and logs: the exception's class, never its text (which may
    name the host and, for some errors, echo the URL)."""
    return exc.__class__.__name__


class RedisLink:
    def __init__(self, url: str, timeout: float, on_change: Callable[[], None] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.on_change = on_change  # called when the verdict changes
        self.problem: str | None = "connecting to Redis"
        self.offset: float | None = None  # Redis's clock minus this node's, seconds (None: not measured yet)
        self._health: Any = self.client(1)
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def options(self, socket_timeout: float) -> dict[str, Any]:
        return {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
        }

    def client(self, connections: int) -> Any:
        """A client with a pool of its own: a command waits at most ``timeout`` for one of
        ``connections`` connections, and at most ``timeout`` for its answer. Typed Any:
        redis-py's replies are unions of every shape a command can answer."""
        pool = BlockingConnectionPool.from_url(self.url, max_connections=connections, timeout=self.timeout, **self.options(self.timeout))
        return Redis(connection_pool=pool)

    def blocking_client(self, block: float) -> Any:
        """One connection for a command that blocks up to ``block`` seconds (XREAD BLOCK)."""
        return Redis.from_url(self.url, **self.options(block + self.timeout))

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1)
        try:
            await asyncio.wait_for(self._health.aclose(), 1)
        except Exception:
            pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_EVERY)
            await self.check()

    async def check(self) -> None:
        """One TIME command, bounded by ``timeout`` however Redis behaves: Redis answers, and
        its clock's offset to this node's (kept when the answer came quickly)."""
        try:
            asked = time.time()
            async with asyncio.timeout(self.timeout):
                seconds, micros = await self._health.time()
            answered = time.time()
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            return
        if answered - asked < self.timeout * DEADLINE_MARGIN / 2:
            self.offset = seconds + micros / 1e6 - (asked + answered) / 2
        self._answered()

    def deadline(self) -> str:
        """The publish script's deadline for a command sent now, in Redis's clock (ms); "" before
        the offset is known."""
        if self.offset is None:
            return ""
        return f"{(time.time() + self.offset + self.timeout * (1 - DEADLINE_MARGIN)) * 1000:.0f}"

    def failed(self, exc: BaseException) -> None:
        """Redis did not answer the health check (or refused a connection)."""
        if not self._warned:
            self._warned = True
            log.warning("broker: Redis is unreachable (%s); publishes get 503 until it answers", redis_failure(exc))
        changed = self.problem is None
        self.problem = f"Redis unreachable: {redis_failure(exc)}"
        if changed and self.on_change is not None:
            self.on_change()

    def _answered(self) -> None:
        if self.problem is None:
            return
        self.problem = None
        self._warned = False
        if self.on_change is not None:
            self.on_change()
