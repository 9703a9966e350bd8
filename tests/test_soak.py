"""The soak: three nodes on a real Redis, 200 subscribers (the shipped client), 100 events a
second, and faults on the way: Redis frozen for 3 s twice, one node SIGKILLed and restarted.
Every subscriber must end with each accepted id (the 202s) exactly once or inside the range of a
gap notice it received; at least 99 % of them with no gap at all; and the nodes' memory and
descriptors back where they were after warm-up.

60 s in the suite. STREAM_SOAK=1 runs it for 10 minutes (not in .ci/run): the faults come at the
same points of the run, scaled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from .faults import open_fds, stopped
from .support import AUTH, Server, die_with_parent, rss_mb
from .test_scaleout import cluster_config

ROOT = Path(__file__).resolve().parent.parent
LONG = os.environ.get("STREAM_SOAK") == "1"
DURATION = 600.0 if LONG else 60.0
RATE = 100  # events a second
SUBSCRIBERS, PROCESSES = 200, 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DURATION + 150)]


class Subscribers:
    """One process of ``tests.soak_subscribers``."""

    def __init__(self, urls: list[str], count: int, first: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.soak_subscribers", ",".join(urls), str(count), str(first)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=die_with_parent,
        )

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", line

    def check(self, accepted_path: Path, wait: float) -> list[dict]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"check {accepted_path} {wait}\n".encode())
        self.proc.stdin.flush()
        verdicts = orjson.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return verdicts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Publisher:
    """RATE events a second, one per request, to the nodes in turn; a node that is down or
    refuses (Redis frozen) is skipped for that event. Keeps the ids it got 202 for."""

    def __init__(self, nodes: list[Server]) -> None:
        self.nodes = nodes
        self.accepted: list[str] = []
        self.refused = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            started, n = time.monotonic(), 0
            while not self.stop.is_set():
                node = self.nodes[n % len(self.nodes)]
                try:
                    answer = await client.post(f"{node.url}/api/publish", json={"topic": f"soak.t{n % 10}", "data": {"n": n}}, headers=AUTH)
                    if answer.status_code == 202:
                        self.accepted += answer.json()["ids"]
                    else:
                        self.refused += 1
                except httpx.HTTPError:
                    self.refused += 1
                n += 1
                await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))


def footprint(node: Server) -> tuple[float, int]:
    assert node.proc is not None
    return rss_mb(node.proc.pid), open_fds(node.proc.pid)


async def test_soak_three_nodes_redis_frozen_twice_a_node_killed_nothing_lost_silently(redis_server, tmp_path):
    """See the module docstring."""
    nodes = [Server(cluster_config(redis_server.url)) for _ in range(3)]
    groups: list[Subscribers] = []
    publisher = Publisher(nodes)
    at = {name: DURATION * share for name, share in
          {"warm": 0.15, "freeze1": 0.25, "kill": 0.4, "restart": 0.45, "freeze2": 0.65, "rewarm": 0.75, "end": 0.85}.items()}
    try:
        for node in nodes:
            node.start()
        urls = [node.url for node in nodes]
        per = SUBSCRIBERS // PROCESSES
        groups = [Subscribers(urls, per, per * index) for index in range(PROCESSES)]
        for group in groups:
            group.wait_ready()
        began = time.monotonic()
        publishing = asyncio.ensure_future(publisher.run())

        async def until(moment: str) -> None:  # the run's schedule: its faults come at set times
            await asyncio.sleep(max(0.0, began + at[moment] - time.monotonic()))

        await until("warm")
        before = {index: footprint(node) for index, node in enumerate(nodes)}
        await until("freeze1")
        with stopped(redis_server.proc):
            await asyncio.sleep(3)
        await until("kill")
        victim = nodes[2]
        victim.stop(signal.SIGKILL)
        await until("restart")
        nodes[2] = Server(cluster_config(redis_server.url), port=victim.port).start()
        publisher.nodes = nodes
        await until("freeze2")
        with stopped(redis_server.proc):
            await asyncio.sleep(3)
        await until("rewarm")
        before[2] = footprint(nodes[2])  # the restarted node's own warm-up
        await until("end")
        publisher.stop.set()
        await publishing
        after = {index: footprint(node) for index, node in enumerate(nodes)}  # every subscriber still connected
        accepted_path = tmp_path / "accepted"
        accepted_path.write_text("\n".join(publisher.accepted))
        verdicts = [verdict for group in groups for verdict in group.check(accepted_path, 30)]
    finally:
        for group in groups:
            group.kill()
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
    report = {
        "accepted": len(publisher.accepted),
        "refused": publisher.refused,
        "footprint": {str(index): (before[index], after[index]) for index in before},
        "gaps": sum(v["gaps"] for v in verdicts),
        "extra": sum(v["extra"] for v in verdicts),
    }
    print(orjson.dumps(report).decode())
    assert len(verdicts) == SUBSCRIBERS
    assert len(publisher.accepted) >= RATE * DURATION * 0.5, report
    broken = [v for v in verdicts if v["duplicates"] or not v["ordered"] or v["missing"]]
    assert not broken, f"{len(broken)} subscribers broke the promise, e.g. {broken[:2]}"
    assert sum(1 for v in verdicts if v["gaps"] == 0) >= 0.99 * SUBSCRIBERS, report
    for index, ((rss_before, fds_before), (rss_after, fds_after)) in report["footprint"].items():
        assert rss_after - rss_before < 50, f"node {index}: RSS {rss_before:.0f} -> {rss_after:.0f} MB"
        assert fds_after <= fds_before + 5, f"node {index}: {fds_before} -> {fds_after} descriptors"
