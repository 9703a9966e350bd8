"""What a measured run found: ``Result`` and how one is filled in (``record``), the server's RSS
over a run, the /metrics samples the hostile scenarios report, and one line per attacker group.
bench/run.py and bench/defences.py share them."""

from __future__ import annotations

import threading
from array import array
from dataclasses import dataclass, field

from harness import RunningServer

__all__ = ["SOCKET_METRICS", "Result", "RssWatch", "group_line", "percentile", "record", "socket_metrics"]


@dataclass
class Result:
    scenario: str
    server: str
    transport: str
    subscribers: int
    rate: float
    seconds: float
    published: int = 0
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    behind_schedule_s: float = 0.0
    kept_up: bool = False
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    user_us: float = 0.0
    system_us: float = 0.0
    kb_per_idle_connection: float = 0.0
    connect_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # the hostile scenario: server RSS and metrics, the attacker's report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def record(result: Result, published: int, expected: int, merged: dict, latencies: array,
           before: tuple[float, float], after: tuple[float, float]) -> None:
    """Counts, latency percentiles and CPU per delivery of one run, into ``result``."""
    result.published = published
    result.expected = expected
    result.delivered = merged["received"]
    result.lost = max(0, expected - (merged["received"] - merged["duplicates"]))
    result.duplicates = merged["duplicates"]
    result.out_of_order = merged["out_of_order"]
    ordered = sorted(latencies)
    result.p50_ms = round(percentile(ordered, 50) * 1000, 2)
    result.p99_ms = round(percentile(ordered, 99) * 1000, 2)
    result.max_ms = round((ordered[-1] if ordered else 0) * 1000, 2)
    delivered = max(1, result.delivered)
    result.user_us = round((after[0] - before[0]) * 1e6 / delivered, 2)
    result.system_us = round((after[1] - before[1]) * 1e6 / delivered, 2)


class RssWatch:
    """The server's RSS now, at its peak (sampled every 0.2 s) and when ``stop()`` is called."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.before = self.peak = server.rss_kb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, self.server.rss_kb())
            except OSError:
                return

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        after = self.server.rss_kb()
        return {"rss_before_kb": self.before, "rss_peak_kb": max(self.peak, after), "rss_after_kb": after}


SOCKET_METRICS = ("python_gc_collections_total", "stream_sockets", "stream_connections", "stream_slow_consumer_disconnects", "stream_ws_ops_refused",
                  "stream_publish_refused", "stream_history_bytes", "stream_retained_bytes", "stream_retained_topics",
                  "stream_history_events", "stream_subscriptions")


def socket_metrics(text: str, prefixes: tuple[str, ...] = SOCKET_METRICS) -> dict[str, float]:
    """The samples of stream's /metrics that tell how it dealt with hostile clients (those it has)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(prefixes) or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            found[name] = float(value)
        except ValueError:
            continue
    return found


def group_line(name: str, group: dict) -> str:
    """What one of bench/attacker.py's groups did, on one line."""
    answers = {**{f"HTTP {k}": v for k, v in group["statuses"].items() if k != "101"}, **{f"close {k}": v for k, v in group["close_codes"].items()}}
    return (f"    {name} ({group['source']}): held {group['held_peak']}/{group['target']} at peak, "
            f"mean {group['held_mean']:g}, min {group['held_min']}; {group['connects']} connects, "
            f"{group['closed_by_server']} closed by the server" + (f" (answers {answers})" if answers else "")
            + (f", {group['connect_failed']} connects failed" if group["connect_failed"] else ""))
