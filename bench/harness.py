"""The benchmark's moving parts: the servers under test, the subscriber processes and the
publisher. bench/run.py composes them into scenarios."""

from __future__ import annotations

import asyncio
import http.server
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

__all__ = [
    "BENCH",
    "CHILDREN",
    "CONNECTION_MANAGER",
    "FLOOR",
    "KEY",
    "NODE_WS",
    "SSE_QUEUES",
    "STREAM",
    "Attacker",
    "Clients",
    "Probe",
    "RunningServer",
    "ServerSpec",
    "Upstream",
    "http_status",
    "kill_children",
    "publish",
    "websocket_greeting",
]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
KEY = "bench-publisher-key"
TICK = os.sysconf("SC_CLK_TCK")
PIPELINE = 8  # publish requests written and not yet answered, at most
PAD = "x" * 150  # makes a published message about 250 bytes on the wire, as in the issue
CLIENT_ADDRESSES = 8  # subscriber processes connect from 127.0.0.1-8, spreading loopback ports


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds process ``pid`` has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


# -- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str
    ws_path: str | None
    sse_path: str | None
    workers: int = 1  # stream only: `stream serve --workers N` (needs STREAM_BROKER=redis://…)
    config: Path = BENCH / "stream.toml"  # stream only

    def command(self, port: int) -> list[str]:
        if self.name.startswith("stream"):
            workers = ["--workers", str(self.workers)] if self.workers > 1 else []
            return [PYTHON, "-m", "stream", "serve", "--config", str(self.config), "--port", str(port), *workers]
        if self.name == "fastapi-connection-manager":
            return [PYTHON, str(BENCH / "baselines" / "connection_manager.py"), "--port", str(port)]
        if self.name == "sse-starlette-queues":
            return [PYTHON, str(BENCH / "baselines" / "sse_queue.py"), "--port", str(port)]
        if self.name == "floor-raw-uvloop":
            return [PYTHON, str(BENCH / "baselines" / "floor.py"), "--port", str(port)]
        if self.name == "node-ws":
            return ["node", str(BENCH / "baselines" / "node_ws" / "server.js"), str(port)]
        raise ValueError(self.name)


STREAM = ServerSpec("stream", "/ws?topics=bench.>", "/sse?topics=bench.>")
CONNECTION_MANAGER = ServerSpec("fastapi-connection-manager", "/ws", None)
SSE_QUEUES = ServerSpec("sse-starlette-queues", None, "/sse")
NODE_WS = ServerSpec("node-ws", "/ws", None)
FLOOR = ServerSpec("floor-raw-uvloop", "/ws", None)  # the yardstick: what machine and harness allow


CHILDREN: list[subprocess.Popen] = []  # every server and client started, killed at exit


def kill_children() -> None:
    for child in CHILDREN:
        if child.poll() is None:
            child.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Linux TCP states (include/net/tcp_states.h), as /proc/net/tcp writes them.
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT",
              "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def _address(hexed: str) -> str:
    """An address of /proc/net/tcp (host-order 32-bit words in hex): IPv4, an IPv4-mapped IPv6
    address as IPv4, or the IPv6 address."""
    raw = b"".join(int(hexed[i : i + 8], 16).to_bytes(4, "little") for i in range(0, len(hexed), 8))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


