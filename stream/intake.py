"""What every provider does with items once it has them, polled or pushed: remember what it
published (dedup ids, or the last value per key), publish what is new under its lease's fence,
measure how late each item reached the hub, and hand its state on to the next lease holder.

``Poller`` (poller.py) and ``Pusher`` (push.py) are ``Intake``s: they differ in how items
arrive, not in what happens to them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from .errors import BrokerUnavailable, LeaseLost, StreamError
from .hub import Draft, Fence, Hub
from .leases import Leases
from .provider_settings import ProviderSettings
from .providers import Item, Parsed

__all__ = ["Intake", "iso_time"]

log = logging.getLogger("stream.poller")


class Intake:
    """One provider's dedup memory, counters and saved state; subclasses bring the items."""

    def __init__(
        self,
        provider: ProviderSettings,
        hub: Hub,
        *,
        clock: Callable[[], float] = time.time,
        leases: Leases | None = None,
        on_lag: Callable[[str, float], None] | None = None,
    ) -> None:
        self.provider = provider
        self.hub = hub
        self.clock = clock
        self.leases = leases or Leases()
        self.on_lag = on_lag  # (provider, seconds) per published item with a time: the lag histogram
        self.seen: OrderedDict[str, bytes | None] = OrderedDict()  # item ids, or key -> last value
        self.primed = False
        self.restored: str | None = None  # the fence of the lease whose saved state this provider took over
        self.unsure = False  # a publish got no answer: it may have been stored, so look in history first
        self.fence: Fence | None = None  # the lease this work runs under: its writes carry it
        self.dirty = False  # state changed since it was last saved
        self.items_published = 0
        self.items_skipped = 0
        self.newest_published: float | None = None
        self.last_lag: float | None = None  # seconds: hub accept minus the newest published item's own time
        self._last_skip_report: tuple[str, ...] = ()
        self._secrets = list(provider.secrets)
        self._values = provider.values
        self._topic_head = provider.topic.split("{", 1)[0]  # every topic it publishes starts so

    # -- state shared with the next lease holder ------------------------------------------

    async def _catch_up(self) -> None:
        """Before work under the lease ``self.fence``: a new taking of it (first, or regained
        after another node held it) takes the state over from Redis, since whoever held it
        meanwhile changed it; after a publish whose answer was lost, look in history first."""
        token = self.fence.token if self.fence is not None else ""
        if self.restored != token:
            await self._restore(token)
        elif self.unsure:
            await self._recall()

    async def _restore(self, token: str) -> None:
        """Take over what the previous holder of the lease saved, and every headline of this
        provider the hub already holds (it may have published some and died before saving)."""
        state = await self.leases.load(self.provider.name)
        if state is not None:
            self._load_state(state)
        await self._recall()
        self.restored = token

    def _load_state(self, state: dict[str, Any]) -> None:
        self.primed = bool(state.get("primed"))
        self.seen = OrderedDict((key, None if value is None else value.encode()) for key, value in state.get("seen", []))

    def _state(self) -> dict[str, Any]:
        return {
            "primed": self.primed,
            "seen": [[key, None if value is None else value.decode()] for key, value in self.seen.items()],
        }

    async def _recall(self) -> None:
        """Remember every headline of this provider the hub holds, once this node has read all
        that was written so far: a publish whose answer was lost may have been stored."""
        if self.provider.headlines:
            await self.hub.settle()
            for event in self.hub.store.history:
                data = event.data if event.topic.startswith(self._topic_head) else None
                if isinstance(data, dict) and data.get("provider") == self.provider.name and isinstance(data.get("id"), str):
                    self.seen[data["id"]] = None
                    self.primed = True
        self.unsure = False

    async def _persist(self) -> None:
        """Save the dedup memory (if it changed) and the status for the other nodes. Redis not
        answering costs nothing but the save: the state stays dirty and is saved next time."""
        try:
            if self.dirty:
                await self._save()
            await self.leases.save_status(self.provider.name, self.status(), self.fence)
        except BrokerUnavailable as exc:
            log.warning("provider %s: %s", self.provider.name, exc.message)

    async def _save(self) -> None:
        state = self._state()
        self.dirty = False  # now: what changes while the save is in flight makes it dirty again
        try:
            await self.leases.save(self.provider.name, state, self.fence)
        except BaseException:
            self.dirty = True  # not saved: tried again next time
            raise

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- dedup and publishing -------------------------------------------------------------

    def _clean(self, text: str) -> str:
        """Remove configured secrets (API keys in params or headers) from a message."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    def _fresh(self, items: list[Item], *, in_order: bool = False) -> tuple[list[Item], dict[str, bytes | None]]:
        """The items not published before (new ids, or changed values), and what to remember
        about them once they are published. Headlines go out oldest first: by their time, or
        reversed (documents list newest first) unless ``in_order`` (a push batch, sent in order)."""
        seen, fresh = self.seen, []
        remember: dict[str, bytes | None] = {}
        missing = object()
        for item in items:
            if item.key in seen:
                seen.move_to_end(item.key)  # still upstream: forget it last
            value = orjson.dumps(item.data) if self._values else None
            before = remember.get(item.key, seen.get(item.key, missing))
            if before is not missing and (not self._values or before == value):
                continue  # published before (or twice in this document)
            remember[item.key] = value
            fresh.append(item)
        if not self._values and not in_order:
            if all(item.published is not None for item in fresh):
                fresh.sort(key=lambda item: item.published)  # type: ignore[arg-type, return-value]
            else:
                fresh.reverse()  # feeds list newest first
        return fresh, remember

    def _remember(self, remember: dict[str, bytes | None], current: int) -> None:
        seen = self.seen
        self.dirty = self.dirty or bool(remember)
        for key, value in remember.items():
            seen[key] = value
            seen.move_to_end(key)
        # Never forget what the current document still lists, whatever dedup_size says.
        while len(seen) > max(self.provider.dedup_size, current):
            seen.popitem(last=False)

    def _note_times(self, items: list[Item]) -> None:
        stamps = [item.published for item in items if item.published is not None]
        if stamps:
            self.newest_published = min(max(stamps), self.clock())  # a future date is not fresher than now

    async def _prime(self, items: list[Item]) -> int | None:
        """Make ``items`` the retained values without an event; None when the broker is away."""
        try:
            return await self.hub.prime([draft for _, draft in self._drafts(items)], fence=self.fence)
        except LeaseLost:
            raise
        except StreamError as exc:  # the broker is away: prime next time, publish nothing
            log.warning("provider %s: could not prime: %s", self.provider.name, exc.message)
            return None

    async def _publish_items(self, items: list[Item]) -> bool:
        """Publish ``items`` in order; False when they could not be (they are tried again)."""
        pairs = self._drafts(items)
        if not pairs:
            return True
        try:
            events = await self.hub.publish_many([draft for _, draft in pairs], fence=self.fence)
        except LeaseLost:
            raise
        except StreamError as exc:  # the broker is away, or a hub limit (max_topics)
            self.items_skipped += len(pairs)
            self.unsure = isinstance(exc, BrokerUnavailable)  # stored maybe, its answer lost
            log.warning("provider %s: %d items not published: %s", self.provider.name, len(pairs), exc.message)
            return False
        self.items_published += len(events)
        self._measure_lag([item for item, _ in pairs], events)
        log.debug("provider %s: published %d new items", self.provider.name, len(events))
        return True

    def _measure_lag(self, items: list[Item], events: list[Any]) -> None:
        """Hub accept minus the upstream's own time, for every item that has one (SPEC §7a)."""
        newest: float | None = None
        for item, event in zip(items, events, strict=False):
            if item.published is None:
                continue
            lag = max(0.0, event.ts / 1000 - item.published)
            if self.on_lag is not None:
                self.on_lag(self.provider.name, lag)
            if newest is None or item.published >= newest:
                newest, self.last_lag = item.published, lag

    def _drafts(self, items: list[Item]) -> list[tuple[Item, Draft]]:
        drafts = []
        for item in items:
            try:
                drafts.append((item, self.hub.draft(item.topic, item.data, field="topic")))
            except StreamError as exc:
                self.items_skipped += 1
                log.info("provider %s: item %r not published: %s", self.provider.name, item.key[:80], exc.message)
        return drafts

    def _report_skips(self, parsed: Parsed) -> None:
        self.items_skipped += parsed.skipped
        report = tuple(parsed.problems)
        if parsed.skipped and report != self._last_skip_report:
            log.info(
                "provider %s: skipped %d malformed item(s): %s",
                self.provider.name,
                parsed.skipped,
                "; ".join(parsed.problems),
            )
        self._last_skip_report = report


def iso_time(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"
