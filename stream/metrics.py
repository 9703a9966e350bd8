"""Prometheus metrics (SPEC §9), read from the hub's plain counters at scrape time.

The hot path only bumps integers on objects it already touches; this collector turns them
into metric families when ``/metrics`` is scraped. The latency histogram is observed once per
published event, after its fan-out: hub accept -> written to the last live socket.
"""

from __future__ import annotations

import time
from collections import Counter

from prometheus_client import CollectorRegistry, GCCollector, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .events import Event
from .push import Pusher
from .runtime import Runtime
from .siblings import HostMetrics

__all__ = ["Metrics"]

# 1 ms to 1 h: a push upstream's items arrive in milliseconds, a polled one's in up to an
# interval; an upstream sending months-old items lands in +Inf (Prometheus' defaults stop at 10 s).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Built first by the composition root: the hub and the pollers get ``fanned_out`` and
    ``polled`` as their hooks, then ``watch`` reads the runtime's counters at scrape time."""

    def __init__(self) -> None:
        self.siblings: HostMetrics | None = None  # with --workers: the host's other workers
        self.registry = CollectorRegistry()
        # The process's memory, file descriptors and CPU, and the collector's runs per generation.
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.latency = Histogram(
            "stream_delivery_latency_seconds",
            "Hub accept to written to the socket of the last live subscriber, per event",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lag = Histogram(
            "stream_provider_lag_seconds",
            "Hub accept minus the upstream's own published time, per item that has one",
            ["provider"],
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.poll_seconds = Histogram(
            "stream_provider_poll_seconds",
            "Duration of one poll, by provider and outcome",
            ["provider", "outcome"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )

    def watch(self, runtime: Runtime) -> None:
        self.registry.register(_HubCollector(runtime))
        self.registry.register(_ProviderCollector(runtime))

    def fanned_out(self, event: Event) -> None:
        self.latency.observe(max(0.0, time.time() - event.ts / 1000))

    def lagged(self, provider: str, seconds: float) -> None:
        self.lag.labels(provider).observe(seconds)

    def polled(self, provider: str, outcome: str, seconds: float) -> None:
        self.poll_seconds.labels(provider, outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """What /metrics answers: this process's metrics, or with ``--workers`` every worker's of
        the host (``siblings``), each series labelled with its worker."""
        if self.siblings is None:
            return self.render()
        return merge_expositions(await self.siblings.gather())


def merge_expositions(expositions: dict[str, bytes]) -> bytes:
    """Several processes' expositions as one, each sample labelled ``worker``: prometheus-client's
    multiprocess mode cannot run custom collectors, so the workers' own texts are parsed back and
    the library encodes the result."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value, sample.timestamp, sample.exemplar)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


class _HubCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self):
        runtime, hub = self.runtime, self.runtime.hub
        stats = hub.stats

        connections = GaugeMetricFamily(
            "stream_connections", "Open client sockets: streams by transport, http = every other socket", labels=["transport"]
        )
        by_transport = Counter(c.transport_name for c in runtime.connections)
        for name in ("ws", "sse"):
            connections.add_metric([name], by_transport.get(name, 0))
        sockets = runtime.sockets
        connections.add_metric(["http"], max(0, len(sockets.open) - by_transport.get("ws", 0) - by_transport.get("sse", 0)))
        yield connections
        yield GaugeMetricFamily("stream_sockets", "Open client sockets of every kind", value=len(sockets.open))
        yield GaugeMetricFamily("stream_sockets_limit", "Sockets served before over capacity", value=sockets.limit)
        yield _by_reason(
            "stream_sockets_refused",
            "New sockets answered over capacity (over_capacity, per_client) or closed at once (fd_margin)",
            sockets.refused,
        )
        yield _by_reason("stream_sockets_closed", "Sockets the server closed on a misbehaving client", runtime.closed)
        refused = Counter({"too_many_topics": stats.topics_refused, "rate_limited": stats.rate_limited})
        yield _by_reason("stream_publish_refused", "Publishes refused by a limit", refused)
        yield CounterMetricFamily(
            "stream_ws_ops_refused", "WebSocket ops and control frames refused by the op rate", value=runtime.ops_refused
        )
        yield CounterMetricFamily(
            "stream_ws_ops_throttled",
            "Times a WebSocket connection's reading was paused for its address's share of op work",
            value=runtime.ops_throttled,
        )

        yield GaugeMetricFamily(
            "stream_subscriptions", "Patterns subscribed, over all connections", value=sum(len(s.wants) for s in hub.subscribers)
        )

        published = CounterMetricFamily("stream_events_published", "Events accepted by the hub", labels=["prefix"])
        for prefix, count in sorted(stats.published.items()):
            published.add_metric([prefix], count)
        yield published

        sent, writes = Counter(stats.sent_by_closed), Counter(stats.writes_by_closed)
        for sub in hub.subscribers:
            sent[sub.transport_name] += sub.sent
            writes[sub.transport_name] += sub.sent - sub.merged
        deliveries = CounterMetricFamily("stream_deliveries", "Events written to subscribers", labels=["transport"])
        for name, count in sorted(sent.items()):
            deliveries.add_metric([name or "other"], count)
        yield deliveries
        event_writes = CounterMetricFamily(
            "stream_event_writes", "Socket writes that carried events (a write window or a batch puts several in one)", labels=["transport"]
        )
        for name, count in sorted(writes.items()):
            event_writes.add_metric([name or "other"], count)
        yield event_writes

        dropped = stats.dropped_by_closed + sum(s.dropped for s in hub.subscribers)
        yield CounterMetricFamily("stream_dropped_events", "Events discarded by overflow policies", value=dropped)

        gaps = CounterMetricFamily("stream_gaps", "Gap notices sent to subscribers", labels=["reason"])
        for reason, count in sorted(stats.gaps.items()):
            gaps.add_metric([reason], count)
        yield gaps

        yield CounterMetricFamily(
            "stream_slow_consumer_disconnects", "Subscribers closed because their buffer overflowed", value=stats.slow_consumers
        )
        broker = hub.broker
        yield GaugeMetricFamily("stream_broker_up", "1 while the broker is usable (/readyz)", value=0 if broker.problem() else 1)
        yield GaugeMetricFamily(
            "stream_broker_lag_seconds", "Newest event known written to the broker minus newest read by this node", value=broker.lag()
        )
        yield CounterMetricFamily("stream_broker_reconnects", "Connections to the broker restored after an outage", value=broker.reconnects)
        yield CounterMetricFamily("stream_broker_epoch_changes", "Times the broker lost its data and a new epoch began", value=broker.epoch_changes)
        yield CounterMetricFamily("stream_lease_changes", "Provider leases this node gained or lost", value=runtime.pollers.leases.changes)
        yield GaugeMetricFamily("stream_history_events", "Events held in history", value=len(hub.store.history))
        yield GaugeMetricFamily("stream_history_bytes", "Memory held by history (Event.size)", value=hub.store.history.bytes)
        yield GaugeMetricFamily("stream_retained_topics", "Topics with a retained value", value=len(hub.store.retained))
        yield GaugeMetricFamily(
            "stream_retained_bytes", "Memory of the retained events (shared with history while held there)", value=hub.store.retained_bytes
        )
        yield GaugeMetricFamily(
            "stream_pending_events", "Events waiting in subscriber buffers", value=sum(s.backlog for s in hub.subscribers)
        )


def _by_reason(name: str, documentation: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


class _ProviderCollector(Collector):
    """Per-provider poll results, items and freshness, read from the pollers at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self):
        pollers = self.runtime.pollers.pollers
        polls = CounterMetricFamily("stream_provider_polls", "Polls by provider and outcome", labels=["provider", "outcome"])
        published = CounterMetricFamily("stream_provider_items_published", "Items published", labels=["provider"])
        skipped = CounterMetricFamily("stream_provider_items_skipped", "Malformed items skipped", labels=["provider"])
        failures = GaugeMetricFamily("stream_provider_consecutive_failures", "Failed polls in a row", labels=["provider"])
        state = GaugeMetricFamily("stream_provider_state", "1 for the provider's current state", labels=["provider", "state"])
        fresh = GaugeMetricFamily(
            "stream_provider_freshness_seconds", "Now minus the newest upstream item's published time", labels=["provider"]
        )
        messages = CounterMetricFamily("stream_provider_messages", "Messages a push provider received", labels=["provider"])
        reconnects = CounterMetricFamily("stream_provider_reconnects", "Push connections that ended and were replaced", labels=["provider"])
        oversized = CounterMetricFamily(
            "stream_provider_oversized_messages", "Push messages over max_message_bytes (each dropped its connection)", labels=["provider"]
        )
        dropped = CounterMetricFamily("stream_provider_items_dropped", "Pushed items over max_items_per_second, dropped", labels=["provider"])
        connected = GaugeMetricFamily("stream_provider_connected_seconds", "How long the push connection has been up (0: down)", labels=["provider"])
        now = time.time()
        for poller in pollers:
            name = poller.provider.name
            for outcome, count in sorted(poller.outcomes.items()):
                polls.add_metric([name, outcome], count)
            published.add_metric([name], poller.items_published)
            skipped.add_metric([name], poller.items_skipped)
            failures.add_metric([name], poller.consecutive_failures)
            for value in type(poller.state):
                state.add_metric([name, value.value], 1 if poller.state is value else 0)
            if poller.newest_published is not None:
                fresh.add_metric([name], max(0.0, now - poller.newest_published))
            if isinstance(poller, Pusher):
                messages.add_metric([name], poller.messages)
                reconnects.add_metric([name], poller.reconnects)
                oversized.add_metric([name], poller.oversized)
                dropped.add_metric([name], poller.items_dropped)
                connected.add_metric([name], max(0.0, now - poller.connected_since) if poller.connected_since else 0.0)
        yield from (polls, published, skipped, failures, state, fresh, messages, reconnects, oversized, dropped, connected)