class RunningServer:
    """``spec`` started on a free port (with ``env`` over the environment, and ``ulimit -n
    nofile`` if given), ready once /healthz answers."""

    def __init__(self, spec: ServerSpec, env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        limit = None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen(spec.command(self.port), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env} if env else None, preexec_fn=limit)
        CHILDREN.append(self.proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{spec.name} did not start:\n{self.log.read().decode(errors='replace')}")
            time.sleep(0.05)
        if spec.workers > 1:
            self._wait_for_workers(deadline)

    def _wait_for_workers(self, deadline: float) -> None:
        """New connections land on any worker: ready once 10 × workers /readyz in a row say 200."""
        streak = 0
        while streak < 10 * self.spec.workers:
            try:
                ok = httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            streak = streak + 1 if ok else 0
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name}: not every worker became ready")
            if not ok:
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The server's process and its children (``--workers``: the workers)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [self.proc.pid, *(int(pid) for pid in children.read_text().split())]

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds used by the server's processes so far (ended workers
        excluded: a run that loses one reports less, and its lost deliveries show it)."""
        user = system = 0.0
        for pid in self.pids():
            try:
                more_user, more_system = proc_cpu(pid)
            except FileNotFoundError:
                continue
            user += more_user
            system += more_system
        return user, system

    def rss_kb(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        return total

    def connections(self) -> dict[str, tuple[str, str]]:
        """(peer address, TCP state) by socket inode, of each connection on the server's port
        that its processes hold a descriptor for: what it has not let go of, whatever its own
        counts say. A TCP socket reset by its peer is in no table of /proc/net any more, its
        addresses forgotten, while its descriptor is still held: ("?", "CLOSE")."""
        inodes = set()
        for pid in self.pids():
            try:
                fds = list(Path(f"/proc/{pid}/fd").iterdir())
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        held: dict[str, tuple[str, str]] = {}
        listed = set()
        for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix", "netlink", "packet"):
            try:
                rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            column = {"unix": 6, "packet": 8}.get(table, 9)
            for line in rows:
                fields = line.split()
                if len(fields) <= column or fields[column] not in inodes:
                    continue
                inode = fields[column]
                listed.add(inode)
                if table in ("tcp", "tcp6") and fields[3] != "0A" and int(fields[1].rsplit(":", 1)[1], 16) == self.port:
                    held[inode] = (_address(fields[2].rsplit(":", 1)[0]), TCP_STATES.get(fields[3], fields[3]))
        for inode in inodes - listed:
            held[inode] = ("?", "CLOSE")
        return held

    def output(self) -> str:
        """What the server has printed so far (stdout and stderr). Read with pread: the file
        offset is shared with the server's own descriptor, and moving it would move its writes."""
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Upstream:
    """An upstream for a provider to poll, on 127.0.0.1 in a thread: ``GET /`` answers
    ``{"value": n}``, n counting the requests, over HTTP/1.0, so every poll needs a socket (a
    descriptor) of its own. ``provider(name)`` is the TOML of a snapshot provider polling it
    every second."""

    def __init__(self) -> None:
        counter = self.requests = Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server calls it by this name
                counter["GET"] += 1
                body = orjson.dumps({"value": counter["GET"]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def provider(self, name: str) -> str:
        return f'\n[[providers]]\nname = "{name}"\nkind = "snapshot"\nurl = "{self.url}"\ninterval = 1\njitter = 0\ntimeout = 2\n'

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- subscribers --------------------------------------------------------------------------


class Clients:
    """Client processes holding ``total`` connections between them."""

    def __init__(self, server: RunningServer, transport: str, total: int, processes: int, stall: int = 0) -> None:
        path = server.spec.ws_path if transport == "ws" else server.spec.sse_path
        self.files: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        started = time.monotonic()
        sizes = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
        for index, count in enumerate(sizes):
            latencies = tempfile.mktemp(prefix="stream-bench-", suffix=".f64")
            self.files.append(latencies)
            command = [PYTHON, str(BENCH / "client.py"), "--transport", transport, "--url", server.url, "--path", path,
                       "--count", str(count), "--latencies", latencies, "--source", f"127.0.0.{1 + index % CLIENT_ADDRESSES}"]
            if stall and index == 0:
                command += ["--stall", str(stall)]
            self.procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            CHILDREN.append(self.procs[-1])
        for proc in self.procs:
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"client failed to connect: {line!r}")
        self.connect_seconds = time.monotonic() - started

    def finish(self) -> tuple[dict, array]:
        results = []
        for proc in self.procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in self.procs:
            results.append(orjson.loads(proc.stdout.readline()))
            proc.wait(30)
        latencies = array("d")
        for path in self.files:
            with open(path, "rb") as handle:
                latencies.frombytes(handle.read())
            os.unlink(path)
        merged = {
            "received": sum(r["received"] for r in results),
            "min_per_connection": min(r["min_per_connection"] for r in results),
            "max_per_connection": max(r["max_per_connection"] for r in results),
            "out_of_order": sum(r["out_of_order"] for r in results),
            "duplicates": sum(r["duplicates"] for r in results),
            "closed": sum(r["closed"] for r in results),
        }
        return merged, latencies


# -- the attacker -------------------------------------------------------------------------


def _lowest_priority() -> None:
    os.nice(19)


class Attacker:
    """bench/attacker.py against ``server``: slowloris, snapshot flood and subscription churn at
    once from 127.0.0.10-13. ``size`` maps its options (``trickle``, ``idle``, ``topics``,
    ``snapshot``, ``churn``, …) to values. It stops by itself ``duration`` seconds after it is
    ready at the latest; ``stop()`` ends it sooner and returns what it did.

    It runs at the lowest CPU priority (nice 19): it stands in for clients on other machines,
    and on this one it took the server's cores. The server, not a sampler thread in it, showed
    that: under attack even generation-0 collections of a few hundred objects "took" 12-18 ms
    of wall time, and the canary's p99 spikes (81-187 ms) went away (19.8 ms) at nice 19."""

    def __init__(self, server: RunningServer, size: dict[str, float], duration: float, setup_timeout: float = 120) -> None:
        command = [PYTHON, str(BENCH / "attacker.py"), "--url", server.url, "--key", KEY,
                   "--duration", str(duration), "--setup-timeout", str(setup_timeout)]
        for name, value in size.items():
            command += [f"--{name.replace('_', '-')}", f"{value:g}"]
        self.bound = setup_timeout + duration + 60  # its own bounds, and a margin
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_lowest_priority)
        CHILDREN.append(self.proc)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def _line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=max(0.1, timeout))
        except queue.Empty:
            return ""

    def wait_ready(self) -> dict:
        """Blocks until the setup is done and the sockets are open; what it holds then."""
        line = self._line(self.bound)
        if not line.startswith("ready "):
            self.proc.kill()
            raise RuntimeError(f"the attacker did not get ready: {line!r}")
        return orjson.loads(line[6:])

    def stop(self) -> dict:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it had stopped by itself
        line = self._line(30)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not line.startswith("{"):
            raise RuntimeError(f"the attacker ended without its report: {line!r}")
        return orjson.loads(line)


