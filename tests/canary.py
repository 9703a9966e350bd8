"""A well-behaved client that runs beside an attack and reports whether it noticed anything.

Run as its own process, so the attack in the test process cannot disturb its timing::

    python -m tests.canary URL PUBLISH_KEY SERVER_PID

It publishes ``{"n": i}`` to ``canary.tick`` every 100 ms, receives those events over a
WebSocket, asks ``/healthz`` every 200 ms (1 s timeout) and samples the server's RSS every
200 ms. It prints ``ready`` once the first event came back, runs until SIGTERM (or until its
stdin closes), stops publishing, waits up to 2 s for the last events, and prints one JSON line.

Tests use the ``Canary`` context manager::

    with Canary(server) as canary:
        ...attack...
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 150)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .support import PUBLISH_KEY, Server, rss_mb

__all__ = ["Canary"]

TOPIC = "canary.tick"
PUBLISH_EVERY = 0.1
HEALTH_EVERY = 0.2
HEALTH_TIMEOUT = 1.0
RSS_EVERY = 0.2
FINAL_WAIT = 2.0
ROOT = Path(__file__).resolve().parent.parent


class _State:
    def __init__(self) -> None:
        self.subscribed = asyncio.Event()
        self.publishing_stopped: float | None = None
        self.published: list[int] = []
        self.sent_at: dict[int, float] = {}  # n -> when its publish was sent (monotonic)
        self.publish_failures = 0
        self.max_loop_lag_s = 0.0
        self.max_publish_s = 0.0
        self.received: list[tuple[int, float]] = []
        self.ws_closed: str | None = None
        self.health_checks = 0
        self.health_failures = 0
        self.max_health_s = 0.0
        self.max_rss_mb = 0.0
        self.rss_error: str | None = None

    def report(self) -> dict[str, Any]:
        numbers = [n for n, _ in self.received]
        times = [t for _, t in self.received]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        if times and self.publishing_stopped is not None and self.publishing_stopped > times[-1]:
            gaps.append(self.publishing_stopped - times[-1])  # a stall at the very end counts too
        missing = sorted(set(self.published) - set(numbers))
        delays = sorted(at - self.sent_at[n] for n, at in self.received if n in self.sent_at)
        return {
            "published": len(self.published),
            "received": len(numbers),
            "missing": missing[:100],
            "missing_count": len(missing),
            "duplicates": len(numbers) - len(set(numbers)),
            "max_gap_s": round(max(gaps, default=0.0), 3),
            # Publish sent -> event received, 90th percentile: what a subscriber waits.
            "p90_delay_s": round(delays[int(len(delays) * 0.9)], 3) if delays else None,
            "max_healthz_s": round(self.max_health_s, 3),
            "healthz_checks": self.health_checks,
            "healthz_failures": self.health_failures,
            "max_rss_mb": round(self.max_rss_mb, 1),
            "publish_failures": self.publish_failures,
            "max_publish_s": round(self.max_publish_s, 3),
            # How late the canary's own timers fired: large means the canary was starved of CPU,
            # and its gaps say less about the server.
            "max_loop_lag_s": round(self.max_loop_lag_s, 3),
            "ws_closed": self.ws_closed,
            "rss_error": self.rss_error,
        }


async def _receive(ws_url: str, state: _State, ready: asyncio.Event) -> None:
    try:
        async with connect(f"{ws_url}?topics={TOPIC}", max_queue=None, open_timeout=5) as ws:
            async for frame in ws:
                now = time.monotonic()
                message = orjson.loads(frame)
                for item in message if isinstance(message, list) else [message]:
                    if item.get("type") == "subscribed":
                        state.subscribed.set()
                    elif item.get("type") == "event" and item.get("topic") == TOPIC:
                        state.received.append((item["data"]["n"], now))
                        ready.set()
    except ConnectionClosed as closed:
        state.ws_closed = f"closed: {closed}"
    except (OSError, TimeoutError) as exc:
        state.ws_closed = f"could not connect: {exc!r}"
    else:
        state.ws_closed = "closed by the server"


async def _publish(url: str, key: str, state: _State, stop: asyncio.Event) -> None:
    await state.subscribed.wait()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=2.0) as http:
        started = time.monotonic()
        n = 0
        while not stop.is_set():
            begin = time.monotonic()
            state.sent_at[n] = begin
            try:
                response = await http.post(f"{url}/api/publish", json={"topic": TOPIC, "data": {"n": n}}, headers=headers)
                if response.status_code == 202:
                    state.published.append(n)
                else:
                    state.publish_failures += 1
            except httpx.HTTPError:
                state.publish_failures += 1
            state.max_publish_s = max(state.max_publish_s, time.monotonic() - begin)
            n += 1
            # A steady schedule: after a slow publish, catch up instead of drifting.
            delay = started + n * PUBLISH_EVERY - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
    state.publishing_stopped = time.monotonic()


async def _health(url: str, state: _State) -> None:
    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as http:
        while True:
            begin = time.monotonic()
            try:
                ok = (await http.get(f"{url}/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed = time.monotonic() - begin
            state.health_checks += 1
            state.max_health_s = max(state.max_health_s, elapsed)
            if not ok:
                state.health_failures += 1
            await asyncio.sleep(max(0.0, HEALTH_EVERY - elapsed))


async def _rss(pid: int, state: _State) -> None:
    while True:
        try:
            state.max_rss_mb = max(state.max_rss_mb, rss_mb(pid))
        except (OSError, RuntimeError) as exc:
            state.rss_error = f"cannot read the server's RSS: {exc!r}"
            return
        asleep = time.monotonic()
        await asyncio.sleep(RSS_EVERY)
        state.max_loop_lag_s = max(state.max_loop_lag_s, time.monotonic() - asleep - RSS_EVERY)


async def run(url: str, key: str, pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    state = _State()
    ready = asyncio.Event()
    ws_url = url.replace("http://", "ws://", 1) + "/ws"
    background = [
        asyncio.create_task(_receive(ws_url, state, ready)),
        asyncio.create_task(_health(url, state)),
        asyncio.create_task(_rss(pid, state)),
    ]
    publisher = asyncio.create_task(_publish(url, key, state, stop))

    async def announce() -> None:
        await ready.wait()
        print("ready", flush=True)

    announcer = asyncio.create_task(announce())
    await stop.wait()
    if state.subscribed.is_set():
        await asyncio.wait_for(publisher, 5)  # the publish in flight finishes (2 s timeout)
    else:
        publisher.cancel()
    deadline = time.monotonic() + FINAL_WAIT
    while time.monotonic() < deadline and state.ws_closed is None:
        if set(state.published) <= {n for n, _ in state.received}:
            break
        await asyncio.sleep(0.02)
    for task in [*background, announcer]:
        task.cancel()
    await asyncio.gather(*background, announcer, return_exceptions=True)
    return state.report()


def main() -> None:
    url, key, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report = asyncio.run(run(url, key, pid))
    print(json.dumps(report), flush=True)


class Canary:
    """The canary process beside a block of test code; ``report`` holds its JSON line afterwards."""

    def __init__(self, server: Server, *, key: str = PUBLISH_KEY, ready_timeout: float = 20.0) -> None:
        assert server.proc is not None
        self.server = server
        self.key = key
        self.ready_timeout = ready_timeout
        self.baseline_rss_mb = 0.0
        self.report: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._rest = b""

    def __enter__(self) -> Canary:
        assert self.server.proc is not None
        self.baseline_rss_mb = rss_mb(self.server.proc.pid)
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.canary", self.server.url, self.key, str(self.server.proc.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            cwd=ROOT,
        )
        line = self._first_line(time.monotonic() + self.ready_timeout)
        if line != b"ready":
            self.proc.kill()
            self.proc.wait()
            errors = self._stderr()
            self.errors.close()
            raise RuntimeError(f"the canary did not get ready (said {line!r}):\n{errors}")
        return self

    def _first_line(self, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return data
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk
        line, _, self._rest = data.partition(b"\n")
        return line.strip()

    def _stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-4000:]

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = (self._rest + out).strip().splitlines()
        try:
            self.report = json.loads(lines[-1])
        except (IndexError, ValueError):
            if exc_type is None:
                raise RuntimeError(f"the canary printed no report:\n{self._stderr()}") from None
        finally:
            self.errors.close()

    def assert_healthy(self, *, rss_bound_mb: float) -> None:
        """Every event arrived once with no gap over 1 s, /healthz answered within 1 s every time,
        and the server's RSS stayed under ``rss_bound_mb``."""
        report = self.report
        shown = f"canary report: {json.dumps(report)}; server RSS before: {self.baseline_rss_mb:.0f} MB"
        assert report["ws_closed"] is None, shown
        assert report["published"] > 0 and report["publish_failures"] == 0, shown
        assert report["missing_count"] == 0 and report["duplicates"] == 0, shown
        assert report["max_gap_s"] < 1.0, shown
        assert report["healthz_failures"] == 0 and report["max_healthz_s"] < HEALTH_TIMEOUT, shown
        assert report["rss_error"] is None, shown
        assert report["max_rss_mb"] < rss_bound_mb, f"RSS bound {rss_bound_mb:.0f} MB; {shown}"


if __name__ == "__main__":
    main()
