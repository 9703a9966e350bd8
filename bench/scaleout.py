"""The ``redis`` scenario: two stream nodes on one Redis, subscribers split over both, publishing
on one. It compares delivery on the other node (cross-node) with delivery on the publishing node
(same-node) in the same run, reports CPU per delivery on each node, and measures how many
events per second the Redis broker accepts on this machine (XADD/s, publishing in batches
until Redis or the node saturates)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time

import httpx
import redis
from harness import CHILDREN, STREAM, Clients, RunningServer, free_port, proc_cpu, publish

__all__ = ["RedisProcess", "scaleout"]


class RedisProcess:
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="stream-bench-redis-")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        CHILDREN.append(self.proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def flush(self) -> None:
        """Forget every key: the next run starts from an empty broker."""
        redis.Redis(port=self.port).flushall()

    def cpu(self) -> tuple[float, float]:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ready(node: RunningServer) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{node.url}/readyz", timeout=2).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("a stream node did not connect to Redis")
        time.sleep(0.05)


def scaleout(result_type, record, subscribers: int, rate: float, seconds: float) -> tuple[list, dict]:
    """(same-node and cross-node results, broker figures). ``result_type`` / ``record`` are
    run.py's Result and record, so the rows print in the same table as the other scenarios."""
    redis_server = RedisProcess()
    env = {"STREAM_BROKER": redis_server.url}
    nodes: list[RunningServer] = []
    try:
        nodes = [RunningServer(STREAM, env), RunningServer(STREAM, env)]
        for node in nodes:
            _ready(node)
        half = subscribers // 2
        same = Clients(nodes[0], "ws", half, 1)
        cross = Clients(nodes[1], "ws", subscribers - half, 1)
        time.sleep(1.0)
        before = [node.cpu() for node in nodes]
        redis_before = redis_server.cpu()
        published, behind = asyncio.run(publish(nodes[0].url, rate, seconds))
        results = []
        for name, clients, node, start, count in (("same node", same, nodes[0], before[0], half),
                                                   ("other node", cross, nodes[1], before[1], subscribers - half)):
            merged, latencies = clients.finish()
            result = result_type("redis", f"stream, {name}", "ws", count, rate, seconds)
            record(result, published, published * count, merged, latencies, start, node.cpu())
            result.behind_schedule_s = round(behind, 3)
            result.kept_up = result.lost == 0 and behind < 0.05 * seconds + 0.2
            results.append(result)
        redis_after = redis_server.cpu()
        figures = {"redis_cpu_s_fanout_run": round(sum(redis_after) - sum(redis_before), 3)}
        figures.update(_redis_bytes(redis_server))
        figures.update(_xadd_rate(nodes[0]))
        return results, figures
    finally:
        for node in nodes:
            node.stop()
        redis_server.stop()


def _redis_bytes(redis_server: RedisProcess) -> dict:
    """What Redis holds per event (the stream entry) and per topic (the retained value), measured
    with MEMORY USAGE after the fan-out run's ~250-byte events."""
    client = redis.Redis(port=redis_server.port)
    entries = client.xlen("stream:events")
    stream_bytes = client.memory_usage("stream:events", samples=0) or 0
    topics = client.hlen("stream:retained")
    retained_bytes = client.memory_usage("stream:retained", samples=0) or 0
    used = client.info("memory")["used_memory"]
    client.close()
    return {"redis_entries": entries, "redis_bytes_per_event": round(stream_bytes / max(entries, 1)),
            "redis_retained_topics": topics, "redis_retained_bytes": retained_bytes, "redis_used_memory": used}


def _xadd_rate(node: RunningServer, seconds: float = 5.0) -> dict:
    """Events per second one node gets accepted by Redis: batches of 100, asked for far faster
    than they can go; the publisher keeps 8 requests in flight, so the rate is what the node and
    Redis sustain together."""
    asked = 20_000  # events/s asked for: out of reach here (~9,000 measured), so the run measures saturation
    started = time.monotonic()
    published, behind = asyncio.run(publish(node.url, asked, seconds, batch=100))
    elapsed = time.monotonic() - started
    return {"xadd_events_per_s": round(published / elapsed), "xadd_batch": 100, "xadd_seconds": round(elapsed, 2),
            "xadd_behind_s": round(behind, 2)}
