"""Who polls each provider: exactly one node of a hub at a time (SPEC §10).

With the memory broker one process is the whole hub, so ``Leases`` holds every lease and keeps
nothing: provider state lives in its pollers. With Redis, ``RedisLeases`` (``redis_leases``)
decides which node polls each provider and keeps the state the holder hands on.
"""

from __future__ import annotations

from typing import Any

from .hub import Fence

__all__ = ["Leases"]


class Leases:
    """One process: every lease is held here, and provider state lives in its pollers."""

    node: str | None = None  # named only in a cluster
    connections = 0  # Redis connections its pool may open (a cluster's)

    def __init__(self) -> None:
        self.changes = 0  # leases gained or lost by this node (a metric)

    def start(self, names: list[str]) -> None:
        """Begin holding the leases of ``names`` (called once the pollers start)."""

    async def stop(self) -> None:
        """Stop renewing; held leases are released so another node takes over at once."""

    def holds(self, name: str) -> bool:
        return True

    def fence(self, name: str) -> Fence | None:
        """The fence of this node's latest taking of ``name`` (None: nothing to fence, one process)."""
        return None

    def holder(self, name: str) -> str | None:
        return self.node

    def status_elsewhere(self, name: str) -> dict[str, Any] | None:
        """The status the holder last saved, when another node holds the lease."""
        return None

    async def load(self, name: str) -> dict[str, Any] | None:
        """The provider state the previous holder saved (None: start fresh)."""
        return None

    async def save(self, name: str, state: dict[str, Any], fence: Fence | None) -> None:
        """Keep the provider's state for whichever node holds the lease next."""

    async def save_status(self, name: str, status: dict[str, Any], fence: Fence | None) -> None:
        """Publish the provider's status to the nodes that do not poll it."""
