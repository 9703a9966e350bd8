"""Hostile clients (SPEC §6) against a real server: every attack is bounded in count and time and
runs beside a canary process (tests/canary.py) whose events, /healthz answers and view of the
server's RSS must not notice it. Attackers connect from 127.0.0.2 and up, the canary from
127.0.0.1, so per-address limits fall on the attacker."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable
from urllib.parse import urljoin

import httpx
import pytest

from .canary import Canary
from .hostile_attacks import (
    ATTACKERS,
    AttackWebSocket,
    allow_open_files,
    answered_then_silent,
    churn,
    closed_by_peer,
    endless_head,
    exchange,
    hold_requests,
    oversized_head,
    silent,
    stalled_body,
    stalled_socket,
    trickle,
)
from .support import AUTH, KEYS, PUBLISH_KEY, Server, publish

pytestmark = pytest.mark.slow

HEAD_TIMEOUT, BODY_TIMEOUT, WRITE_STALL_TIMEOUT = 2, 3, 3
SLACK = 2.5  # a timer may fire a tick late, and two cores are shared by server, canary and attacker
MB = 1 << 20
FLOOD_TOPICS = 20_000


def config(extra: str = "") -> str:
    """Short timers so the suite stays fast; ``[server]`` must come before the ``[[keys]]`` array."""
    return (
        f"[server]\nhead_timeout = {HEAD_TIMEOUT}\nbody_timeout = {BODY_TIMEOUT}\n"
        f"write_stall_timeout = {WRITE_STALL_TIMEOUT}\n{extra}" + KEYS
    )


@pytest.fixture(scope="module")
def server():
    """One server for every attack that needs no special settings."""
    with Server(config()) as running:
        yield running


@pytest.fixture(scope="module")
def flooded(server) -> list[str]:
    """20,000 retained topics of ~1 KB each on the shared server (and a full history)."""
    topics = [f"flood.t{i}" for i in range(FLOOD_TOPICS)]
    pad = "f" * 1000
    with httpx.Client(timeout=30, headers=AUTH) as http:
        for start in range(0, FLOOD_TOPICS, 100):
            batch = [{"topic": topic, "data": {"pad": pad}} for topic in topics[start : start + 100]]
            response = http.post(f"{server.url}/api/publish", json=batch)
            assert response.status_code == 202, response.text
    return topics


async def eventually(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def attacker_client(source: str = ATTACKERS[0], timeout: float = 10) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=source), timeout=timeout)


def metric_total(text: str, name: str) -> float | None:
    """The sum of every sample of ``name`` (all label sets) in Prometheus text; None if it has none."""
    samples = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
    ]
    return sum(samples) if samples else None


# -- request heads and bodies ------------------------------------------------------------


async def test_oversized_and_endless_heads_get_431_and_are_closed(server):
    """An 8 MB head is answered 431 head_too_large and closed, 20 never-ending heads are all closed
    within head_timeout + slack, and RSS stays within 100 MB of the baseline."""
    with Canary(server) as canary:
        answer, closed = await oversized_head(server.port, ATTACKERS[0], 8 * MB, timeout=10)
        endless = await asyncio.gather(
            *(endless_head(server.port, ATTACKERS[i % 4], timeout=HEAD_TIMEOUT + SLACK) for i in range(20))
        )
    assert answer is not None and answer.status == 431, answer
    assert answer.error_code() == "head_too_large", answer
    assert closed
    assert all(seconds is not None for seconds in endless), f"{endless.count(None)} of 20 endless heads left open"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_a_flood_of_pipelined_requests_is_closed(server):
    """50 sockets each pipelining 10,000 tiny requests in one go are closed (uvicorn would queue
    every one of them), and RSS stays within 100 MB of the baseline."""
    burst = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 10_000
    with Canary(server) as canary:
        sockets = [stalled_socket(server.port, ATTACKERS[i % 4], burst, rcvbuf=None) for i in range(50)]
        try:
            closed = await eventually(lambda: all(closed_by_peer(sock) for sock in sockets), 5)
        finally:
            for sock in sockets:
                sock.close()
    assert closed, f"{sum(not closed_by_peer(sock) for sock in sockets)} of 50 pipelining sockets still open"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_slowloris_heads_idle_sockets_and_stalled_bodies_are_closed(server):
    """200 heads trickled a byte every 0.5 s and 200 silent sockets are closed within head_timeout
    + slack of connecting; a publish body that stops after 10 of 1,000 bytes is closed within
    body_timeout + slack; RSS stays within 100 MB of the baseline."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 100
    limit = HEAD_TIMEOUT + SLACK
    with Canary(server) as canary:
        trickled, idle, body = await asyncio.gather(
            asyncio.gather(*(trickle(server.port, ATTACKERS[0], head, 0.5, limit) for _ in range(200))),
            asyncio.gather(*(silent(server.port, ATTACKERS[1], limit) for _ in range(200))),
            stalled_body(server.port, ATTACKERS[2], PUBLISH_KEY, BODY_TIMEOUT + SLACK),
        )
    assert trickled.count(None) == 0, f"{trickled.count(None)} of 200 trickling sockets still open after {limit} s"
    assert idle.count(None) == 0, f"{idle.count(None)} of 200 silent sockets still open after {limit} s"
    assert body is not None, f"a stalled body still open after {BODY_TIMEOUT + SLACK} s"
    # Not before their time either: a slow but honest client gets the whole timeout.
    assert min(trickled + idle) >= HEAD_TIMEOUT - 0.5 and body >= BODY_TIMEOUT - 0.5, (min(trickled + idle), body)
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_idle_keep_alive_sockets_are_counted_then_closed():
    """200 keep-alive sockets from 127.0.0.2 that got one answer and then say nothing count as
    HTTP connections while they stay, and are closed keep_alive_timeout (+ slack) after it."""
    keep_alive = 1
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with Server(config(f"keep_alive_timeout = {keep_alive}\n")) as server:
        with Canary(server) as canary:
            async with httpx.AsyncClient() as http:

                async def http_connections() -> float:
                    return metric_total((await http.get(f"{server.url}/metrics")).text, 'stream_connections{transport="http"}') or 0.0

                before = await http_connections()  # the canary's and this client's
                idle = [asyncio.ensure_future(answered_then_silent(server.port, ATTACKERS[0], request, keep_alive + SLACK)) for _ in range(200)]
                counted = before
                while counted < before + 200 and not all(task.done() for task in idle):
                    counted = max(counted, await http_connections())
                fared = await asyncio.gather(*idle)
    assert counted >= before + 200, f"{counted - before} more HTTP connections counted while 200 idle ones were open"
    assert all(answer is not None and answer.status == 200 for answer, _ in fared), fared[:3]
    closed = [after for _, after in fared]
    assert None not in closed, f"{closed.count(None)} of 200 idle keep-alive sockets still open after {keep_alive + SLACK} s"
    assert min(closed) >= keep_alive - 0.5, min(closed)  # the whole timeout, not less
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- file descriptors ------------------------------------------------------------------------


