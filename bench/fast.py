"""Fast-client capacity: stream and Node's ``ws`` at rising rates, with picows subscribers and a
publisher that waits for each answer.

    .venv/bin/python bench/fast.py                    # ~2 minutes: stream and node-ws, 1,000 subscribers
    .venv/bin/python bench/fast.py --repeat 3         # three rounds (~6 minutes), the ratio of each and their median
    .venv/bin/python bench/run.py --only fast         # the same, as a scenario of bench/run.py
    .venv/bin/python bench/fast.py --client python --processes 2 --publisher schedule   # the sweep's clients and publisher

The rule. At each rate, for each server in turn, a fresh server gets ``--subscribers``
WebSocket subscribers, read by picows (bench/fast_client.py: frames parsed in C, one Python call
per frame) in ``--processes`` processes on loopback addresses of their own. A publisher sends
one event per ``POST /api/publish`` for ``--seconds``: each request when it is due or, if the
answer to the one before came later, as soon as it comes. One request is in flight, so no queue
forms in front of the server, and the rate a server answers at is its ceiling. An event carries
its send time; latency is receive time minus that. A point is **sustained** when nothing is lost
and p99 is at most 100 ms (the sweep's bound); it is **on schedule** when the publisher got at
least 95 % of the rate asked. A server's **throughput** is the most deliveries per second at a
sustained point, on schedule or not. A point that is not both runs once more, and a server
stops at its first rate that fails twice.

The sweep (``bench/run.py --only sweep``, bench/capacity.py) differs in its publisher: requests
go out on schedule, pipelined, and latency counts from the scheduled time, so a server that falls
behind for a moment carries the queue in its p99. ``--publisher schedule`` is that publisher
(harness.publish) and ``--client python`` the sweep's subscribers (bench/client.py); with both,
this is the sweep's rule for two servers. docs/performance.md, *Two harnesses*, compares them.

Measured per point: deliveries per second, p50/p99, the server's CPU per delivery (user and
system from /proc/PID/stat, over the publishing and the drain), the clients' CPU per delivery,
the busiest client process's share of a core, the cores busy with anything else (other
processes on the machine), the server's write calls per delivery (/proc/PID/io ``syscw``) and
the clients' socket reads per delivery. Servers alternate at each rate, so what else runs on the
machine hits both alike, and every ratio is from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import uvloop
from capacity import P99_BOUND_MS  # the sweep's bound, so the two harnesses judge latency alike
from harness import (
    BENCH,
    CHILDREN,
    KEY,
    NODE_WS,
    PAD,
    PYTHON,
    STREAM,
    RunningServer,
    ServerSpec,
    kill_children,
    proc_cpu,
    publish,
)
from results import percentile

__all__ = ["RATES", "Point", "Rule", "fast", "fast_lines"]

RATES = [100, 150, 200, 300, 400, 600, 800, 1000, 1200, 1600, 2000]
ON_SCHEDULE = 0.95  # share of the asked rate the publisher must reach
CLIENTS = {"picows": BENCH / "fast_client.py", "python": BENCH / "client.py"}


@dataclass(frozen=True)
class Rule:
    """How a run loads the servers and reads them."""

    client: str = "picows"  # or "python": the sweep's bench/client.py
    publisher: str = "wait"  # or "schedule": the sweep's (harness.publish: pipelined, on schedule)
    subscribers: int = 1000
    processes: int = 4
    seconds: float = 5.0  # publishing per point


@dataclass
class Point:
    server: str
    rate: float  # asked for, msg/s
    round: int = 1
    attempt: int = 1
    seconds: float = 0.0  # publishing, measured
    published: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    closed: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_us: float = 0.0  # server user + system CPU per delivery
    server_user_us: float = 0.0
    client_us: float = 0.0  # every client process's user + system CPU per delivery
    busiest_client_core: float = 0.0  # CPU seconds per second of publishing, of the busiest client process
    others_core: float = 0.0  # cores busy with anything else: other processes, kernel work charged to none
    writes_per_delivery: float = 0.0  # the server's write(2)/writev(2) calls
    reads_per_delivery: float = 0.0  # the clients' socket reads
    notes: list[str] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        return self.published / self.seconds if self.seconds else 0.0

    @property
    def deliveries_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def sustained(self) -> bool:
        return self.published > 0 and self.lost == 0 and self.p99_ms <= P99_BOUND_MS

    @property
    def on_schedule(self) -> bool:
        return self.achieved >= ON_SCHEDULE * self.rate


# -- measuring ------------------------------------------------------------------------------


def machine_busy() -> float:
    """Seconds of CPU every core has spent on anything but idling and waiting for I/O."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process (the publisher) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def io_counter(pid: int, name: str) -> int:
    """A counter of /proc/PID/io (``syscr``, ``syscw``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value)
    raise KeyError(name)


class Subscribers:
    """``total`` WebSocket subscribers of ``server`` in ``processes`` client processes of kind
    ``client`` (picows or bench/client.py), each from its own loopback address."""

    def __init__(self, server: RunningServer, client: str, total: int, processes: int) -> None:
        self.client = client
        self.files: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        for index in range(processes):
            count = total // processes + (1 if index < total % processes else 0)
            latencies = tempfile.mktemp(prefix="stream-fast-", suffix=".f64")
            self.files.append(latencies)
            source = f"127.0.0.{1 + index}"
            if client == "picows":
                command = [PYTHON, str(CLIENTS[client]), "--url", f"ws://127.0.0.1:{server.port}{server.spec.ws_path}"]
            else:
                command = [PYTHON, str(CLIENTS[client]), "--transport", "ws", "--url", server.url, "--path", server.spec.ws_path]
            command += ["--count", str(count), "--source", source, "--latencies", latencies]
            self.procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            CHILDREN.append(self.procs[-1])
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"{client} client failed to connect: {line!r}")

    def cpu(self) -> list[float]:
        """CPU seconds (user + system) of each client process so far."""
        return [sum(proc_cpu(proc.pid)) for proc in self.procs]

    def reads(self) -> int:
        """Socket reads of the client processes so far: bench/client.py's are read(2) calls
        (libuv); picows counts its own from "ready" on."""
        return 0 if self.client == "picows" else sum(io_counter(proc.pid, "syscr") for proc in self.procs)

    def finish(self) -> tuple[dict, array, list[float], int]:
        """Stop the clients once they have drained: their counts, latencies, CPU and reads
        (taken after each has reported, before it is reaped)."""
        for proc in self.procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        found, cpu, reads = [], [], 0
        for proc in self.procs:
            found.append(orjson.loads(proc.stdout.readline()))
            cpu.append(sum(proc_cpu(proc.pid)))
            # picows reads with recv(2), which /proc/PID/io does not count: it counts its reads itself
            reads += found[-1]["reads"] if self.client == "picows" else io_counter(proc.pid, "syscr")
            proc.wait(30)
        latencies = array("d")
        for path in self.files:
            with open(path, "rb") as handle:
                latencies.frombytes(handle.read())
            os.unlink(path)
        merged = {key: sum(f[key] for f in found) for key in ("received", "out_of_order", "duplicates", "closed")}
        return merged, latencies, cpu, reads


async def publish_waiting(url: str, rate: float, seconds: float) -> tuple[int, float]:
    """Publish for ``seconds``, request k due at k / ``rate``, each sent once the answer to the
    one before has come (one keep-alive connection, one request in flight). Each event carries
    the time its request was written. Returns (events published, seconds it took)."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /api/publish HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
    start = time.monotonic()
    end = start + seconds
    sent = 0
    while (due := start + sent / rate) < end:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = orjson.dumps({"topic": "bench.a", "data": {"seq": sent, "t": time.time(), "pad": PAD}})
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_and_headers = await reader.readuntil(b"\r\n\r\n")
        lowered = status_and_headers.lower()
        if b"content-length:" in lowered:
            answer = await reader.readexactly(int(lowered.split(b"content-length:")[1].split(b"\r\n")[0]))
        else:  # chunked (Node)
            answer = await reader.readuntil(b"0\r\n\r\n")
        if b" 202 " not in status_and_headers[:16]:
            raise RuntimeError(f"publish failed: {status_and_headers[:40]!r} {answer[:200]!r}")
        sent += 1
        if time.monotonic() >= end:
            break
    elapsed = time.monotonic() - start
    writer.close()
    return sent, elapsed


