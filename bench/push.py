"""The ``push`` scenario: how late a pushed headline reaches WebSocket subscribers, by the path it
takes into stream, against the plain fan-out at the same load (SPEC §7a).

One source (bench/push_upstream.py, a process of its own) makes one headline every 100 ms
(``rate``) for ``seconds``; ``subscribers`` WebSocket subscribers of ``news.wire`` listen, in
client processes of their own (bench/push_client.py). Four paths, each on a fresh ``stream
serve`` (bench/stream.toml plus the provider):

- ``fan-out``: the baseline, no provider: the source POSTs each item to /api/publish;
- ``sse``: an ``sse`` provider holding the source's event stream;
- ``websocket``: a ``websocket`` provider holding the source's WebSocket;
- ``json``: a ``json`` provider polling the source's ``{"items": [last 50]}`` every second
  (``interval = 1``, ``jitter = 0``, ``backfill`` off: the source holds old items when the
  first poll primes).

Latency is the subscriber's receive time minus the item's ``published`` time, which the source
takes right before writing it (``json``: before it joins the list), over every delivery. All
processes share one clock. The target (the issue): the push paths' p99 within 5 ms of the
fan-out's p99 at the same load, where the polled path waits ~500 ms in the median. The server's
``stream_provider_lag_seconds`` (hub accept minus ``published``: the ingestion alone) is
reported beside it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from harness import BENCH, CHILDREN, CLIENT_ADDRESSES, PYTHON, TICK, Clients, RunningServer, ServerSpec, proc_cpu
from results import Result, record

__all__ = ["PATHS", "push", "push_summary"]

PATHS = ("fan-out", "sse", "websocket", "json")
PROVIDER = "wire"  # topic news.wire
TARGET_MS = 5.0  # push p99 within this of the fan-out p99


def provider_block(path: str, url: str) -> str:
    block = f'\n[[providers]]\nname = "{PROVIDER}"\nkind = "{path}"\nurl = "{url}"\n'
    if path == "json":
        block += 'items = "items"\ninterval = 1\njitter = 0\ntimeout = 2\n'
    return block


class Source:
    """bench/push_upstream.py in ``mode`` (``publish`` for the fan-out), ``items`` one every ``interval`` s."""

    def __init__(self, mode: str, items: int, interval: float) -> None:
        command = [PYTHON, str(BENCH / "push_upstream.py"), "--mode", mode, "--items", str(items), "--interval", str(interval),
                   "--provider", PROVIDER]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        CHILDREN.append(self.proc)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the push source did not start: {line!r}")
        self.url = line.split()[1]

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def wait_connected(self, timeout: float) -> None:
        if (answer := self.ask(f"wait {timeout:g}")) != "connected":
            raise RuntimeError(f"the provider did not connect to the push source: {answer!r}")

    def go(self, server_url: str) -> dict:
        report = orjson.loads(self.ask(f"go {server_url}") or b"{}")
        if "error" in report or not report:
            raise RuntimeError(f"the push source failed: {report}")
        return report

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class HeadlineClients(Clients):
    """``Clients`` running bench/push_client.py (headline events, every delivery measured)."""

    def __init__(self, server: RunningServer, total: int, processes: int) -> None:
        self.files: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        started = time.monotonic()
        sizes = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
        for index, count in enumerate(sizes):
            latencies = tempfile.mktemp(prefix="stream-bench-push-", suffix=".f64")
            self.files.append(latencies)
            command = [PYTHON, str(BENCH / "push_client.py"), "--transport", "ws", "--url", server.url,
                       "--path", server.spec.ws_path, "--count", str(count), "--latencies", latencies,
                       "--source", f"127.0.0.{1 + index % CLIENT_ADDRESSES}"]
            self.procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            CHILDREN.append(self.procs[-1])
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"client failed to connect: {line!r}")
        self.connect_seconds = time.monotonic() - started


def machine_busy() -> float:
    """CPU seconds the machine's processes have used (every core: user, nice, system) plus the time
    the hypervisor took (steal), from /proc/stat. Interrupts are left out: loopback traffic is
    mostly handled in softirqs, which are charged to no process, and ours is most of it."""
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + steal) / TICK


def ours(server: RunningServer, pids: list[int]) -> float:
    """CPU seconds used so far by the server, ``pids`` (source and clients) and this process."""
    total = sum(server.cpu())
    for pid in pids:
        try:
            total += sum(proc_cpu(pid))
        except FileNotFoundError:
            pass
    mine = os.times()
    return total + mine.user + mine.system


def provider_status(server: RunningServer) -> dict:
    answer = httpx.get(f"{server.url}/api/providers", timeout=5).json()
    return next((s for s in answer if s["name"] == PROVIDER), {})


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"push: {what} within {timeout:g} s")
        time.sleep(0.05)


def lag_quantiles(metrics: str) -> dict[str, float]:
    """The provider's stream_provider_lag_seconds: its mean and the p50 and p99 upper bucket
    bounds (ms; the finest bucket is 1 ms)."""
    buckets = []
    total = summed = 0.0
    for line in metrics.splitlines():
        if not line.startswith("stream_provider_lag_seconds") or f'provider="{PROVIDER}"' not in line:
            continue
        name, value = line.split("{")[0], float(line.split()[-1])
        if name.endswith("_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), value))
        elif name.endswith("_count"):
            total = value
        elif name.endswith("_sum"):
            summed = value
    if not buckets or not total:
        return {}
    buckets.sort()
    found: dict[str, float] = {"ingest_items": int(total), "ingest_mean_ms": round(summed / total * 1000, 3)}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        found[f"ingest_{name}_le_ms"] = next(bound * 1000 for bound, count in buckets if count >= q * total)
    return found


def one_path(path: str, subscribers: int, rate: float, seconds: float, processes: int) -> Result:
    items = round(rate * seconds)
    result = Result("push", "stream", "ws", subscribers, rate, seconds)
    result.extra["path"] = path
    source = Source("publish" if path == "fan-out" else path, items, 1 / rate)
    config = None
    server = None
    try:
        spec = ServerSpec("stream", f"/ws?topics=news.{PROVIDER}", f"/sse?topics=news.{PROVIDER}")
        if path != "fan-out":
            handle, name = tempfile.mkstemp(prefix="stream-bench-push-", suffix=".toml")
            os.close(handle)
            config = Path(name)
            config.write_text((BENCH / "stream.toml").read_text() + provider_block(path, source.url))
            spec = ServerSpec("stream", spec.ws_path, spec.sse_path, config=config)
        server = RunningServer(spec)
        if path != "fan-out":
            source.wait_connected(15)
        if path == "json":  # primed: the first poll is done (backfill off: it published nothing)
            wait_until(lambda: provider_status(server).get("last_ok") is not None, 10, "the json provider's first poll")
        clients = HeadlineClients(server, subscribers, processes)
        result.connect_s = round(clients.connect_seconds, 2)
        time.sleep(1.0)
        pids = [source.proc.pid, *(proc.pid for proc in clients.procs)]
        before, busy_before, ours_before, started = server.cpu(), machine_busy(), ours(server, pids), time.monotonic()
        report = source.go(server.url)
        # Everyone else's CPU while the items were pushed (cores' worth): this is a shared machine.
        others = (machine_busy() - busy_before) - (ours(server, pids) - ours_before)
        result.extra["other_load"] = round(max(0.0, others) / (time.monotonic() - started), 2)
        if path != "fan-out":  # the last items may still be on their way in (json: up to a poll later)
            try:
                wait_until(lambda: provider_status(server).get("items_published", 0) >= items, 10, f"the {path} provider's items published")
            except RuntimeError as exc:
                result.notes.append(str(exc))
        merged, latencies = clients.finish()
        after = server.cpu()
        record(result, items, items * subscribers, merged, latencies, before, after)
        result.behind_schedule_s = round(report["late_max_ms"] / 1000, 3)
        result.kept_up = result.lost == 0
        result.extra["source"] = report
        if path != "fan-out":
            status = provider_status(server)
            result.extra["provider"] = {k: status.get(k) for k in ("state", "items_published", "items_skipped", "reconnects", "messages", "polls")
                                        if k in status}
            result.extra.update(lag_quantiles(httpx.get(f"{server.url}/metrics", timeout=10).text))
            if status.get("reconnects"):
                result.notes.append(f"the {path} provider reconnected {status['reconnects']} times")
        if merged["closed"]:
            result.notes.append(f"{merged['closed']} subscriber connections closed")
    finally:
        if server is not None:
            server.stop()
        source.stop()
        if config is not None:
            config.unlink(missing_ok=True)
    return result


def push(subscribers: int, seconds: float, rate: float = 10, processes: int = 2, repeat: int = 1) -> list[Result]:
    """One run per path, in PATHS order, each on a fresh server; ``repeat`` rounds of them
    (interleaved, so drift hits every path alike), the run with the median p99 of each path."""
    rounds: dict[str, list[Result]] = {path: [] for path in PATHS}
    for round_ in range(repeat):
        for path in PATHS:
            print(f"… push: {path} ({subscribers} WebSocket subscribers, {rate:g} items/s for {seconds:g} s; "
                  f"run {round_ + 1}/{repeat})", flush=True)
            rounds[path].append(one_path(path, subscribers, rate, seconds, processes))
    chosen = []
    for runs in rounds.values():
        runs.sort(key=lambda r: r.p99_ms)
        median = runs[len(runs) // 2]
        if len(runs) > 1:
            median.notes.append(f"median p99 of {len(runs)} runs: {[r.p99_ms for r in runs]}; lost {[r.lost for r in runs]}")
            median.lost = max(r.lost for r in runs)  # a loss in any round is reported
        chosen.append(median)
    return chosen


def push_summary(runs: list[Result]) -> tuple[dict, list[str]]:
    """The table, the comparison with the fan-out and the verdict; and the same as a dict for the JSON."""
    by_path = {r.extra["path"]: r for r in runs}
    first = runs[0]
    names = {"fan-out": "fan-out (POST /api/publish)", "sse": "sse provider", "websocket": "websocket provider",
             "json": "json provider (polled, 1 s)"}
    lines = [f"\nPush providers: {first.subscribers} WebSocket subscribers of news.{PROVIDER}, one headline every "
             f"{1000 / first.rate:g} ms for {first.seconds:g} s ({first.published} items), each path on a fresh server",
             f"{'path':<28}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'deliveries':>10}  {'lost':>5}  {'dup':>4}  "
             f"{'order':>5}  {'ingest mean / p99 ms':>20}  {'others':>6}"]
    for path in PATHS:
        r = by_path.get(path)
        if r is None:
            continue
        ingest = f"{r.extra['ingest_mean_ms']:.2f} / <={r.extra['ingest_p99_le_ms']:g}" if "ingest_mean_ms" in r.extra else "-"
        lines.append(f"{names[path]:<28}  {r.p50_ms:>7.1f}  {r.p99_ms:>7.1f}  {r.max_ms:>7.1f}  {r.delivered:>10}  {r.lost:>5}  "
                     f"{r.duplicates:>4}  {r.out_of_order:>5}  {ingest:>20}  {r.extra.get('other_load', 0):>6.2f}")
    lines.append(f"  expected {first.expected:,} deliveries per path ({first.published} items x {first.subscribers}); latency: "
                 f"source send -> subscriber receive, every delivery; ingest: the server's stream_provider_lag_seconds "
                 f"(hub accept - send), its mean and the bucket bound of its p99; others: CPU (cores) used by processes outside the "
                 f"scenario while the items were pushed, of {os.cpu_count()}")
    summary: dict = {"paths": {path: {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms, "delivered": r.delivered,
                                      "expected": r.expected, "lost": r.lost, "duplicates": r.duplicates,
                                      "out_of_order": r.out_of_order} | r.extra for path, r in by_path.items()}}
    fan = by_path.get("fan-out")
    passed = fan is not None and fan.lost == 0
    if fan is not None:
        for path in ("sse", "websocket"):
            r = by_path.get(path)
            if r is None:
                continue
            gap = r.p99_ms - fan.p99_ms
            summary["paths"][path]["p99_minus_fanout_ms"] = round(gap, 2)
            ok = gap <= TARGET_MS and r.lost == 0
            passed = passed and ok
            lines.append(f"  {path}: p99 {r.p99_ms:.1f} ms vs fan-out {fan.p99_ms:.1f} ms: {gap:+.1f} ms (target: within "
                         f"{TARGET_MS:g} ms){'' if r.lost == 0 else f'; lost {r.lost}'}; p50 {r.p50_ms - fan.p50_ms:+.1f} ms")
        polled = by_path.get("json")
        if polled is not None:
            lines.append(f"  json (polled every 1 s): p50 {polled.p50_ms:.1f} ms, p99 {polled.p99_ms:.1f} ms")
    for r in runs:
        for note in r.notes:
            lines.append(f"  note ({r.extra['path']}): {note}")
    summary["passed"] = passed
    lines.append(f"  verdict: {'PASS' if passed else 'FAIL'} (needs the sse and websocket p99 within {TARGET_MS:g} ms of "
                 f"the fan-out p99, and nothing lost)")
    return summary, lines