class LimitedServer(Server):
    """A Server whose process runs under ``ulimit -n 1024`` (or ``nofile``)."""

    nofile = 1024

    def child_setup(self) -> None:
        super().child_setup()
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))


async def test_idle_sockets_past_the_fd_limit_leave_the_server_answering():
    """Under ulimit -n 1024, 1,100 idle sockets from 127.0.0.2-5 are refused past the margin
    (stream_sockets_refused_total), a connection opened before them can still fetch a static file
    (which needs a descriptor of its own), /healthz keeps answering within 1 s, and a fresh
    connection from 127.0.0.1 gets 200 from /healthz within head_timeout + slack; RSS stays within
    100 MB of the baseline."""
    allow_open_files(4096)
    with LimitedServer(config()) as server:
        async with httpx.AsyncClient(timeout=2) as kept:  # one keep-alive connection from before the attack
            assert (await kept.get(f"{server.url}/healthz")).status_code == 200
            with Canary(server) as canary:
                idle = []
                try:
                    for i in range(1100):
                        address = ("127.0.0.1", server.port)
                        idle.append(socket.create_connection(address, timeout=5, source_address=(ATTACKERS[i % 4], 0)))
                    started = time.monotonic()
                    refused = None
                    while not refused and time.monotonic() - started < HEAD_TIMEOUT:
                        refused = metric_total((await kept.get(f"{server.url}/metrics")).text, "stream_sockets_refused_total")
                        await asyncio.sleep(0.05)  # the poll interval
                    static = await kept.get(f"{server.url}/style.css")
                    status = None
                    while status != 200 and time.monotonic() - started < HEAD_TIMEOUT + SLACK:
                        try:
                            async with httpx.AsyncClient(timeout=1) as fresh:
                                status = (await fresh.get(f"{server.url}/healthz")).status_code
                        except httpx.HTTPError:
                            await asyncio.sleep(0.1)  # paces the retries
                    answered_after = time.monotonic() - started
                finally:
                    for sock in idle:
                        sock.close()
    assert refused, f"stream_sockets_refused_total: {refused}"
    assert static.status_code == 200, static.text
    assert status == 200, f"no 200 from a fresh /healthz connection in {answered_after:.1f} s"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- snapshots and stalled readers -------------------------------------------------------


