"""Capacity: the rate sweep (``--only sweep``) and many subscribers at once (``--only many``).

The sweep raises the publish rate step by step, 1,000 WebSocket subscribers each time, for
every server in the same run. A server sustains a rate when nothing is lost, the publisher
stays on schedule and p99 latency is at most ``P99_BOUND_MS``; its **capacity** is the highest
rate it sustains. A rate that fails is run once more (this VM's noise alone moves p99 by ±50 %
from run to run), and the sweep stops at the first rate that fails twice. It prints the table, writes the rows to
the JSON and draws p99 against deliveries per second for every server (``docs/capacity.png``;
matplotlib is the ``bench`` extra: ``pip install -e '.[bench]'``).

``many`` opens ``--many`` WebSocket subscribers on stream with ``--workers`` (each process may
hold 20,000 sockets here), from client processes of 10,000 connections each on their own
loopback source address (one address gives ~28,000 ports), publishes one event and reports who
got it, p50/p99 and RSS per connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from harness import BENCH, CONNECTION_MANAGER, FLOOR, NODE_WS, STREAM, ServerSpec
from scaleout import RedisProcess

__all__ = ["P99_BOUND_MS", "RATES", "Variant", "capacity_table", "many", "plot", "sweep", "variants"]

P99_BOUND_MS = 100.0
RATES = [25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1200]


class Variant:
    """One server as the sweep runs it: a spec, its environment, and whether it needs Redis."""

    def __init__(self, label: str, spec: ServerSpec, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.spec = spec
        self.env = env
        self.redis = spec.workers > 1


def variants(node: bool, write_delay: str | None) -> list[Variant]:
    """stream with coalescing off and on (1 and 2 workers), then the baselines."""
    on = {"STREAM_WRITE_DELAY": write_delay} if write_delay else {}
    found = [
        Variant("stream, write_delay 0 (off)", STREAM, {"STREAM_WRITE_DELAY": "0"}),
        Variant("stream, coalescing", STREAM, on or None),
        Variant("stream, coalescing, 2 workers", replace(STREAM, name="stream-2-workers", workers=2), on or None),
        Variant("fastapi-connection-manager", CONNECTION_MANAGER),
    ]
    if node:
        found.append(Variant("node-ws", NODE_WS))
    found.append(Variant("floor-raw-uvloop", FLOOR))
    return found


def sustained(result) -> bool:
    return result.kept_up and result.p99_ms <= P99_BOUND_MS


def sweep(fanout: Callable, chosen: list[Variant], rates: list[float], subscribers: int, seconds: float) -> tuple[list, dict]:
    """Every variant at rising rates until its first failure: (the runs, capacity per variant)."""
    runs, capacities = [], {}
    for variant in chosen:
        redis_server = RedisProcess() if variant.redis else None
        env = dict(variant.env or {})
        if redis_server is not None:
            env["STREAM_BROKER"] = redis_server.url
        best = 0.0
        try:
            for rate in rates:
                for attempt in (1, 2):
                    print(f"… sweep: {variant.label} at {rate:g} msg/s" + (" (once more)" if attempt == 2 else ""), flush=True)
                    if redis_server is not None:
                        redis_server.flush()
                    result = fanout(variant.spec, "ws", subscribers, rate, seconds, scenario="sweep", env=env or None)
                    result.server = variant.label
                    result.extra.update(sustained=sustained(result), attempt=attempt, deliveries_per_s=round(result.delivered / seconds))
                    runs.append(result)
                    if sustained(result):
                        break
                if not sustained(result):
                    break
                best = rate
        finally:
            if redis_server is not None:
                redis_server.stop()
        capacities[variant.label] = {"rate": best, "deliveries_per_s": best * subscribers}
    return runs, capacities


def capacity_table(runs: list, capacities: dict, subscribers: int) -> list[str]:
    lines = [f"\nRate sweep: {subscribers} WebSocket subscribers; sustained = nothing lost, publishing on schedule, "
             f"p99 <= {P99_BOUND_MS:g} ms (a failed rate runs once more: 'again')",
             "server                            rate  deliveries/s  sustained  lost     behind s  p50 ms   p99 ms   user µs  sys µs"]
    for r in runs:
        again = " again" if r.extra.get("attempt") == 2 else ""
        lines.append(f"{r.server + again:<33} {r.rate:<5g} {r.extra['deliveries_per_s']:<13,} {r.extra['sustained']!s:<10} {r.lost:<8} "
                     f"{r.behind_schedule_s:<9.2f} {r.p50_ms:<8.1f} {r.p99_ms:<8.1f} {r.user_us:<8.2f} {r.system_us:.2f}")
    lines.append("capacity (highest rate sustained):")
    for label, found in capacities.items():
        lines.append(f"  {label:<33} {found['rate']:>6g} msg/s = {found['deliveries_per_s']:>9,g} deliveries/s")
    return lines


def last_try(runs: list, run) -> object:
    """The last run of ``run``'s server at ``run``'s rate (the one that counts)."""
    return [r for r in runs if r.server == run.server and r.rate == run.rate][-1]


def plot(runs: list, capacities: dict, path: Path, title: str) -> str:
    """p99 against deliveries per second, one line per server; the path, or why not."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for label in capacities:
        rows = [r for r in runs if r.server == label and (r.extra["sustained"] or r is last_try(runs, r))]
        xs = [r.rate * r.subscribers for r in rows]
        ys = [max(r.p99_ms, 0.1) for r in rows]
        line = axes.plot(xs, ys, marker="o", label=f"{label} (capacity {capacities[label]['deliveries_per_s']:,.0f}/s)")[0]
        failed = [(x, y) for x, y, r in zip(xs, ys, rows, strict=True) if not r.extra["sustained"]]
        if failed:
            axes.scatter(*zip(*failed, strict=True), marker="x", s=80, color=line.get_color(), zorder=3)
    axes.axhline(P99_BOUND_MS, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("deliveries per second asked for (publish rate × subscribers)")
    axes.set_ylabel("p99 latency, ms (log)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def many(fanout_idle: Callable, count: int, workers: int) -> tuple:
    """``count`` idle WebSocket subscribers on stream with ``workers`` workers, then one event."""
    redis_server = RedisProcess()
    try:
        spec = replace(STREAM, name=f"stream-{workers}-workers", workers=workers)
        return fanout_idle(spec, count, processes=(count + 9_999) // 10_000, env={"STREAM_BROKER": redis_server.url})
    finally:
        redis_server.stop()


PLOT = BENCH.parent / "docs" / "capacity.png"