# -- probes -------------------------------------------------------------------------------


class Probe:
    """``check()`` every ``every`` seconds in a thread until ``stop()`` (``limit`` seconds at most),
    counting what it returns. No catching up: a slow answer takes the place of the probes it
    overlaps."""

    def __init__(self, check: Callable[[], str], every: float, limit: float) -> None:
        self.check = check
        self.every = every
        self.deadline = time.monotonic() + limit
        self.answers: Counter[str] = Counter()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.done.is_set() and time.monotonic() < self.deadline:
            self.answers[self.check()] += 1
            next_at = max(next_at + self.every, time.monotonic())
            self.done.wait(next_at - time.monotonic())

    def stop(self) -> Counter[str]:
        self.done.set()
        self.thread.join()
        return self.answers


def _exchange(url: str, source: str, request: bytes, timeout: float, enough: Callable[[bytes], str | None]) -> str:
    """Send ``request`` on a fresh connection from ``source`` and read until ``enough`` finds an
    answer in what arrived, within ``timeout`` seconds from the connect; else why not."""
    host, port = url.split("//")[1].split(":")
    deadline = time.monotonic() + timeout
    received = b""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0)) as sock:
            sock.sendall(request)
            while (answer := enough(received)) is None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed"
                received += chunk
            return answer
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__