async def test_stalled_snapshot_subscribers_are_closed_and_memory_stays_bounded(server, flooded):
    """21 WebSocket clients that ask for the snapshot of 20,000 retained 1 KB topics and never read
    are closed within write_stall_timeout + slack, and RSS stays within 150 MB of the baseline."""
    limit = WRITE_STALL_TIMEOUT + SLACK + 1  # + 1: the socket buffers fill first
    with Canary(server) as canary:
        stalled = [
            AttackWebSocket(server.port, "/ws?topics=flood.>&snapshot=1", source=ATTACKERS[i % 4], rcvbuf=4096)
            for i in range(21)
        ]
        try:
            assert all(ws.status == 101 for ws in stalled)
            closed = await eventually(lambda: all(closed_by_peer(ws.sock) for ws in stalled), limit)
            still_open = sum(not closed_by_peer(ws.sock) for ws in stalled)
        finally:
            for ws in stalled:
                ws.close()
    assert closed, f"{still_open} of 21 stalled WebSocket clients still open after {limit} s"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 150)


async def test_a_stalled_sse_client_with_a_snapshot_is_closed(server, flooded):
    """An SSE client that asks for the snapshot of 20,000 retained topics and never reads is closed
    within write_stall_timeout + slack; RSS stays within 100 MB of the baseline."""
    limit = WRITE_STALL_TIMEOUT + SLACK + 1
    request = b"GET /sse?topics=flood.>&snapshot=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with Canary(server) as canary:
        sock = stalled_socket(server.port, ATTACKERS[1], request)
        try:
            closed = await eventually(lambda: closed_by_peer(sock), limit)
        finally:
            sock.close()
    assert closed, f"the stalled SSE client is still open after {limit} s"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- work per request ------------------------------------------------------------------------


async def _publish_around(server: Server, seconds: float) -> int:
    """Every 100 ms, one event to each of 100 topics no pattern matches: each must still be
    checked against every pattern the churn leaves, which is cheap unless routes are rebuilt."""
    batch = [{"topic": f"churn.other.t{i}", "data": i} for i in range(100)]
    sent = 0
    async with attacker_client(ATTACKERS[2], timeout=30) as http:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            response = await http.post(f"{server.url}/api/publish", json=batch, headers=AUTH)
            assert response.status_code == 202, response.text
            sent += 1
            await asyncio.sleep(max(0.0, started + sent * 0.1 - time.monotonic()))
    return sent


