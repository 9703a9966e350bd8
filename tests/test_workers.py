"""`stream serve --workers N` is one service to an operator (SPEC §10): /metrics on any worker
answers for the host, per-address limits hold for the host, and the parent supervises its
workers the way docs/operations.md says."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from .hostile_attacks import ATTACKERS, AttackWebSocket, allow_open_files
from .support import KEYS, RUNNING, Server, publish, wait_until
from .test_resume import recv
from .test_scaleout import cluster_config, ws_ids

pytestmark = pytest.mark.slow


class Workers(Server):
    """`stream serve --workers 2` on one port."""

    def start(self, timeout: float = 30.0) -> Server:
        self._log_file = open(self.log, "wb")
        assert self.config is not None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream", "serve", "--config", str(self.config), "--port", str(self.port), "--workers", "2"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=self.child_setup,
        )
        RUNNING.add(self)
        self._wait_ready(timeout)
        wait_until(lambda: self.output().count("serving on") >= 2, timeout)  # both workers listen
        return self

    def pids(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def owner(client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of the loopback connection from ``client_port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == client_port:  # the remote end is the client
            inodes.add(fields[9])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return pid
            except OSError:
                continue
    return None


def samples(text: str, name: str, **labels: str) -> dict[str, float]:
    """The value of ``name`` (with these other labels) per worker label in a Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match:
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if "worker" in pairs and all(pairs.get(key) == value for key, value in labels.items()):
                found[pairs["worker"]] = float(match.group(2))
    return found


async def test_metrics_on_any_worker_answer_for_the_whole_host_with_a_worker_label(redis_server):
    """Twenty scrapes, each on a new connection (the kernel picks the worker): every answer has
    both workers' series with a worker label, and the host's counters never go back."""
    with Workers(cluster_config(redis_server.url)) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            await publish(client, server, [{"topic": "m.x", "data": {"n": n}} for n in range(10)])
        totals = []
        for _ in range(20):
            async with httpx.AsyncClient(timeout=10) as fresh:  # a new connection per scrape
                text = (await fresh.get(f"{server.url}/metrics")).text
            memory = samples(text, "process_resident_memory_bytes")
            assert set(memory) == {"0", "1"}, f"one scrape showed workers {sorted(memory)}"
            totals.append(sum(samples(text, "stream_events_published_total", prefix="m").values()))
    assert totals == sorted(totals) and totals[-1] == 20, totals  # each worker accepted the 10 events


async def test_per_address_socket_caps_hold_for_the_host_not_per_worker(redis_server):
    """max_connections_per_client = 10 with two workers: 20 WebSockets from one address get 10
    welcomes in all, wherever the kernel put them."""
    allow_open_files(1000)
    sockets: list[AttackWebSocket] = []
    with Workers(cluster_config(redis_server.url, "max_connections_per_client = 10")) as server:
        try:
            firsts = []
            for _ in range(20):
                ws = AttackWebSocket(server.port, source=ATTACKERS[3])
                sockets.append(ws)
                message = ws.messages_until(lambda m: True, 10)
                firsts.append(message[0].get("code") or message[0]["type"] if message else "nothing")
        finally:
            for ws in sockets:
                ws.close()
    assert firsts.count("welcome") == 10, firsts


def test_sigterm_drains_the_workers_then_the_parent_dies_of_the_signal(redis_server):
    """SIGTERM to the parent: each worker drains (its own graceful shutdown), and the parent then
    re-raises the signal, so a supervisor sees "terminated by SIGTERM" (docs/operations.md)."""
    with Workers(cluster_config(redis_server.url)) as server:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(20)
        output = server.output()
    assert code == -signal.SIGTERM, f"exit status {code}"
    assert output.count("shutting down: closing") == 2, output[-2000:]


def test_a_restarted_worker_that_dies_again_at_once_is_restarted_again_and_the_others_keep_serving(redis_server):
    """A worker killed is restarted; the new one killed within seconds is restarted again (with a
    delay) instead of stopping the healthy worker, which answers all along."""
    with Workers(cluster_config(redis_server.url)) as server:
        first, healthy = server.pids()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(server.pids()) == 2 and first not in server.pids(), 15)
        again = next(pid for pid in server.pids() if pid != healthy)
        os.kill(again, signal.SIGKILL)
        wait_until(lambda: len(server.pids()) == 2 and again not in server.pids(), 15)
        assert healthy in server.pids()
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert server.proc is not None and server.proc.poll() is None


class FakeWorker:
    """A worker process for the supervisor's own logic: it runs until signalled or killed."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.signals: list[int] = []
        self.pid = id(self)

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.code = -sig

    def wait(self, timeout: float | None = None) -> int:
        assert self.code is not None
        return self.code

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def test_a_signal_that_arrives_while_workers_start_reaches_every_worker():
    """SIGTERM arrives after the first of three workers started: all three get it (none is left
    to be SIGKILLed by the kernel when the parent exits), and the supervisor stops."""
    from stream.workers import Supervisor

    started: list[FakeWorker] = []
    supervisor: Supervisor

    def spawn(index: int) -> FakeWorker:
        worker = FakeWorker()
        started.append(worker)
        if len(started) == 1:
            supervisor.stop(signal.SIGTERM, None)  # as if the signal came right then
        return worker

    supervisor = Supervisor(3, spawn, lambda index: True, out=open(os.devnull, "w"))
    supervisor.run(shutdown_timeout=1)
    assert len(started) == 3 and all(worker.signals == [signal.SIGTERM] for worker in started)
    assert supervisor.signal == signal.SIGTERM


async def test_workers_share_one_port_and_every_subscriber_gets_every_event(redis_server):
    """--workers 2: subscribers spread over both processes (the kernel balances SO_REUSEPORT), and
    every one receives every event; with the memory broker the flag is one clear error."""
    with Workers(cluster_config(redis_server.url)) as server:
        sockets = [await connect(server.ws_url + "?topics=w.>") for _ in range(16)]
        try:
            welcomes = [await recv(ws) for ws in sockets]
            for ws in sockets:
                await recv(ws)  # subscribed
            assert server.proc is not None
            workers = children(server.proc.pid)
            owners = {owner(ws.transport.get_extra_info("sockname")[1], workers) for ws in sockets}
            async with httpx.AsyncClient(timeout=10) as client:
                ids = await publish(client, server, [{"topic": "w.x", "data": {"n": n}} for n in range(20)])
            for ws in sockets:
                assert await ws_ids(ws, 20) == ids
        finally:
            for ws in sockets:
                await ws.close()
    assert len(workers) == 2 and owners == set(workers), (workers, owners)
    assert len({w["epoch"] for w in welcomes}) == 1


def test_workers_with_the_memory_broker_are_one_clear_error(tmp_path):
    """--workers 2 with memory:// would be two separate hubs: refused with one line, exit 2."""
    config = tmp_path / "stream.toml"
    config.write_text(KEYS)
    done = subprocess.run([sys.executable, "-m", "stream", "serve", "--config", str(config), "--workers", "2"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--workers 2 needs the Redis broker" in done.stderr


def test_under_log_json_every_line_is_json_the_parents_too(redis_server):
    """log_json with --workers 2: every line the parent and the workers write, from the start
    banner to the last shutdown line, is one JSON object."""
    with Workers(cluster_config(redis_server.url, "log_json = true\n")) as server:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(20)
        output = server.output()
    lines = output.splitlines()
    assert len(lines) > 10 and any("2 workers on" in line for line in lines), output[-2000:]
    for line in lines:
        assert isinstance(orjson.loads(line), dict), line