def measure(spec: ServerSpec, rule: Rule, rate: float) -> Point:
    """One point: a fresh server, its subscribers, ``rule.seconds`` of publishing at ``rate``."""
    point = Point(spec.name, rate)
    seconds, subscribers = rule.seconds, rule.subscribers
    server = RunningServer(spec)
    try:
        clients = Subscribers(server, rule.client, subscribers, rule.processes)
        time.sleep(0.5)
        started = time.monotonic()
        server_before, machine_before, own_before = server.cpu(), machine_busy(), own_cpu()
        writes_before, reads_before, clients_before = io_counter(server.proc.pid, "syscw"), clients.reads(), clients.cpu()
        if rule.publisher == "wait":
            published, elapsed = uvloop.run(publish_waiting(server.url, rate, seconds))
        else:  # the sweep's: on schedule, pipelined, latency from the scheduled time
            published, behind = uvloop.run(publish(server.url, rate, seconds))
            elapsed = seconds + behind
        busiest = max(a - b for a, b in zip(clients.cpu(), clients_before, strict=True)) / elapsed
        merged, latencies, clients_after, reads_after = clients.finish()  # each first waits until nothing more arrives
        server_after, machine_after, own_after = server.cpu(), machine_busy(), own_cpu()
        writes_after = io_counter(server.proc.pid, "syscw")
        window = time.monotonic() - started
    finally:
        server.stop()
    point.seconds, point.published = round(elapsed, 3), published
    point.delivered = merged["received"] - merged["duplicates"]
    point.lost = max(0, published * subscribers - point.delivered)
    point.out_of_order, point.duplicates, point.closed = merged["out_of_order"], merged["duplicates"], merged["closed"]
    ordered = sorted(latencies)
    point.p50_ms = round(percentile(ordered, 50) * 1000, 2)
    point.p99_ms = round(percentile(ordered, 99) * 1000, 2)
    delivered = max(1, point.delivered)
    server_cpu = sum(server_after) - sum(server_before)
    client_cpu = sum(clients_after) - sum(clients_before)
    point.server_user_us = round((server_after[0] - server_before[0]) * 1e6 / delivered, 2)
    point.server_us = round(server_cpu * 1e6 / delivered, 2)
    point.client_us = round(client_cpu * 1e6 / delivered, 2)
    point.busiest_client_core = round(busiest, 2)
    point.others_core = round(max(0.0, machine_after - machine_before - server_cpu - client_cpu - (own_after - own_before)) / window, 2)
    point.writes_per_delivery = round((writes_after - writes_before) / delivered, 3)
    point.reads_per_delivery = round((reads_after - reads_before) / delivered, 3)
    if point.closed:
        point.notes.append(f"{point.closed} connections closed")
    if point.out_of_order:
        point.notes.append(f"{point.out_of_order} out of order")
    return point