async def test_subscription_churn_does_not_stall_delivery(server):
    """300 WebSocket clients from 60 addresses (each within its address's share of op work)
    subscribing and unsubscribing groups of unique patterns at 4 ops/s each for 5 s (up to
    24,000 patterns live), while 1,000 events/s go to 100 other topics, get every op answered
    without an error, the publisher keeps its pace and the canary sees no gap over 1 s; RSS
    stays within 100 MB of the baseline. (One address past its share: the next test.)"""
    with Canary(server) as canary:
        *results, batches = await asyncio.gather(
            *(churn(server.ws_url, f"127.0.1.{1 + i % 60}", i, rate=4, seconds=5) for i in range(300)),
            _publish_around(server, 5),
        )
    total = sum(results, Counter())
    print(f"\nchurn: {dict(total)}, {batches} batches of 100 events")
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)
    assert total["sent"] >= 300 * 15, total
    assert total["subscribed"] + total["unsubscribed"] == total["sent"], total
    assert total["error"] == 0, total
    assert batches >= 40, f"only {batches} batches published in 5 s"


_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


async def test_api_topics_answers_pages_of_at_most_1000(server, flooded):
    """With 20,000+ retained topics, 30 concurrent GET /api/topics each answer at most 1,000 items
    and a rel="next" Link with a cursor, and following the links lists every topic exactly once,
    in sorted order; RSS stays within 100 MB of the baseline."""
    async with attacker_client() as http:
        with Canary(server) as canary:
            firsts = await asyncio.gather(*(http.get(f"{server.url}/api/topics") for _ in range(30)))
            seen: list[str] = []
            url: str | None = f"{server.url}/api/topics"
            for _ in range(100):
                if url is None:
                    break
                response = await http.get(url)
                assert response.status_code == 200, response.text
                page = response.json()
                assert len(page) <= 1000
                seen += [item["topic"] for item in page]
                link = _NEXT.search(response.headers.get("link", ""))
                url = urljoin(server.url, link.group(1)) if link else None
    for response in firsts:
        assert response.status_code == 200
        assert len(response.json()) <= 1000
        link = _NEXT.search(response.headers.get("link", ""))
        assert link is not None and "cursor=" in link.group(1), response.headers.get("link")
    assert url is None, "more than 100 pages"
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert set(flooded) <= set(seen), f"{len(set(flooded) - set(seen))} flood topics never listed"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_api_events_with_100_patterns_50_times_at_once(server, flooded):
    """50 concurrent GET /api/events with 100 patterns each over a full history answer 200 while
    the canary sees no gap over 1 s; RSS stays within 100 MB of the baseline."""
    topics = ",".join(f"p{i}.>" for i in range(100))
    # A long client timeout: a request that is still running when the test ends would stall the next one.
    async with attacker_client(timeout=60) as http:
        with Canary(server) as canary:
            responses = await asyncio.gather(
                *(http.get(f"{server.url}/api/events", params={"topics": topics}) for _ in range(50))
            )
    assert [r.status_code for r in responses] == [200] * 50, responses[0].text
    assert all("events" in r.json() for r in responses)
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- memory a publisher can make the server hold ------------------------------------------


