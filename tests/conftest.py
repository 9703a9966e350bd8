"""Shared fixtures: a real `stream serve` per test module, and an HTTP client."""

from __future__ import annotations

import httpx
import pytest

from .support import KEYS, Server


@pytest.fixture(scope="module")
def server():
    """One real server process for the module, with a publish key configured."""
    with Server(KEYS) as running:
        yield running


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10) as http:
        yield http
