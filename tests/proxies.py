"""Real reverse proxies in front of a test's ``stream serve``: nginx, Caddy and HAProxy, each
run from its recipe in deploy/ with nothing changed but what a test must change: listen and
upstream ports, certificate paths, and temporary and state directories. Each runs in the
foreground as a child of the test, in a temporary directory of its own, on free loopback ports
(Caddy binds its two on every interface: its recipe names no address, as a real one would not).

Clients reach a proxy as a browser reaches ``https://stream.example.com``: TLS with that name
(SNI and Host) to 127.0.0.1, trusting a certificate the test made (``make_certificate``).
bench/proxies.py uses the same."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from .redis_server import debian_binary
from .support import Certificate, die_with_parent

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVER_NAME = "stream.example.com"  # the domain the recipes serve; clients name it, it resolves nowhere
UPSTREAM = "127.0.0.1:8000"  # where the recipes expect `stream serve`
KINDS = ("nginx", "caddy", "haproxy")
# How a test ends each at once: nginx and HAProxy stop on SIGTERM; Caddy's SIGTERM is a
# graceful stop that may wait seconds for connections, its SIGQUIT is immediate.
STOP_SIGNALS = {"nginx": signal.SIGTERM, "caddy": signal.SIGQUIT, "haproxy": signal.SIGTERM}


def listen_port() -> int:
    """A port free on every interface, below the kernel's ephemeral range: no outgoing connection
    of this machine takes it between now and the proxy's bind (one from the range can, and a
    proxy binding the wildcard address then fails with "address already in use")."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    while True:
        port = random.randrange(10_000, max(first_ephemeral, 10_001))
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port


def proxy_binary(kind: str) -> str:
    """The proxy's executable (Debian puts nginx and haproxy in /usr/sbin, which a non-root PATH
    may lack), installed with apt-get when missing (each Debian package is named after its
    binary); under CI=true never skipped. The recipes drop root as a deployment does (HAProxy
    chroots), so they run only as root, as CI does."""
    if kind == "haproxy" and os.geteuid() != 0:
        message = "deploy/haproxy.cfg chroots and changes user: it runs as root only (run the tests as root, as CI does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    for directory in ("/usr/sbin", "/usr/bin"):
        if os.access(f"{directory}/{kind}", os.X_OK):
            return f"{directory}/{kind}"
    return debian_binary(kind, kind)


# -- the certificate ------------------------------------------------------------------------


def make_certificate(directory: Path) -> Certificate:
    """The certificate the recipes serve: for SERVER_NAME, which the clients name."""
    return Certificate(directory, (SERVER_NAME, "localhost"))


# -- the proxies ----------------------------------------------------------------------------


def substitute(text: str, changes: dict[str, str], recipe: str) -> str:
    """Each ``old`` replaced by ``new``; an ``old`` the recipe no longer contains is an error, so
    a recipe and its test cannot drift apart unnoticed."""
    for old, new in changes.items():
        if old not in text:
            raise AssertionError(f"deploy/{recipe} no longer contains {old!r}: update tests/proxies.py with it")
        text = text.replace(old, new)
    return text


