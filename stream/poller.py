"""Pollers: one asyncio task per provider, all over one shared ``httpx.AsyncClient``.

What goes over HTTP is ``fetch.py``'s (the only place httpx errors exist: they become
``UpstreamError`` there); this module decides when, and what a fetched body means. A poll is

    conditional GET (ETag / Last-Modified) ─▶ 304: nothing to do
        └─▶ body, decoded while streaming and cut at max_bytes ─▶ providers.parse() (pure)
              └─▶ dedup (ids, or last value per key) ─▶ hub.publish_many()

and its outcome decides the next delay: ``interval`` ± jitter after a success; after a failure
an exponential backoff with full jitter between ``interval`` and 15 min, or longer if the
upstream said ``Retry-After``. States (``ProviderState``) follow the run of failures:

    OK ──failure──▶ BACKOFF ──5th failure in a row──▶ FAILING
     ▲                 │                                 │
     └────success──────┴─────────────success─────────────┘      DISABLED: enabled = false
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from .errors import BrokerUnavailable, LeaseLost, UpstreamError
from .fetch import fetch
from .hub import Hub
from .intake import Intake, iso_time
from .leases import Leases
from .provider_settings import ProviderSettings
from .providers import Parsed, parse

__all__ = ["Poller", "ProviderState", "backoff_delay", "iso_time"]

log = logging.getLogger("stream.poller")

FAILING_AFTER = 5  # failures in a row
MAX_BACKOFF = 900.0  # seconds
STANDBY_CHECK = 0.25  # seconds between looks at whether this node got the provider's lease


class ProviderState(enum.Enum):
    OK = "ok"
    BACKOFF = "backoff"
    FAILING = "failing"
    DISABLED = "disabled"


def backoff_delay(interval: float, failures: int, rng: random.Random) -> float:
    """Full jitter between ``interval`` and a ceiling that doubles per failure, up to 15 min
    (an interval already longer than that is kept: a failure never makes polling faster)."""
    ceiling = max(interval, min(MAX_BACKOFF, interval * 2 ** min(failures, 30)))
    return rng.uniform(interval, ceiling)


class Poller(Intake):
    """Polls one provider; owns its validators, schedule, outcomes and state."""

    def __init__(
        self,
        provider: ProviderSettings,
        client: httpx.AsyncClient,
        hub: Hub,
        *,
        base_url: str = "",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_change: Callable[[Poller], None] | None = None,
        on_poll: Callable[[str, str, float], None] | None = None,
        on_lag: Callable[[str, float], None] | None = None,
        leases: Leases | None = None,
    ) -> None:
        super().__init__(provider, hub, clock=clock, leases=leases, on_lag=on_lag)
        self.client = client
        self.url = base_url.rstrip("/") + provider.url if provider.url.startswith("/") else provider.url
        self.rng = rng or random.Random()
        self.on_change = on_change
        self.on_poll = on_poll
        self.state = ProviderState.OK if provider.enabled else ProviderState.DISABLED
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.polls = 0
        self.not_modified = 0
        self.consecutive_failures = 0
        self.outcomes: dict[str, int] = {}
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.next_poll: float | None = None

    # -- the loop -------------------------------------------------------------------------

    async def run(self, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        """Poll until cancelled. Never raises: a bug in one poll is logged and backed off."""
        await sleep(self.rng.uniform(0, min(1.0, self.provider.interval * self.provider.jitter)))
        name = self.provider.name
        while True:
            if not self.leases.holds(name):
                await sleep(STANDBY_CHECK)
                continue
            # Every write of this poll carries the lease it began under: if another node takes
            # the lease meanwhile, Redis refuses them (LeaseLost), and the poll is discarded.
            self.fence = self.leases.fence(name)
            try:
                await self._catch_up()
                delay = await self.poll_once()
                await self._persist()
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                log.info("provider %s: the lease passed to another node during this poll; its result is discarded", name)
                self.restored = None  # the new holder's state is the one to start from next time
                delay = STANDBY_CHECK
            except BrokerUnavailable as exc:  # the saved state could not be read: no poll without it
                log.warning("provider %s: %s", name, exc.message)
                delay = STANDBY_CHECK
            except Exception:
                log.exception("provider %s: unexpected error while polling", name)
                delay = self._failed(UpstreamError("internal", "unexpected error (see the log)"), time.monotonic())
            await sleep(delay)

    # -- state shared with the next lease holder ------------------------------------------

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.etag, self.last_modified = state.get("etag"), state.get("last_modified")

    def _state(self) -> dict[str, Any]:
        return {"etag": self.etag, "last_modified": self.last_modified, **super()._state()}

    async def poll_once(self) -> float:
        """One poll, start to finish; returns the delay in seconds until the next one."""
        started = time.monotonic()
        self.polls += 1
        try:
            fetched = await fetch(self.client, self.provider, self.url, (self.etag, self.last_modified), self.clock, self._clean)
            if fetched is None:
                self.not_modified += 1
                return self._succeeded("not_modified", started)
            body, content_type, location, validators = fetched
            if not body:
                raise UpstreamError("empty", "empty body")
            # Parsing is CPU work (feedparser on a 5 MiB feed takes seconds): off the event loop.
            parsed = await asyncio.to_thread(self._parse, body, content_type, location)
            published = await self._publish(parsed)
        except UpstreamError as exc:
            return self._failed(exc, started)
        # Validators of a document whose items were not all published are not kept: the next
        # poll must get the whole document again, not a 304.
        if published and (self.etag, self.last_modified) != validators:
            self.etag, self.last_modified = validators
            self.dirty = True
        return self._succeeded("ok", started)

    def _parse(self, body: bytes, content_type: str | None, location: str) -> Parsed:
        try:
            parsed = parse(self.provider, body, content_type=content_type, location=location)
        except UpstreamError:
            raise
        except Exception as exc:  # a parser bug or an input feedparser chokes on
            log.exception("provider %s: parser failed", self.provider.name)
            raise UpstreamError("bad_body", f"could not parse the body ({type(exc).__name__})") from None
        if parsed.warning:
            log.info("provider %s: document used despite a parse warning: %s", self.provider.name, parsed.warning)
        return parsed

    # -- dedup and publishing -------------------------------------------------------------

    async def _publish(self, parsed: Parsed) -> bool:
        """Publish what is new in ``parsed``; False when some of it could not be (it is tried
        again at the next poll)."""
        provider = self.provider
        self._report_skips(parsed)
        self._note_times(parsed.items)
        fresh, remember = self._fresh(parsed.items)
        if not self.primed:
            if not parsed.items:
                return True  # an empty first answer primes nothing: wait for a real one
            if not provider.backfill:
                # What upstream holds now becomes the retained values, so snapshots and
                # /api/topics have them at once; no event is published for them.
                primed = await self._prime(fresh)
                if primed is None:
                    return False
                self.primed = self.dirty = True
                self._remember(remember, len(parsed.items))
                log.info(
                    "provider %s: primed with %d items, %d retained values (backfill off)",
                    provider.name,
                    len(parsed.items),
                    primed,
                )
                return True
            self.primed = self.dirty = True
        if not await self._publish_items(fresh):
            return False
        # Only now: an item whose publish failed is tried again at the next poll.
        self._remember(remember, len(parsed.items))
        return True

    # -- outcomes -------------------------------------------------------------------------

    def _succeeded(self, outcome: str, started: float) -> float:
        self._count(outcome, started)
        before = self.state
        self.consecutive_failures = 0
        self.last_ok = self.clock()
        self.state = ProviderState.OK
        jitter = self.provider.jitter
        delay = self.provider.interval * (1 + self.rng.uniform(-jitter, jitter))
        self.next_poll = self.clock() + delay
        if before is not ProviderState.OK:
            log.info("provider %s: recovered (%s)", self.provider.name, outcome)
        self._changed(before)
        return delay

    def _failed(self, exc: UpstreamError, started: float) -> float:
        self._count(exc.kind, started)
        before = self.state
        self.consecutive_failures += 1
        failures = self.consecutive_failures
        self.state = ProviderState.FAILING if failures >= FAILING_AFTER else ProviderState.BACKOFF
        self.last_error = self._clean(f"{exc.kind}: {exc.message}")
        delay = backoff_delay(self.provider.interval, failures, self.rng)
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        self.next_poll = self.clock() + delay
        log.warning(
            "provider %s: %s; next poll in %.0f s (failure %d in a row, %s)",
            self.provider.name,
            self.last_error,
            delay,
            failures,
            self.state.value,
        )
        self._changed(before)
        return delay

    def _count(self, outcome: str, started: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.on_poll is not None:
            self.on_poll(self.provider.name, outcome, time.monotonic() - started)

    def _changed(self, before: ProviderState) -> None:
        first = self.polls == 1
        if (self.state is not before or first) and self.on_change is not None:
            self.on_change(self)

    def status(self) -> dict[str, Any]:
        provider = self.provider
        return {
            "name": provider.name,
            "kind": provider.kind,
            "state": self.state.value,
            "last_ok": iso_time(self.last_ok),
            "last_error": self.last_error,
            "next_poll": iso_time(self.next_poll) if self.state is not ProviderState.DISABLED else None,
            "polls": self.polls,
            "not_modified": self.not_modified,
            "items_published": self.items_published,
            "items_skipped": self.items_skipped,
            "consecutive_failures": self.consecutive_failures,
            "last_lag": self.last_lag,
            "node": self.leases.holder(provider.name),
        }