def fast(servers: list[ServerSpec], rates: list[float], rule: Rule, repeat: int = 1) -> list[Point]:
    """``repeat`` rounds of every server at each rate in turn (interleaved, so what else runs on
    the machine hits them alike). A point that is not both sustained and on schedule runs once
    more (p99 moves by tens of per cent between identical runs here, and whether stream's write
    windows open at a rate near its unbatched ceiling varies from run to run); a server stops
    after its first rate that fails twice."""
    points: list[Point] = []
    for round_ in range(1, repeat + 1):
        going = list(servers)
        for rate in rates:
            for spec in list(going):
                for attempt in (1, 2):
                    again = " (once more)" if attempt == 2 else ""
                    print(f"… fast, round {round_}/{repeat}: {spec.name} at {rate:g} msg/s{again}", flush=True)
                    point = measure(spec, rule, rate)
                    point.round, point.attempt = round_, attempt
                    points.append(point)
                    if point.sustained and point.on_schedule:
                        break
                if not (point.sustained and point.on_schedule):
                    going.remove(spec)
            if not going:
                break
    return points


# -- reporting ------------------------------------------------------------------------------


def throughput(points: list[Point], server: str, round_: int) -> Point | None:
    """The sustained point of ``server`` in round ``round_`` that delivered the most per second."""
    held = [p for p in points if p.server == server and p.round == round_ and p.sustained]
    return max(held, key=lambda p: p.deliveries_per_s, default=None)