async def test_history_bytes_and_max_topics_bound_a_publishers_memory():
    """With history_bytes = 32 MiB and max_topics = 1000, 2,000 events of 60 KB leave RSS within
    150 MB of the baseline and stream_history_bytes at most 32 MiB, and the publish that would
    create the 1,001st retained topic is refused with 507 too_many_topics."""
    with Server(config("history_bytes = 33554432\nmax_topics = 1000\n")) as server:
        async with httpx.AsyncClient(timeout=30) as http:
            with Canary(server) as canary:
                pad = "m" * 60_000
                for start in range(0, 2000, 10):
                    batch = [{"topic": f"mem.t{n % 500}", "data": {"n": n, "pad": pad}} for n in range(start, start + 10)]
                    await publish(http, server, batch)
                history = metric_total((await http.get(f"{server.url}/metrics")).text, "stream_history_bytes")
                # 500 mem.* topics and canary.tick exist: 499 more reach the limit, the next is refused.
                created, refusal = 0, None
                for i in range(600):
                    response = await http.post(
                        f"{server.url}/api/publish", json={"topic": f"fill.t{i}", "data": i}, headers=AUTH
                    )
                    if response.status_code != 202:
                        refusal = response
                        break
                    created += 1
                existing = await http.post(
                    f"{server.url}/api/publish", json={"topic": "mem.t0", "data": "still fine"}, headers=AUTH
                )
    assert history is not None and history <= 32 * MB, f"stream_history_bytes {history}"
    assert refusal is not None and refusal.status_code == 507, refusal and refusal.text
    assert refusal.json()["error"]["code"] == "too_many_topics"
    assert created == 1000 - 501, f"refused after {created} new topics"
    assert existing.status_code == 202  # an existing topic still takes events
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 150)


# -- hostile input -------------------------------------------------------------------------


async def test_huge_numbers_get_a_4xx_and_never_a_traceback(server):
    """Huge since, limit, wait and Content-Length values on /sse, /api/events, /api/news,
    /api/publish and /ws get a 4xx (or a WebSocket error frame), never a 500, and the server logs
    no traceback."""
    huge, enormous = "9" * 29, "9" * 400  # the second overflows a float
    paths = [
        f"/sse?topics=x&since=-{huge}d",
        f"/sse?topics=x&since=-{enormous}d",
        f"/api/events?topics=x&since=-{huge}d",
        f"/api/events?topics=x&since=-{enormous}ms",
        f"/api/events?topics=x&since={huge}",
        f"/api/events?topics=x&limit={huge}",
        f"/api/events?topics=x&wait={huge}",
        f"/api/news?limit={huge}",
    ]
    log_start = len(server.output())
    with Canary(server) as canary:
        async with attacker_client() as http:
            statuses = {}
            for path in paths:
                async with http.stream("GET", f"{server.url}{path}") as response:
                    statuses[path] = response.status_code
            async with http.stream("GET", f"{server.url}/sse?topics=x", headers={"Last-Event-ID": f"-{enormous}d"}) as response:
                statuses["/sse Last-Event-ID"] = response.status_code
        request = (
            f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {'9' * 40}\r\n\r\n{{}}"
        ).encode()
        answer = await exchange(server.port, ATTACKERS[0], request, timeout=5)
        statuses["Content-Length"] = answer.status if answer else None
        replies = {}
        for since in (f"-{huge}d", f"-{enormous}d"):
            ws = AttackWebSocket(server.port, f"/ws?topics=x&since={since}")
            answered = ws.messages_until(lambda m: m.get("type") in ("error", "subscribed"), 5) if ws.status == 101 else []
            replies[since] = (ws.status, answered[-1:])
            ws.close()
    bad = {
        what.replace(enormous, "<400 digits>"): status
        for what, status in statuses.items()
        if status is None or not 400 <= status < 500
    }
    assert not bad, f"not a 4xx: {bad}"
    for since, (status, reply) in replies.items():
        if status == 101:  # the subscription in the query is refused with an error frame
            assert reply and reply[0]["type"] == "error" and reply[0]["code"] == "bad_request", (since[:12], reply)
        else:
            assert 400 <= status < 500, (since[:12], status)
    assert "Traceback" not in server.output()[log_start:]
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_a_token_in_the_query_never_reaches_the_log(server):
    """A token sent as ?%74oken=, ?TOKEN=, ?to%6Ben= or ?token= (HTTP, SSE and WebSocket) never
    appears in the server's log."""
    secret = f"hostile-secret-{uuid.uuid4().hex}"
    paths = [
        f"/api/events?topics=x&%74oken={secret}",
        f"/api/events?topics=x&TOKEN={secret}",
        f"/api/events?topics=x&to%6Ben={secret}",
        f"/api/events?topics=x&token={secret}",
        f"/sse?topics=x&%74oken={secret}",
        f"/api/topics?%54%4F%4B%45%4E={secret}",
    ]
    sentinel = f"/api/topics/redaction.sentinel.{uuid.uuid4().hex}"
    with Canary(server) as canary:
        for path in paths:
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            await exchange(server.port, ATTACKERS[0], request, timeout=5)
        for path in (f"/ws?token={secret}", f"/ws?%74oken={secret}", f"/ws?TOKEN={secret}"):
            AttackWebSocket(server.port, path).close()
        request = f"GET {sentinel} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        await exchange(server.port, ATTACKERS[0], request, timeout=5)
        # The sentinel was requested last, so once its line is in the log every earlier one is.
        logged = await eventually(lambda: sentinel in server.output(), 5)
    assert logged, "the access log shows no request line for the sentinel"
    assert secret not in server.output()
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- connection limits ---------------------------------------------------------------------


