"""Deployed for real (docs/deploy.md): nginx, Caddy and HAProxy run from their recipes in deploy/
in front of a real `stream serve`, TLS ending at the proxy, with real WebSocket and SSE clients;
and the systemd unit deploy/stream.service."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import math
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from stream.settings import ServerSettings

from .proxies import DEPLOY, KINDS, SERVER_NAME, EventStream, Proxy, Through, make_certificate, proxy_binary, running, subscribed
from .support import KEYS, Server, publish, wait_for

# What the recipes tell an operator to set: the proxy, on the same host, is believed.
BEHIND_A_PROXY = '[server]\nforwarded_allow_ips = ["127.0.0.1"]\n'
EVENTS, SPACING, P90_MS = 20, 0.2, 100
HOLD = 75.0  # past the recipes' 60 s read timeouts


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def binaries() -> dict[str, str]:
    """Each proxy's executable, installed with apt-get when missing (under CI=true: never skipped)."""
    return {kind: proxy_binary(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def upstream():
    """The stream the module's proxies front, with stream's default heartbeats."""
    with Server(BEHIND_A_PROXY + KEYS) as server:
        yield server


@pytest.fixture(scope="module")
def proxies(upstream, certificate, binaries):
    with running([Proxy(kind, upstream.port, certificate, binaries[kind]) for kind in KINDS]) as started:
        yield started


def p90(values: list[float]) -> float:
    return sorted(values)[math.ceil(0.9 * len(values)) - 1]


async def paced_events(proxy: Proxy, server: Server, client: httpx.AsyncClient) -> tuple[dict[str, list[float]], int]:
    """Publish EVENTS events SPACING s apart to one WebSocket and one SSE subscriber behind
    ``proxy``: the latency of each event (ms) by transport, and how many WebSocket frames were
    batches of events."""
    topic = f"deploy.paced.{proxy.kind}"
    through = Through(proxy)
    arrived: dict[str, dict[int, float]] = {"ws": {}, "sse": {}}
    batches = 0

    async with through.websocket() as ws, through.http(timeout=None) as http, through.sse(http, f"/sse?topics={topic}") as response:
        await subscribed(ws, [topic])
        events = EventStream(response)
        await events.positioned()

        async def read_ws() -> None:
            nonlocal batches
            async for frame in ws:
                now, message = time.monotonic(), orjson.loads(frame)
                if isinstance(message, list):
                    batches += 1
                for event in message if isinstance(message, list) else [message]:
                    arrived["ws"][event["data"]] = now

        async def read_sse() -> None:
            while True:
                event = await events.next()
                arrived["sse"][event["data"]] = time.monotonic()

        readers = [asyncio.ensure_future(read_ws()), asyncio.ensure_future(read_sse())]
        sent = {}
        start = time.monotonic()
        for n in range(EVENTS):
            await asyncio.sleep(max(0.0, start + n * SPACING - time.monotonic()))
            sent[n] = time.monotonic()
            await publish(client, server, {"topic": topic, "data": n})
        await wait_for(lambda: all(len(times) == EVENTS for times in arrived.values()) or any(r.done() for r in readers), timeout=5)
        for reader in readers:
            reader.cancel()
    assert all(len(times) == EVENTS for times in arrived.values()), (proxy.kind, arrived)
    return {transport: [(times[n] - sent[n]) * 1000 for n in range(EVENTS)] for transport, times in arrived.items()}, batches


async def test_each_event_crosses_each_proxy_at_once(upstream, proxies, client):
    """Through nginx, Caddy and HAProxy at once, a WebSocket and an SSE subscriber each get 20
    events published 200 ms apart, each WebSocket event a frame of its own, with p90 publish →
    receive ≤ 100 ms: no proxy buffers or batches them."""
    results = await asyncio.gather(*(paced_events(proxy, upstream, client) for proxy in proxies.values()))
    for kind, (latencies_by_transport, batches) in zip(proxies, results, strict=True):
        assert batches == 0, kind
        for transport, latencies in latencies_by_transport.items():
            assert p90(latencies) <= P90_MS, f"{kind} {transport}: p90 {p90(latencies):.1f} ms: {[round(ms, 1) for ms in latencies]}"


class Held:
    """A WebSocket and an event stream held open through one proxy: when each ended, if it did,
    and the events each received."""

    def __init__(self, proxy: Proxy, topic: str) -> None:
        self.proxy, self.topic = proxy, topic
        self.through = Through(proxy)
        self.events: dict[str, list[object]] = {"ws": [], "sse": []}
        self.ended: dict[str, float] = {}  # seconds after both were open
        self.pings = 0
        self.opened = 0.0
        self.ready = asyncio.Event()

    async def hold(self, until: asyncio.Event) -> None:
        through = self.through
        async with through.websocket() as ws, through.http(timeout=None) as http, through.sse(http, f"/sse?topics={self.topic}") as response:
            await subscribed(ws, [self.topic])
            stream = EventStream(response)
            await stream.positioned()
            self.opened = time.monotonic()
            self.ready.set()

            async def read_ws() -> None:
                try:
                    async for frame in ws:
                        self.events["ws"].append(orjson.loads(frame)["data"])
                except websockets.ConnectionClosed:
                    pass
                self.ended["ws"] = time.monotonic() - self.opened

            async def read_sse() -> None:
                try:
                    while True:
                        self.events["sse"].append((await stream.next())["data"])
                except (EOFError, httpx.HTTPError):
                    self.ended["sse"] = time.monotonic() - self.opened
                finally:
                    self.pings = stream.pings

            readers = [asyncio.ensure_future(read_ws()), asyncio.ensure_future(read_sse())]
            await until.wait()
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


@pytest.mark.slow
@pytest.mark.timeout(HOLD + 60)
async def test_idle_streams_outlive_the_proxies_read_timeouts(upstream, proxies, certificate, binaries, client):
    """Through each proxy at once, an idle WebSocket and an idle event stream stay open for 75 s,
    past the recipes' 60 s read timeouts, held by stream's own heartbeats (SSE `: ping` every
    15 s, WebSocket ping every 20 s; the client sends none), and then get an event published at
    the end. The same streams through the same recipes to a stream with its heartbeats off are
    cut at the proxies' 60 s: the timeouts are there, and the heartbeats are what passes them."""
    silent = Server('[server]\nsse_heartbeat = "off"\nws_ping_interval = "off"\n' + KEYS)
    with silent, running([Proxy(kind, silent.port, certificate, binaries[kind]) for kind in KINDS]) as unheard:
        done = asyncio.Event()
        held = [Held(proxy, f"deploy.idle.{kind}") for kind, proxy in proxies.items()]
        cut = [Held(proxy, f"deploy.silent.{kind}") for kind, proxy in unheard.items()]
        holding = [asyncio.ensure_future(streams.hold(done)) for streams in held + cut]
        await wait_for(lambda: all(streams.ready.is_set() or task.done() for streams, task in zip(held + cut, holding, strict=True)))
        for task in holding:
            if task.done():
                task.result()  # one could not open: say why now, not after the hold
        await asyncio.sleep(HOLD)  # the point of the test: this long without a byte from the client
        for streams in held:
            await publish(client, upstream, {"topic": streams.topic, "data": "after 75 s"})
        await wait_for(lambda: all(len(events) == 1 for streams in held for events in streams.events.values()), timeout=5)
        done.set()
        await asyncio.gather(*holding)
    for streams in held:
        assert streams.ended == {}, (streams.proxy.kind, streams.ended)
        assert streams.events == {"ws": ["after 75 s"], "sse": ["after 75 s"]}, streams.proxy.kind
        assert streams.pings >= 4, (streams.proxy.kind, streams.pings)
    for streams in cut:
        assert set(streams.ended) == {"ws", "sse"}, (streams.proxy.kind, streams.ended)
        assert all(55 <= seconds <= HOLD for seconds in streams.ended.values()), (streams.proxy.kind, streams.ended)


async def first_answer(ws) -> str:
    """What a new WebSocket is told first: "welcome", or the code it is refused with."""
    message = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    return message["type"] if message["type"] == "welcome" else message["code"]


async def answers(through: Through, forged: list[str]) -> list[str]:
    """Open one WebSocket per forged X-Forwarded-For value, keeping each open: what each is told."""
    told = []
    async with contextlib.AsyncExitStack() as stack:
        for address in forged:
            ws = await stack.enter_async_context(through.websocket(headers={"X-Forwarded-For": address}))
            told.append(await first_answer(ws))
    return told


class DirectThrough:
    """A client of ``server`` itself (no proxy, no TLS) from the loopback address ``source``."""

    def __init__(self, server: Server, source: str) -> None:
        self.server, self.source = server, source

    def websocket(self, *, headers: dict[str, str]):
        return websockets.connect(self.server.ws_url, local_addr=(self.source, 0), additional_headers=headers, proxy=None,
                                  compression=None, ping_interval=None, close_timeout=2)


async def test_behind_nginx_each_forwarded_client_has_its_own_limit_and_a_forgery_has_none(certificate, binaries):
    """max_connections_per_client = 2. Behind nginx, with forwarded_allow_ips naming it, a client
    at 127.0.0.2 gets two WebSockets and a third is refused, whatever X-Forwarded-For it forges,
    while a client at 127.0.0.3 is welcome. Without forwarded_allow_ips (the default), a direct
    client forging a different X-Forwarded-For on each socket is still counted by its address."""
    limit = "max_connections_per_client = 2\n"
    with Server(BEHIND_A_PROXY + limit + KEYS) as behind, Proxy("nginx", behind.port, certificate, binaries["nginx"]) as nginx:
        first = await answers(Through(nginx, "127.0.0.2"), ["198.51.100.1", "198.51.100.2", "198.51.100.3"])
        second = await answers(Through(nginx, "127.0.0.3"), ["198.51.100.1"])
    with Server("[server]\n" + limit + KEYS) as direct:
        # From 127.0.0.4: the server's readiness checks came from 127.0.0.1, so no other socket counts here.
        forged = await answers(DirectThrough(direct, "127.0.0.4"), ["198.51.100.1", "198.51.100.2", "198.51.100.3"])
    assert first == ["welcome", "welcome", "over_capacity"]
    assert second == ["welcome"]
    assert forged == ["welcome", "welcome", "over_capacity"]


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(DEPLOY / "stream.service")
    return parser


def test_the_unit_runs_stream_serve_with_a_descriptor_for_every_connection():
    """deploy/stream.service: ExecStart runs `stream serve`, as a user of its own; LimitNOFILE is at
    least max_connections + fd_margin from stream's defaults; SIGTERM stops it, with a stop
    timeout above shutdown_timeout; it is restarted on failure."""
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == "stream" and command[1] == "serve", command
    defaults = ServerSettings.model_fields
    assert int(service["LimitNOFILE"]) >= defaults["max_connections"].default + defaults["fd_margin"].default
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > defaults["shutdown_timeout"].default + 1
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` finds nothing to say about the unit (it warns without failing, so
    its output must be empty too). ExecStart must exist for it: it is pointed at this checkout's
    `stream`; the User need not exist (verify does not look it up)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd); test_the_unit_runs_stream_serve… reads the unit instead")
    stream = Path(sys.executable).with_name("stream")
    text = (DEPLOY / "stream.service").read_text()
    assert "/opt/stream/.venv/bin/stream" in text
    (tmp_path / "stream.service").write_text(text.replace("/opt/stream/.venv/bin/stream", str(stream)))
    done = subprocess.run([analyze, "verify", str(tmp_path / "stream.service")], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


async def over_tls(proxy: Proxy, server: Server, client: httpx.AsyncClient) -> dict[str, object]:
    """One event over wss:// and over https://…/sse through ``proxy``; the TLS version each saw;
    what a client trusting only the system's certificate authorities gets; and the answer on the
    plain HTTP port."""
    topic = f"deploy.tls.{proxy.kind}"
    through = Through(proxy)
    found: dict[str, object] = {}
    async with through.websocket() as ws, through.http() as http, through.sse(http, f"/sse?topics={topic}") as response:
        await subscribed(ws, [topic])
        events = EventStream(response)
        await events.positioned()
        await publish(client, server, {"topic": topic, "data": "secret"})
        found["wss"] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"]
        found["sse"] = (await asyncio.wait_for(events.next(), 5))["data"]
        found["versions"] = {ws.transport.get_extra_info("ssl_object").version(), response.extensions["network_stream"].get_extra_info("ssl_object").version()}
    untrusting = httpx.AsyncHTTPTransport(verify=ssl.create_default_context(), trust_env=False)
    async with httpx.AsyncClient(transport=untrusting, trust_env=False) as stranger:
        try:
            await stranger.get(f"{proxy.url}/healthz", headers={"Host": SERVER_NAME}, extensions={"sni_hostname": SERVER_NAME})
            found["untrusted"] = "answered"
        except httpx.ConnectError as exc:
            found["untrusted"] = "refused" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else repr(exc)
    async with httpx.AsyncClient(trust_env=False) as plain:
        redirect = await plain.get(f"http://127.0.0.1:{proxy.http_port}/sse?topics={topic}", headers={"Host": SERVER_NAME})
    found["http"] = (redirect.status_code, redirect.headers.get("location", ""))
    return found


async def test_tls_ends_at_each_proxy(upstream, proxies, client):
    """Through each proxy, with the certificate the test made: an event arrives over wss:// and
    over https://…/sse (TLS 1.2 or 1.3), a client that does not trust the certificate is refused
    in the handshake, and the plain HTTP port redirects to https://stream.example.com."""
    results = await asyncio.gather(*(over_tls(proxy, upstream, client) for proxy in proxies.values()))
    for kind, found in zip(proxies, results, strict=True):
        assert found["wss"] == found["sse"] == "secret", (kind, found)
        assert found["versions"] <= {"TLSv1.2", "TLSv1.3"}, (kind, found)
        assert found["untrusted"] == "refused", (kind, found)
        status, location = found["http"]
        assert status in (301, 308) and location.startswith(f"https://{SERVER_NAME}") and "/sse?topics=" in location, (kind, found)


async def streams_open(client: httpx.AsyncClient, server: Server, expected: float, timeout: float) -> float:
    """The WebSockets and event streams ``server`` has open, once they are ``expected`` (or when
    ``timeout`` runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get(f"{server.url}/metrics")).text
        count = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(("stream_connections{transport=\"ws\"}", "stream_connections{transport=\"sse\"}")))
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def test_a_client_that_leaves_frees_its_stream_at_once(upstream, proxies, client):
    """Through each proxy, an event stream whose client closes it, and a WebSocket whose client
    just drops its TCP connection (no close frame), are gone from stream before a heartbeat
    (15 s, 20 s) could find out: the proxy passes the client's leaving on, so stream
    does not hold a socket, counted against that client's limit, for a dead stream."""
    assert await streams_open(client, upstream, 0, timeout=5) == 0  # what earlier tests opened has closed
    for kind, proxy in proxies.items():
        through = Through(proxy)
        async with through.websocket() as ws, through.http(timeout=None) as http:
            await subscribed(ws, [f"deploy.leave.{kind}"])
            async with through.sse(http, f"/sse?topics=deploy.leave.{kind}") as response:
                await EventStream(response).positioned()
                assert await streams_open(client, upstream, 2, timeout=10) == 2, kind
            ws.transport.abort()
        # 10 s: under the heartbeats (15 s, 20 s), which would find the dead streams anyway.
        assert await streams_open(client, upstream, 0, timeout=10) == 0, f"{kind}: streams still open at stream 10 s after their clients left"


def test_the_docs_quote_each_recipe_as_it_is():
    """docs/deploy.md shows every file of deploy/ whole, as the tests run it."""
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    for name in ("nginx.conf", "Caddyfile", "haproxy.cfg", "stream.service"):
        assert f"\n{(DEPLOY / name).read_text().strip()}\n```" in docs, f"docs/deploy.md does not quote deploy/{name} as it is"