def http_status(url: str, path: str, source: str, timeout: float) -> str:
    """The status a fresh connection's GET of ``path`` is answered with within ``timeout``."""
    request = f"GET {path} HTTP/1.1\r\nHost: {url.split('//')[1]}\r\nConnection: close\r\n\r\n".encode()
    return _exchange(url, source, request, timeout, lambda data: data.split(b" ", 2)[1].decode() if b"\r\n" in data else None)


def websocket_greeting(url: str, path: str, source: str, timeout: float) -> str:
    """A fresh WebSocket's first message type (``welcome``, or ``error <code>``), the status if
    it was not upgraded, or why nothing came within ``timeout``."""
    host = url.split("//")[1]
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {os.urandom(16).hex()[:22]}==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()

    def greeting(data: bytes) -> str | None:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            return None
        status = head.split(b" ", 2)[1].decode()
        if status != "101":
            return f"HTTP {status}"
        kind = rest.partition(b'"type":"')[2].partition(b'"')
        if not kind[1]:
            return None
        if kind[0] != b"error":
            return kind[0].decode()
        code = rest.partition(b'"code":"')[2].partition(b'"')
        return f"error {code[0].decode()}" if code[1] else None

    return _exchange(url, source, request, timeout, greeting)


# -- publishing ---------------------------------------------------------------------------


async def publish(url: str, rate: float, seconds: float, batch: int = 1) -> tuple[int, float]:
    """Publish ``rate`` messages per second for ``seconds``, ``batch`` per request, each request
    written on schedule over one keep-alive connection (HTTP/1.1 pipelining: the writer does not
    wait for an answer, a reader collects them), with at most ``PIPELINE`` requests unanswered
    (stream closes a socket that pipelines more than 16; a server that falls that far behind
    makes the writer wait). Every message carries its scheduled time, so a server that falls
    behind shows it in the latency. Returns (messages published, seconds the last answer came
    after the end of the schedule)."""
    requests = int(rate * seconds / batch)
    window = asyncio.Semaphore(PIPELINE)
    interval = batch / rate
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /api/publish HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"

    async def answers() -> None:
        for _ in range(requests):
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            lowered = status_and_headers.lower()
            if b"content-length:" in lowered:
                answer = await reader.readexactly(int(lowered.split(b"content-length:")[1].split(b"\r\n")[0]))
            else:  # chunked
                answer = await reader.readuntil(b"0\r\n\r\n")
            if b" 202 " not in status_and_headers[:16]:
                raise RuntimeError(f"publish failed: {status_and_headers[:40]!r} {answer[:200]!r}")
            window.release()

    collecting = asyncio.create_task(answers())
    seq = 0
    start = time.monotonic()
    start_wall = time.time()
    for number in range(requests):
        delay = start + number * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if window.locked():  # PIPELINE requests unanswered: wait for one answer (or the reader's error)
            acquire = asyncio.ensure_future(window.acquire())
            await asyncio.wait({acquire, collecting}, timeout=max(60.0, seconds * 10), return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                acquire.cancel()
                if collecting.done():
                    collecting.result()
                raise RuntimeError(f"publish: no answer for {max(60.0, seconds * 10):g} s")
        else:
            await window.acquire()
        due = start_wall + number * interval
        items = []
        for _ in range(batch):
            items.append({"topic": "bench.a", "data": {"seq": seq, "t": due, "pad": PAD}})
            seq += 1
        body = orjson.dumps(items if batch > 1 else items[0])
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if collecting.done():
            collecting.result()  # a refused publish ends the run with its answer
    await asyncio.wait_for(collecting, max(60.0, seconds * 10))
    behind = time.monotonic() - (start + requests * interval)
    writer.close()
    return seq, max(0.0, behind)