def _long_poll(forwarded_for: str | None = None) -> bytes:
    extra = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
    return f"GET /api/events?topics=x&wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def test_long_polls_past_the_per_client_limit_get_503():
    """With max_connections_per_client = 100, 300 concurrent 30 s long-polls from 127.0.0.2 leave
    100 held and answer the other 200 with 503 over_capacity and Retry-After, while the canary on
    127.0.0.1 is unaffected."""
    with Server(config("max_connections_per_client = 100\n")) as server:
        with Canary(server) as canary:
            fared = await hold_requests(server.port, ATTACKERS[0], [_long_poll()] * 300, refusals=200, timeout=10)
    assert fared.held == 100 and len(fared.answers) == 200, fared
    for answer in fared.answers:
        assert answer.status == 503 and answer.error_code() == "over_capacity", answer
        assert "retry-after" in answer.headers, answer
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_x_forwarded_for_does_not_dodge_the_per_client_limit():
    """With forwarded_allow_ips left empty and max_connections_per_client = 50, 80 long-polls from
    127.0.0.1 (where a proxy would sit, and an address once trusted by default) each claiming a
    different X-Forwarded-For all count against 127.0.0.1: together with the canary's own
    connections from there, 50 are held and the rest refused with 503."""
    with Server(config("max_connections_per_client = 50\n")) as server:
        with Canary(server) as canary:
            requests = [_long_poll(f"198.51.100.{i + 1}") for i in range(80)]
            fared = await hold_requests(server.port, "127.0.0.1", requests, refusals=30, timeout=10)
    # The canary holds its WebSocket, its publishing and its /healthz connections from 127.0.0.1.
    assert 40 <= fared.held <= 49 and fared.held + len(fared.answers) == 80, fared
    assert all(answer.status == 503 and answer.error_code() == "over_capacity" for answer in fared.answers), fared.answers
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- WebSocket frames ------------------------------------------------------------------------