def fast_lines(points: list[Point], rule: Rule) -> tuple[dict, list[str]]:
    """The table, each server's throughput per round, and stream against Node's ws (throughput,
    and server CPU per delivery at each rate both ran): the summary for the JSON, and the lines."""
    publisher = "a publisher waiting for each answer" if rule.publisher == "wait" else "the sweep's publisher (pipelined, on schedule)"
    lines = [f"\nFast-client capacity: {rule.subscribers} WebSocket subscribers ({rule.client} clients, {rule.processes} processes), "
             f"{publisher}; sustained = nothing lost and p99 <= {P99_BOUND_MS:g} ms, on schedule = >= {ON_SCHEDULE:.0%} of the rate asked",
             "round  server   asked/s  got/s  deliveries/s  sustained  on sched  lost     p50 ms  p99 ms  server µs  user µs  "
             "client µs  busiest client  others  writes/dlv  reads/dlv"]
    for p in points:
        again = "+" if p.attempt == 2 else " "
        lines.append(f"{p.round}{again:<5} {p.server:<8} {p.rate:<8g} {p.achieved:<6.0f} {p.deliveries_per_s:<13,.0f} {p.sustained!s:<10} "
                     f"{p.on_schedule!s:<9} {p.lost:<8} {p.p50_ms:<7.1f} {p.p99_ms:<7.1f} {p.server_us:<10.2f} {p.server_user_us:<8.2f} "
                     f"{p.client_us:<10.2f} {p.busiest_client_core:<15.2f} {p.others_core:<7.2f} {p.writes_per_delivery:<11.3f} "
                     f"{p.reads_per_delivery:.3f}")
        lines += [f"  note ({p.server} at {p.rate:g}): {note}" for note in p.notes]
    lines.append("  +: a point run once more; µs: CPU per delivery (user + system); busiest client, others: cores busy "
                 "(others: other processes and kernel work charged to none); writes/dlv: the server's write calls per "
                 "delivery, reads/dlv: the clients' socket reads")
    servers = list(dict.fromkeys(p.server for p in points))
    rounds = sorted({p.round for p in points})
    summary: dict = {"throughput": {name: [] for name in servers}, "ratio": [], "cpu_ratio": []}
    lines.append("throughput (most deliveries/s at a sustained point):")
    for round_ in rounds:
        best = {name: throughput(points, name, round_) for name in servers}
        for name, point in best.items():
            summary["throughput"][name].append(round(point.deliveries_per_s) if point else 0)
            lines.append(f"  round {round_} {name:<8} " + (
                f"{point.deliveries_per_s:>9,.0f} deliveries/s ({point.achieved:.0f} msg/s, asked {point.rate:g}), "
                f"p99 {point.p99_ms:.1f} ms, {point.server_us:.2f} µs of server CPU per delivery" if point else "none sustained"))
        ours, node = best.get(STREAM.name), best.get(NODE_WS.name)
        if ours and node:
            summary["ratio"].append(round(ours.deliveries_per_s / node.deliveries_per_s, 2))
            lines.append(f"  round {round_} stream / node-ws throughput: {summary['ratio'][-1]:.2f}x")
        for rate in sorted({p.rate for p in points if p.round == round_}):
            last = {p.server: p for p in points if p.round == round_ and p.rate == rate}  # a point run twice: the second
            if STREAM.name in last and NODE_WS.name in last:
                m, t = last[STREAM.name], last[NODE_WS.name]
                summary["cpu_ratio"].append(round(m.server_us / max(t.server_us, 0.01), 2))
                lines.append(f"    at {rate:g} msg/s: server CPU per delivery {m.server_us:.2f} vs {t.server_us:.2f} µs "
                             f"({summary['cpu_ratio'][-1]:.2f}x), p99 {m.p99_ms:.1f} vs {t.p99_ms:.1f} ms")
    if len(rounds) > 1 and summary["ratio"]:
        lines.append(f"  median over {len(rounds)} rounds: stream / node-ws throughput {statistics.median(summary['ratio']):.2f}x "
                     f"(rounds: {', '.join(f'{r:.2f}x' for r in summary['ratio'])})")
    if summary["cpu_ratio"]:
        lines.append(f"  server CPU per delivery, stream / node-ws, at the rates both ran: {min(summary['cpu_ratio']):.2f}-"
                     f"{max(summary['cpu_ratio']):.2f}x (median {statistics.median(summary['cpu_ratio']):.2f}x)")
    return summary, lines


def main() -> int:
    atexit.register(kill_children)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="publish rates to try, msg/s, rising")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the whole ladder (the median ratio is reported)")
    parser.add_argument("--seconds", type=float, default=Rule.seconds, help="publishing per point")
    parser.add_argument("--subscribers", type=int, default=Rule.subscribers)
    parser.add_argument("--processes", type=int, default=Rule.processes, help="client processes, each on its own loopback address")
    parser.add_argument("--client", choices=sorted(CLIENTS), default=Rule.client,
                        help="picows (bench/fast_client.py), or python: the sweep's bench/client.py, for comparison")
    parser.add_argument("--publisher", choices=("wait", "schedule"), default=Rule.publisher,
                        help="wait: for each answer; schedule: the sweep's, pipelined on schedule, for comparison")
    parser.add_argument("--no-baselines", action="store_true", help="stream alone")
    parser.add_argument("--json", default=str(BENCH / "results" / "fast.json"))
    args = parser.parse_args()
    from run import ensure_node_ws  # bench/run.py installs Node's ws once; imported late, as run.py imports this module

    rule = Rule(args.client, args.publisher, args.subscribers, args.processes, args.seconds)
    servers = [STREAM] + ([] if args.no_baselines or not ensure_node_ws() else [NODE_WS])
    print(f"stream fast-client capacity — {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    points = fast(servers, [float(r) for r in args.rates.split(",")], rule, args.repeat)
    summary, lines = fast_lines(points, rule)
    for line in lines:
        print(line, flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_bytes(orjson.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                                              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rule": asdict(rule),
                                              "summary": summary, "points": [asdict(p) for p in points], "report": lines},
                                             option=orjson.OPT_INDENT_2))
    print(f"\nJSON: {args.json}")
    # Order holds at any load; loss past capacity is the overflow policy at work.
    return 1 if any(p.out_of_order or p.duplicates for p in points if p.server == STREAM.name) else 0


if __name__ == "__main__":
    raise SystemExit(main())
