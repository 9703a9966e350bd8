"""Fan-out benchmark: stream against the usual Python patterns (and Node's ws), in one run.

    .venv/bin/python bench/run.py                 # everything, ~3 minutes on 2 cores
    .venv/bin/python bench/run.py --quick         # half a minute: correctness smoke test (no Node)
    .venv/bin/python bench/run.py --only ws,idle  # some scenarios

For each server it starts the server, opens the subscribers in separate client processes
(bench/client.py), publishes at a fixed rate through POST /api/publish with the publish time in
the payload, and reports deliveries, loss, latency (p50/p99/max), the server's user and system
CPU per delivery (from /proc/PID/stat), its RSS per idle connection, and connect time.
Results are printed as tables and written as JSON (bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson
from harness import (  # bench/ is this script's directory, so it is on sys.path
    BENCH,
    CONNECTION_MANAGER,
    FLOOR,
    NODE_WS,
    SSE_QUEUES,
    STREAM,
    Clients,
    RunningServer,
    ServerSpec,
    kill_children,
    publish,
)

# -- one measured run ---------------------------------------------------------------------


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


def fanout(spec: ServerSpec, transport: str, subscribers: int, rate: float, seconds: float, *, scenario: str,
           batch: int = 1, processes: int = 2, stall: int = 0) -> Result:
    result = Result(scenario, spec.name, transport, subscribers, rate, seconds)
    server = RunningServer(spec)
    try:
        time.sleep(0.5)
        rss_before = server.rss_kb()
        clients = Clients(server, transport, subscribers, processes, stall)
        result.connect_s = round(clients.connect_seconds, 2)
        time.sleep(1.0)
        result.kb_per_idle_connection = round((server.rss_kb() - rss_before) / subscribers, 2)
        before = server.cpu()
        published, behind = asyncio.run(publish(server.url, rate, seconds, batch))
        merged, latencies = clients.finish()  # each client first waits until nothing more arrives
        after = server.cpu()  # after the drain: a server that fell behind pays for catching up
        record(result, published, published * (subscribers - stall), merged, latencies, before, after)
        result.behind_schedule_s = round(behind, 3)
        result.kept_up = result.lost == 0 and behind < 0.05 * seconds + 0.2
        if merged["closed"] and not stall:
            result.notes.append(f"{merged['closed']} connections closed")
        if spec is STREAM:
            fan_p99 = fanout_p99_ms(server.url)
            if fan_p99 is not None:
                result.notes.append(f"server-side fan-out (accept -> last socket write) p99 <= {fan_p99:g} ms")
    finally:
        server.stop()
    return result


def fanout_p99_ms(url: str) -> float | None:
    """The 99th percentile bucket of stream's own delivery-latency histogram (from /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    buckets = []
    for line in text.splitlines():
        if line.startswith("stream_delivery_latency_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= 0.99 * total:
            return bound * 1000
    return None


def idle(spec: ServerSpec, subscribers: int, processes: int) -> Result:
    """Hold many idle WebSocket subscribers; RSS per connection; then one message to all of them."""
    result = Result("idle", spec.name, "ws", subscribers, 0, 0)
    server = RunningServer(spec)
    try:
        time.sleep(0.5)
        rss_before = server.rss_kb()
        clients = Clients(server, "ws", subscribers, processes)
        result.connect_s = round(clients.connect_seconds, 2)
        time.sleep(2.0)
        result.kb_per_idle_connection = round((server.rss_kb() - rss_before) / subscribers, 2)
        before = server.cpu()
        published, _ = asyncio.run(publish(server.url, 1, 1))
        time.sleep(2.0)
        after = server.cpu()
        merged, latencies = clients.finish()
        record(result, published, published * subscribers, merged, latencies, before, after)
        result.kept_up = result.lost == 0
    finally:
        server.stop()
    return result


# -- reporting ----------------------------------------------------------------------------


COLUMNS = [
    ("server", "server", "{}"),
    ("subs", "subscribers", "{}"),
    ("rate", "rate", "{:g}"),
    ("delivered", "delivered", "{}"),
    ("lost", "lost", "{}"),
    ("dup", "duplicates", "{}"),
    ("kept up", "kept_up", "{}"),
    ("user µs", "user_us", "{:.2f}"),
    ("sys µs", "system_us", "{:.2f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("max ms", "max_ms", "{:.1f}"),
    ("KB/idle", "kb_per_idle_connection", "{:.1f}"),
    ("connect s", "connect_s", "{:.2f}"),
]


def table(title: str, results: list[Result]) -> str:
    rows = [[fmt.format(getattr(r, key)) for _, key, fmt in COLUMNS] for r in results]
    heads = [head for head, _, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for r in results:
        for note in r.notes:
            lines.append(f"  note ({r.server}): {note}")
    return "\n".join(lines)


def ratios(stream: Result, others: list[Result]) -> list[str]:
    lines = []
    for other in others:
        if not other.user_us or not stream.delivered:
            continue
        total_stream = stream.user_us + stream.system_us
        total_other = other.user_us + other.system_us
        lines.append(
            f"  stream / {other.server}: user CPU {stream.user_us / other.user_us:.2f}x, "
            f"total CPU {total_stream / total_other:.2f}x, p99 {stream.p99_ms / max(other.p99_ms, 0.01):.2f}x, "
            f"memory per idle connection {stream.kb_per_idle_connection / max(other.kb_per_idle_connection, 0.01):.2f}x"
        )
    return lines


def ensure_node_ws() -> bool:
    """Node's ws baseline runs when node is installed; ws is fetched into bench/ once."""
    if shutil.which("node") is None:
        return False
    folder = BENCH / "baselines" / "node_ws"
    if not (folder / "node_modules" / "ws").is_dir():
        print("installing the ws package for the Node baseline (npm install, once)…", flush=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  npm install failed, skipping node-ws: {done.stderr.strip()[:200]}", flush=True)
            return False
    return True


def main() -> int:
    # An interrupted run (Ctrl-C, or a timeout's SIGTERM) must not leave servers polling away.
    atexit.register(kill_children)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short: a correctness smoke test")
    parser.add_argument("--only", default="ws,sse,burst,idle,slow", help="scenarios: ws,sse,burst,idle,slow")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--idle", type=int, default=10_000, help="connections in the idle scenario")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per server in the WS/SSE scenarios (median reported)")
    parser.add_argument("--json", default=str(BENCH / "results" / "latest.json"))
    args = parser.parse_args()
    if args.quick:
        args.subscribers, args.seconds, args.idle = 200, 2, 500  # the Python baselines run too, not Node
        if args.only == parser.get_default("only"):
            args.only = "ws,sse"
    only = set(args.only.split(","))
    results: list[Result] = []
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    say(f"stream fan-out benchmark — {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    say(f"{args.subscribers} subscribers, {args.rate:g} msg/s for {args.seconds:g} s, ~250-byte messages")

    def repeated(servers: list[ServerSpec], transport: str) -> list[Result]:
        """Each server ``--repeat`` times, interleaved so drift hits all alike; the median run each."""
        runs: dict[str, list[Result]] = {spec.name: [] for spec in servers}
        for round_ in range(args.repeat):
            for spec in servers:
                print(f"… {transport} fan-out: {spec.name} (run {round_ + 1}/{args.repeat})", flush=True)
                runs[spec.name].append(fanout(spec, transport, args.subscribers, args.rate, args.seconds, scenario=transport))
        chosen = []
        for rounds in runs.values():
            rounds.sort(key=lambda r: r.user_us)
            median = rounds[len(rounds) // 2]
            if len(rounds) > 1:
                median.notes.append(
                    f"median of {len(rounds)} runs; user µs {rounds[0].user_us}-{rounds[-1].user_us}, "
                    f"p99 ms {min(r.p99_ms for r in rounds)}-{max(r.p99_ms for r in rounds)}"
                )
            chosen.append(median)
        return chosen

    if "ws" in only:
        servers = [STREAM] if args.no_baselines else [STREAM, CONNECTION_MANAGER] + ([NODE_WS] if not args.quick and ensure_node_ws() else []) + [FLOOR]
        runs = repeated(servers, "ws")
        results += runs
        say(table("WebSocket fan-out", runs))
        for line in ratios(runs[0], runs[1:]):
            say(line)

    if "sse" in only:
        servers = [STREAM] if args.no_baselines else [STREAM, SSE_QUEUES]
        runs = repeated(servers, "sse")
        results += runs
        say(table("Server-Sent Events fan-out", runs))
        for line in ratios(runs[0], runs[1:]):
            say(line)

    if "burst" in only:
        subscribers = max(10, args.subscribers // 10)
        print("… bursts: one event per write vs batches", flush=True)
        steady = fanout(STREAM, "ws", subscribers, 200, args.seconds / 2, scenario="burst-steady")
        burst = fanout(STREAM, "ws", subscribers, 2000, args.seconds / 2, scenario="burst", batch=20)
        results += [steady, burst]
        say(table(f"Bursts: {subscribers} subscribers, 200 msg/s one per request vs 2,000 msg/s in batches of 20", [steady, burst]))
        say(f"  system CPU per delivery in bursts: {burst.system_us:.2f} µs vs {steady.system_us:.2f} µs one write per event "
            f"({burst.system_us / max(steady.system_us, 0.01):.2f}x)")

    if "idle" in only:
        processes = max(1, (args.idle + 4999) // 5000)
        print(f"… {args.idle} idle WebSocket subscribers", flush=True)
        run = idle(STREAM, args.idle, processes)
        results.append(run)
        say(table(f"{args.idle} idle WebSocket subscribers, then one message to all", [run]))

    if "slow" in only:
        # A stalled subscriber costs less than identical runs vary by here, so each round runs
        # clean / stalled / clean again: the two clean runs show how far p99 moves with no change.
        cleans, stalls, drifts = [], [], []
        for round_ in range(args.repeat):
            print(f"… one stalled subscriber among the others (round {round_ + 1}/{args.repeat}: clean, stalled, clean)", flush=True)
            first = fanout(STREAM, "ws", args.subscribers, args.rate, args.seconds, scenario="slow-baseline")
            stalls.append(fanout(STREAM, "ws", args.subscribers, args.rate, args.seconds, scenario="slow", stall=1))
            second = fanout(STREAM, "ws", args.subscribers, args.rate, args.seconds, scenario="slow-baseline")
            cleans += [first, second]
            drifts.append(abs(second.p99_ms - first.p99_ms) / max(min(first.p99_ms, second.p99_ms), 0.01) * 100)
        cleans.sort(key=lambda r: r.p99_ms)
        stalls.sort(key=lambda r: r.p99_ms)
        clean, stalled = cleans[len(cleans) // 2], stalls[len(stalls) // 2]
        clean.notes.append(f"median p99 of {len(cleans)} runs: {[r.p99_ms for r in cleans]}")
        stalled.notes.append(f"median p99 of {len(stalls)} runs: {[r.p99_ms for r in stalls]}")
        results += [clean, stalled]
        say(table("One subscriber stops reading", [clean, stalled]))
        change = (stalled.p99_ms - clean.p99_ms) / max(clean.p99_ms, 0.01) * 100
        p50_change = (stalled.p50_ms - clean.p50_ms) / max(clean.p50_ms, 0.01) * 100
        say(f"  p99 of the others with one stalled subscriber: {stalled.p99_ms:.1f} ms vs {clean.p99_ms:.1f} ms ({change:+.1f} %); "
            f"p50 {p50_change:+.1f} %")
        say(f"  noise: the two clean runs of a round differed in p99 by {sorted(drifts)[len(drifts) // 2]:.0f} % (median of {len(drifts)} rounds)")

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "results": [asdict(r) for r in results], "report": report}, option=orjson.OPT_INDENT_2))
    print(f"\nJSON: {args.json}")
    bad = [r for r in results if r.scenario not in ("slow",) and (r.lost or r.duplicates or r.out_of_order) and r.server == "stream"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