async def test_a_ping_flood_is_closed_with_1008(server):
    """A WebSocket client sending PING frames as fast as it can for 3 s (not stopping when told to)
    is closed with 1008, and the canary does not notice."""
    with Canary(server) as canary:
        ws = AttackWebSocket(server.port, source=ATTACKERS[3])
        try:
            code = await asyncio.to_thread(ws.flood_pings, 3.0)
        finally:
            ws.close()
    assert code == 1008
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_a_text_frame_flood_on_the_demo_feed_is_closed_with_1008(server):
    """/demo/ws reads nothing a client sends, but a flood of text frames to it still costs ops:
    closed with 1008 like any WebSocket's, and the canary does not notice."""

    def flood(ws: AttackWebSocket, seconds: float) -> int | None:
        frame = struct.pack("!BB", 0x81, 0x81) + b"\0\0\0\0" + b"x"  # a masked 1-byte text frame
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                ws.sock.sendall(frame * 200)
        except OSError:
            pass
        return ws.close_code(timeout=3)

    with Canary(server) as canary:
        ws = AttackWebSocket(server.port, "/demo/ws", source=ATTACKERS[3])
        try:
            code = await asyncio.to_thread(flood, ws, 3.0)
        finally:
            ws.close()
    assert code == 1008
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(server):
    """A text frame that is not valid UTF-8 closes the WebSocket with 1007."""
    with Canary(server) as canary:
        ws = AttackWebSocket(server.port, source=ATTACKERS[3])
        try:
            ws.send_frame(0x1, b'{"op": "ping", "ref": "\xff\xfe"}')
            code = await asyncio.to_thread(ws.close_code, 5)
        finally:
            ws.close()
    assert code == 1007
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


# -- headers and private endpoints ---------------------------------------------------------


def _csp(value: str) -> dict[str, list[str]]:
    directives = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


async def test_the_dashboard_is_served_with_security_headers(server):
    """GET / and a static file carry a CSP with default-src 'self', connect-src 'self' and
    frame-ancestors 'none', X-Content-Type-Options: nosniff and Referrer-Policy: no-referrer."""
    with Canary(server) as canary:
        async with attacker_client() as http:
            responses = [await http.get(f"{server.url}{path}") for path in ("/", "/style.css")]
    for response in responses:
        assert response.status_code == 200
        csp = _csp(response.headers.get("content-security-policy", ""))
        assert "'self'" in csp.get("default-src", []), csp
        assert "'self'" in csp.get("connect-src", []), csp
        assert csp.get("frame-ancestors") == ["'none'"], csp
        assert response.headers.get("x-content-type-options") == "nosniff"
        assert response.headers.get("referrer-policy") == "no-referrer"
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_private_metrics_and_providers_need_a_key():
    """With metrics_public = false and providers_public = false, /metrics and /api/providers answer
    401 unauthorized without a key or with a wrong one, and 200 with the test key."""
    with Server(config("metrics_public = false\nproviders_public = false\n")) as server:
        with Canary(server) as canary:
            async with attacker_client() as http:
                answers = {}
                for path in ("/metrics", "/api/providers"):
                    answers[path] = (
                        await http.get(f"{server.url}{path}"),
                        await http.get(f"{server.url}{path}", headers={"Authorization": "Bearer not-a-real-key"}),
                        await http.get(f"{server.url}{path}", headers=AUTH),
                    )
    for path, (anonymous, wrong, keyed) in answers.items():
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized", (path, anonymous.text)
        assert wrong.status_code == 401, (path, wrong.text)
        assert keyed.status_code == 200, (path, keyed.text)
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)


async def test_one_address_churning_past_its_share_is_read_slower_not_served_first(server):
    """60 connections from one address churning 10 patterns per op at 40 ops/s (24,000 pattern
    ops/s, past the address's share of 2,000) are throttled — their ops wait, none is refused or
    closed — while the canary sees no gap over 1 s."""
    with Canary(server) as canary:
        results = await asyncio.gather(*(churn(server.ws_url, ATTACKERS[0], 1000 + n, 40, 3) for n in range(60)))
        async with httpx.AsyncClient() as http:
            throttled = metric_total((await http.get(f"{server.url}/metrics")).text, "stream_ws_ops_throttled_total")
    totals = sum(results, Counter())
    assert throttled > 0, "the address's share never throttled it"
    assert totals["error"] == 0 and totals["subscribed"] + totals["unsubscribed"] > 0, totals
    canary.assert_healthy(rss_bound_mb=canary.baseline_rss_mb + 100)
