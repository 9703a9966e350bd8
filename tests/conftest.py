"""Shared fixtures: a real `stream serve` per test module, and an HTTP client."""

from __future__ import annotations

import signal

import httpx
import pytest

from .support import KEYS, RUNNING, Server


@pytest.fixture(scope="session", autouse=True)
def no_server_outlives_the_suite():
    """At the end of the run every `stream serve` a test started has been stopped; any left is
    killed and reported, so a forgotten stop() fails the suite instead of leaking a process."""
    yield
    leftover = [server for server in list(RUNNING) if server.proc is not None and server.proc.poll() is None]
    for server in leftover:
        server.stop(signal.SIGKILL)
    assert not leftover, f"{len(leftover)} stream serve process(es) were still running: ports {[s.port for s in leftover]}"


@pytest.fixture(scope="module")
def server():
    """One real server process for the module, with a publish key configured."""
    with Server(KEYS) as running:
        yield running


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium for browser tests, installed with apt-get when missing (CI runs as root).
    Under CI=true a missing browser fails the run instead of skipping the test."""
    from .redis_server import debian_binary

    return debian_binary("chromium", "chromium")


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Debian's redis-server, installed with apt-get when missing (under CI=true: fail, not skip)."""
    from .redis_server import debian_binary

    return debian_binary("redis-server", "redis-server")


@pytest.fixture
def redis_server(redis_binary):
    """A real redis-server of its own on a free loopback port."""
    from .redis_server import RedisServer

    server = RedisServer(redis_binary).start()
    try:
        yield server
    finally:
        server.close()
