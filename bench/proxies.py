"""The ``proxies`` scenario: how late an event reaches an SSE subscriber through nginx, Caddy and
HAProxy, next to one connected to stream directly, in one run.

    .venv/bin/python bench/proxies.py [--events N] [--interval S]

One ``stream serve`` (bench/stream.toml) and, in front of it, each proxy run from its recipe in
deploy/ (TLS ending at the proxy, started by tests/proxies.py as the tests start them). One SSE
subscriber per path, all on one topic; ``events`` events published one every ``interval``
seconds; an event's latency is its arrival at a subscriber minus the moment right before its
publish request was sent, one clock for all (everything runs in this process, so the readers
share one event loop: whichever is read last waits a fraction of a millisecond for the others,
any path alike). The direct subscriber speaks plain HTTP to stream, so a proxy's figures include
its TLS.

The proxies are started by tests/proxies.py, imported from here, so that the recipes' ports,
certificate paths and directories are substituted in one place for the tests and this bench
alike; it needs the dev extras (pytest), which README's benchmark command installs.

bench/run.py can call ``run()`` (a dict: per path the median, p90 and p99 in ms, what arrived, and
the ratios against direct) and print ``table()`` of it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from harness import KEY, STREAM, RunningServer  # bench/ is this script's directory: on sys.path
from results import percentile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.proxies import KINDS, EventStream, Proxy, Through, make_certificate, proxy_binary, running

__all__ = ["run", "table"]

TOPIC = "bench.proxies"
PATH = f"/sse?topics={TOPIC}"


def available() -> tuple[list[str], dict[str, str]]:
    """The proxies installed (tests/proxies.py installs a missing one with apt-get when it can),
    and why each other one is left out."""
    kinds, missing = [], {}
    for kind in KINDS:
        try:
            proxy_binary(kind)
            kinds.append(kind)
        except (Exception, pytest.skip.Exception, pytest.fail.Exception) as exc:
            missing[kind] = str(exc)
    return kinds, missing


async def subscribe(name: str, open_stream, arrivals: dict[str, dict[int, float]], ready: asyncio.Event) -> None:
    """One SSE subscriber: the arrival time of each event, by its number."""
    async with open_stream() as response:
        events = EventStream(response)
        await events.positioned()
        ready.set()
        while True:
            event = await events.next()
            arrivals[name][event["data"]] = time.perf_counter()


async def measure(server_url: str, proxies: dict[str, Proxy], events: int, interval: float) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """Publish ``events`` events ``interval`` s apart; when each was sent, and when it arrived by path."""
    arrivals: dict[str, dict[int, float]] = {"direct": {}, **{kind: {} for kind in proxies}}
    clients = {"direct": httpx.AsyncClient(base_url=server_url, timeout=None, trust_env=False)}
    openers = {"direct": lambda: clients["direct"].stream("GET", PATH)}
    for kind, proxy in proxies.items():
        through = Through(proxy)
        clients[kind] = through.http(timeout=None)
        openers[kind] = lambda through=through, http=clients[kind]: through.sse(http, PATH)
    readies = {name: asyncio.Event() for name in openers}
    readers = [asyncio.ensure_future(subscribe(name, opener, arrivals, readies[name])) for name, opener in openers.items()]
    sent: dict[int, float] = {}
    try:
        await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies.values())), 10)
        async with httpx.AsyncClient(base_url=server_url, headers={"Authorization": f"Bearer {KEY}"}, trust_env=False) as publisher:
            await publisher.get("/healthz")  # the connection is open before the first measured publish
            start = time.perf_counter()
            for n in range(events):
                await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
                sent[n] = time.perf_counter()
                answer = await publisher.post("/api/publish", json={"topic": TOPIC, "data": n})
                answer.raise_for_status()
        deadline = time.monotonic() + 5
        while any(len(times) < events for times in arrivals.values()) and time.monotonic() < deadline:
            if any(reader.done() for reader in readers):
                break
            await asyncio.sleep(0.05)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for client in clients.values():
            await client.aclose()
    for reader in readers:
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()
    return sent, arrivals


def run(events: int = 200, interval: float = 0.02) -> dict:
    """The scenario; per path (``direct`` and each proxy installed) the latency median, p90 and p99
    in ms and the events received, and the median and p99 as multiples of direct's."""
    kinds, missing = available()
    server = RunningServer(STREAM)
    try:
        with tempfile.TemporaryDirectory(prefix="stream-bench-tls-") as directory:
            certificate = make_certificate(Path(directory))
            with running([Proxy(kind, server.port, certificate) for kind in kinds]) as proxies:
                sent, arrivals = asyncio.run(measure(server.url, proxies, events, interval))
    finally:
        server.stop()
    paths: dict[str, dict] = {}
    for name, times in arrivals.items():
        latencies = sorted((times[n] - sent[n]) * 1000 for n in times)
        paths[name] = {"received": len(times), "median_ms": round(percentile(latencies, 50), 2),
                       "p90_ms": round(percentile(latencies, 90), 2), "p99_ms": round(percentile(latencies, 99), 2)}
    direct = paths["direct"]
    for figures in paths.values():
        figures["median_x_direct"] = round(figures["median_ms"] / direct["median_ms"], 2) if direct["median_ms"] else None
        figures["p99_x_direct"] = round(figures["p99_ms"] / direct["p99_ms"], 2) if direct["p99_ms"] else None
    return {"events": events, "interval_s": interval, "paths": paths, "missing": missing}


def table(summary: dict) -> list[str]:
    """The summary as the lines bench/run.py prints."""
    lines = [f"\nSSE through a reverse proxy: {summary['events']} events, one every {summary['interval_s'] * 1000:g} ms, "
             f"publish -> SSE receive (ms); proxies run from deploy/ with TLS, direct is plain HTTP",
             f"{'path':<8}  {'median':>7}  {'p90':>7}  {'p99':>7}  {'received':>8}  {'median x direct':>15}  {'p99 x direct':>12}"]
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for name, f in summary["paths"].items():
        lines.append(f"{name:<8}  {f['median_ms']:>7.2f}  {f['p90_ms']:>7.2f}  {f['p99_ms']:>7.2f}  {f['received']:>8}  "
                     f"{ratio(f['median_x_direct']):>15}  {ratio(f['p99_x_direct']):>12}")
    for kind, why in summary["missing"].items():
        lines.append(f"  {kind}: left out ({why})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="events published (default 200)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two publishes (default 0.02)")
    args = parser.parse_args()
    for line in table(run(args.events, args.interval)):
        print(line)


if __name__ == "__main__":
    main()