class Proxy:
    """One of nginx, caddy, haproxy, started from its deploy/ recipe in front of ``upstream_port``."""

    def __init__(self, kind: str, upstream_port: int, certificate: Certificate, binary: str | None = None) -> None:
        self.kind = kind
        self.binary = binary or proxy_binary(kind)
        self.upstream_port = upstream_port
        self.certificate = certificate
        self.http_port, self.https_port, self.admin_port = listen_port(), listen_port(), listen_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"stream-{kind}-"))
        self.dir.chmod(0o755)  # nginx's workers run as www-data when the test runs as root
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "proxy.log"

    @property
    def url(self) -> str:
        """The HTTPS origin, by address (clients send SERVER_NAME as SNI and Host)."""
        return f"https://127.0.0.1:{self.https_port}"

    def plan(self) -> tuple[str, dict[str, str], list[str], dict[str, str]]:
        """(recipe file, its substitutions, the proxy's arguments, its environment)."""
        cert, upstream = self.certificate, f"127.0.0.1:{self.upstream_port}"
        if self.kind == "nginx":
            (self.dir / "log").mkdir(exist_ok=True)
            (self.dir / "lib").mkdir(exist_ok=True)
            changes = {
                "listen 80;": f"listen 127.0.0.1:{self.http_port};",
                "listen 443 ssl http2;": f"listen 127.0.0.1:{self.https_port} ssl http2;",
                UPSTREAM: upstream,
                "/etc/ssl/certs/stream.pem": str(cert.cert),
                "/etc/ssl/private/stream.key": str(cert.key),
                "/run/nginx.pid": str(self.dir / "nginx.pid"),
                "/var/log/nginx": str(self.dir / "log"),
                "/var/lib/nginx": str(self.dir / "lib"),
            }
            # -e: the log nginx writes before it has read the file; -g: in the foreground, a child of the test.
            return "nginx.conf", changes, ["-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", "stderr", "-g", "daemon off;"], {}
        if self.kind == "caddy":
            changes = {
                "admin localhost:2019": f"admin localhost:{self.admin_port}",
                "http_port 80": f"http_port {self.http_port}",
                "https_port 443": f"https_port {self.https_port}",
                UPSTREAM: upstream,
                "/etc/ssl/certs/stream.pem": str(cert.cert),
                "/etc/ssl/private/stream.key": str(cert.key),
            }
            # Caddy keeps its state (locks, autosave.json) under these, never in the user's home.
            state = {"HOME": str(self.dir), "XDG_DATA_HOME": str(self.dir / "data"), "XDG_CONFIG_HOME": str(self.dir / "config")}
            return "Caddyfile", changes, ["run", "--config", str(self.dir / "Caddyfile"), "--adapter", "caddyfile"], state
        if self.kind == "haproxy":
            (self.dir / "chroot").mkdir(exist_ok=True)
            changes = {
                "bind :80 ": f"bind 127.0.0.1:{self.http_port} ",
                "bind :443 ": f"bind 127.0.0.1:{self.https_port} ",
                UPSTREAM: upstream,
                "/etc/haproxy/certs/stream.pem": str(cert.bundle),
                "chroot /var/lib/haproxy": f"chroot {self.dir / 'chroot'}",
            }
            return "haproxy.cfg", changes, ["-db", "-f", str(self.dir / "haproxy.cfg")], {}
        raise ValueError(self.kind)

    def start(self, timeout: float = 20.0) -> Proxy:
        self.launch()
        return self.ready(timeout)

    def launch(self) -> None:
        """Start the process. From the thread that will outlive it: the kernel's parent-death
        signal (die_with_parent) fires when the *thread* that started a child ends."""
        name, changes, arguments, env = self.plan()
        recipe = (DEPLOY / name).read_text()
        (self.dir / name).write_text(substitute(recipe, changes, name))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *arguments],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=self.dir,
                preexec_fn=die_with_parent,
                start_new_session=True,  # nginx's workers are its children: stop() ends the whole group
            )

    def ready(self, timeout: float = 20.0, tries: int = 3) -> Proxy:
        """Wait until both ports listen; when another process took one meanwhile, launch again
        on new ports."""
        for attempt in range(tries):
            try:
                self._wait_listening(timeout)
                return self
            except BaseException as exc:
                self._end()
                if "already in use" not in str(exc) or attempt == tries - 1:
                    raise
            self.http_port, self.https_port, self.admin_port = listen_port(), listen_port(), listen_port()
            self.launch()
        raise AssertionError("unreachable")

    def _wait_listening(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        waiting = [self.http_port, self.https_port]
        while waiting:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start ({self.proc.returncode}):\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
                continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not listen on {waiting} within {timeout:g} s:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """End the proxy and remove its directory."""
        self._end()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end(self) -> None:
        """End the proxy's process group (nginx's workers too)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, STOP_SIGNALS[self.kind])
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            with contextlib.suppress(ProcessLookupError):  # workers that outlived their master
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def running(proxies: list[Proxy]) -> Iterator[dict[str, Proxy]]:
    """``proxies`` started at once, by kind; all stopped after."""
    try:
        for proxy in proxies:
            proxy.launch()
        for proxy in proxies:
            proxy.ready()
        yield {proxy.kind: proxy for proxy in proxies}
    finally:
        for proxy in proxies:
            proxy.stop()


# -- clients through a proxy ----------------------------------------------------------------


class Through:
    """How a client reaches ``proxy``: TLS to 127.0.0.1 naming SERVER_NAME, trusting the test's
    certificate, from the loopback address ``source`` (per-address limits tell clients apart by it)."""

    def __init__(self, proxy: Proxy, source: str = "127.0.0.1") -> None:
        self.proxy = proxy
        self.source = source
        self.context = proxy.certificate.trust()

    def websocket(self, path: str = "/ws", *, headers: dict[str, str] | None = None) -> connect:
        """A WebSocket to ``wss://stream.example.com:PORT/ws``, over TCP to 127.0.0.1. It sends no
        pings of its own (it answers stream's), so only stream's keepalive crosses the proxy."""
        port = self.proxy.https_port
        return connect(
            f"wss://{SERVER_NAME}:{port}{path}", ssl=self.context, host="127.0.0.1", port=port, local_addr=(self.source, 0),
            additional_headers=headers, proxy=None, compression=None, ping_interval=None, open_timeout=10, close_timeout=2,
        )

    def http(self, timeout: float | None = 10.0) -> httpx.AsyncClient:
        """An HTTP client of the proxy's HTTPS origin by address (``sse`` names SERVER_NAME)."""
        transport = httpx.AsyncHTTPTransport(verify=self.context, local_address=self.source, trust_env=False)
        return httpx.AsyncClient(base_url=self.proxy.url, transport=transport, timeout=timeout, trust_env=False)

    def sse(self, http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None) -> contextlib.AbstractAsyncContextManager:
        """``GET path`` on ``http`` as a request for https://stream.example.com would be."""
        return http.stream("GET", path, headers={"Host": SERVER_NAME, **(headers or {})}, extensions={"sni_hostname": SERVER_NAME})


class EventStream:
    """An SSE response read line by line: the events (each ``data:`` line's JSON), the position
    (the last ``id:``) and the heartbeats (``: ping`` comments) seen so far."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.status_code
        self.lines = response.aiter_lines()
        self.position: str | None = None
        self.pings = 0

    async def next(self) -> dict[str, Any]:
        async for line in self.lines:
            if line.startswith("data:"):
                return orjson.loads(line[5:])
            if line.startswith("id:"):
                self.position = line[3:].strip()
            elif line.startswith(": ping"):
                self.pings += 1
        raise EOFError("the event stream ended")

    async def positioned(self) -> None:
        """Until the stream's first position: from then on the subscription is live."""
        async for line in self.lines:
            if line.startswith("id:"):
                self.position = line[3:].strip()
                return
        raise EOFError("the event stream ended before its position")


async def subscribed(ws: ClientConnection, topics: list[str]) -> None:
    """Subscribe ``ws`` (past its welcome) and wait for the answer: from then on it is live."""
    welcome = orjson.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    await ws.send(orjson.dumps({"op": "subscribe", "topics": topics}).decode())
    answer = orjson.loads(await ws.recv())
    assert answer["type"] == "subscribed", answer

