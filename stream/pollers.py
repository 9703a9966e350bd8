"""All the pollers of a process: the shared HTTP client, one task per provider, the status
events on ``_system.providers``, and the latest headlines that ``/api/news`` serves.

Headlines are collected from what the hub accepts (``saw``), not from this process's own
polls: with Redis, only the lease holder polls a provider, and every node serves /api/news."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from . import __version__
from .errors import StreamError
from .events import Event
from .hub import Draft, Hub
from .intake import Intake
from .leases import Leases
from .poller import Poller
from .provider_settings import ProviderSettings
from .providers.base import parse_time
from .push import Pusher
from .topics import PatternIndex

__all__ = ["Pollers"]

log = logging.getLogger("stream.poller")

STATUS_TOPIC = "_system.providers"
HEADLINES_KEPT = 500  # per provider


class Pollers:
    """Every provider's poller, the shared HTTP client, and the latest headlines for /api/news."""

    def __init__(
        self,
        providers: tuple[ProviderSettings, ...],
        hub: Hub,
        *,
        clock: Callable[[], float] = time.time,
        on_poll: Callable[[str, str, float], None] | None = None,
        on_lag: Callable[[str, float], None] | None = None,
        leases: Leases | None = None,
    ):
        self.providers = providers
        self.hub = hub
        self.clock = clock
        self.pollers: list[Poller | Pusher] = []  # every provider's, polled or pushed, in config order
        self.tasks: list[asyncio.Task[None]] = []
        self.client: httpx.AsyncClient | None = None
        self.own_client: httpx.AsyncClient | None = None  # to this process's own /demo/… over its TLS
        self.started = False
        # Per provider, so a chatty source cannot push the others out of /api/news.
        self.headlines: dict[str, deque[tuple[float, Event]]] = {}
        self.on_poll = on_poll  # (provider, outcome, seconds) after every poll: the poll histogram
        self.on_lag = on_lag  # (provider, seconds) per published item with a time: the lag histogram
        self.leases = leases or Leases()
        by_pattern: dict[str, tuple[str, ...]] = {}
        for provider in providers:
            if provider.headlines:
                pattern = provider.topic_pattern()
                by_pattern[pattern] = (*by_pattern.get(pattern, ()), provider.name)
        self._headline_topics: PatternIndex[tuple[str, ...]] = PatternIndex()
        for pattern, names in by_pattern.items():
            self._headline_topics.add(pattern, names)
        hub.observe(self.saw)
        self._status_tasks: set[asyncio.Task[Any]] = set()

    @property
    def connections(self) -> int:
        """Upstream connections the process may open: each poller has one request in flight at
        a time (redirects are followed one by one), each push provider one connection. The
        server keeps descriptors for them."""
        return sum(1 for provider in self.providers if provider.enabled) + 4

    def start(self, base_url: str, own_tls: ssl.SSLContext | None = None) -> None:
        """Create the client and one task per enabled provider (call once the server listens).
        ``own_tls``: what a ``/demo/…`` url trusts when this process serves TLS itself."""
        if self.started:
            return
        self.started = True
        self.client = self._client(True)
        if own_tls is not None:
            self.own_client = self._client(own_tls)
        for provider in self.providers:
            poller: Poller | Pusher
            own = provider.url.startswith("/") and own_tls is not None
            client = self.own_client if own and self.own_client is not None else self.client
            if provider.push:
                poller = Pusher(
                    provider,
                    client,
                    self.hub,
                    base_url=base_url,
                    tls=own_tls if own else None,
                    clock=self.clock,
                    on_change=self._announce,
                    on_lag=self.on_lag,
                    leases=self.leases,
                )
            else:
                poller = Poller(
                    provider,
                    client,
                    self.hub,
                    base_url=base_url,
                    clock=self.clock,
                    on_change=self._announce,
                    on_poll=self.on_poll,
                    on_lag=self.on_lag,
                    leases=self.leases,
                )
            self.pollers.append(poller)
            if provider.enabled:
                self.tasks.append(asyncio.get_running_loop().create_task(poller.run(), name=f"{'push' if provider.push else 'poll'} {provider.name}"))
        if self.pollers:
            enabled = [p for p in self.providers if p.enabled]
            log.info("starting %d provider(s): %s", len(enabled), ", ".join(f"{p.name} ({'push' if p.push else 'polled'}, {p.kind})" for p in enabled))
        self.leases.start([p.name for p in self.providers if p.enabled])
        known = {event.id for kept in self.headlines.values() for _, event in kept}
        for event in self.hub.store.history:  # what the hub held before this process polled
            if event.id not in known:
                self.saw(event)
        for kept in self.headlines.values():  # in published order, as saw() keeps them
            ordered = sorted(kept, key=lambda entry: entry[0])
            kept.clear()
            kept.extend(ordered)

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks + list(self._status_tasks), []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.leases.stop()  # only now: no poll of this node runs once another may take over
        clients, self.client, self.own_client = (self.client, self.own_client), None, None
        for client in clients:
            if client is not None:
                await client.aclose()

    def _client(self, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            limits=httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections),
            timeout=httpx.Timeout(30.0),
            follow_redirects=False,  # Poller._get follows them, keeping keys on their origin
            headers={"User-Agent": f"stream/{__version__} (+https://github.com/stream/stream)"},
            verify=verify,
        )

    def _announce(self, poller: Intake) -> None:
        """Publish a provider's status on _system.providers when its state changes."""
        try:
            draft = self.hub.draft(STATUS_TOPIC, poller.status(), internal=True)
        except StreamError:
            log.exception("cannot publish the status of provider %s", poller.provider.name)
            return
        task = asyncio.get_running_loop().create_task(self._publish_status(poller.provider.name, draft))
        self._status_tasks.add(task)
        task.add_done_callback(self._status_tasks.discard)

    async def _publish_status(self, name: str, draft: Draft) -> None:
        try:
            await self.hub.publish_many([draft])
        except StreamError as exc:  # Redis away: the next change publishes the state anew
            log.info("provider %s: its status was not published on %s: %s", name, STATUS_TOPIC, exc.message)

    def statuses(self) -> list[dict[str, Any]]:
        """Each provider's status as the node polling it sees it. A node that does not hold a
        provider's lease shows what the holder last saved, never its own idle poller; ``node``
        names the holder, null when none is known (nobody holds it, or Redis is unreachable)."""
        if not self.pollers:  # not started (no server yet): the configuration
            return [_idle_status(provider, None) for provider in self.providers]
        statuses = []
        for poller in self.pollers:
            name = poller.provider.name
            if self.leases.holds(name) or not poller.provider.enabled:
                statuses.append(poller.status())
                continue
            holder = self.leases.holder(name)
            saved = self.leases.status_elsewhere(name)
            status = dict(saved) if saved is not None else _idle_status(poller.provider, holder)
            status["node"] = holder
            if holder is None:
                status["next_poll"] = None
                status["last_error"] = "not polled now: no node is known to hold its lease (Redis unreachable, or it is being taken over)"
            statuses.append(status)
        return statuses

    def saw(self, event: Event) -> None:
        """Every event the hub accepts: keep the headlines of this hub's news providers."""
        groups = self._headline_topics.match(event.topic)
        if not groups:
            return
        data = event.data
        if isinstance(data, dict) and any(data.get("provider") in names for names in groups):
            published = parse_time(data.get("published"))
            # A headline dated in the future (a bad clock, ms read as s) sorts as "just now".
            stamp = min(published.timestamp(), event.ts / 1000) if published else event.ts / 1000
            kept = self.headlines.setdefault(data["provider"], deque(maxlen=HEADLINES_KEPT))
            kept.append((stamp, event))

    def news(
        self,
        limit: int,
        symbols: frozenset[str] | None,
        words: str | None,
        allowed: Callable[[Event], bool] = lambda event: True,
    ) -> list[Event]:
        """Latest headlines across news providers, newest first (by published time), filtered:
        ``symbols`` keeps headlines naming one of them, ``words`` searches title and summary,
        ``allowed`` drops what the caller may not read (before the limit is applied)."""
        needle = words.lower() if words else None
        found = []
        for stamp, event in (entry for kept in self.headlines.values() for entry in kept):
            if symbols is not None and (event.symbols is None or symbols.isdisjoint(event.symbols)):
                continue
            if not allowed(event):
                continue
            if needle is not None:
                data = event.data
                if needle not in f"{data.get('title', '')} {data.get('summary', '')}".lower():
                    continue
            found.append((stamp, event.seq, event))
        found.sort(reverse=True, key=lambda entry: (entry[0], entry[1]))
        return [event for _, _, event in found[:limit]]


def _idle_status(provider: ProviderSettings, node: str | None) -> dict[str, Any]:
    """The status of a provider nobody here has polled yet: its configuration."""
    status = {
        "name": provider.name,
        "kind": provider.kind,
        "state": "disabled" if not provider.enabled else "connecting" if provider.push else "ok",
        "last_ok": None,
        "last_error": None,
        "next_poll": None,
        "polls": 0,
        "not_modified": 0,
        "items_published": 0,
        "items_skipped": 0,
        "consecutive_failures": 0,
        "last_lag": None,
        "node": node,
    }
    if provider.push:
        status.update(connected_since=None, messages=0, last_message=None, reconnects=0)
    return status
