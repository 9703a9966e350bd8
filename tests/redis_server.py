"""A real ``redis-server`` for the scale-out tests, on a free loopback port, in a temporary
directory with an append-only file: a stop and start on the same port keeps its data (an outage),
and ``flushall()`` loses it (a new Redis)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from .support import die_with_parent, free_port

_APT_UPDATED: list[bool] = []  # apt-get update ran in this session


def debian_binary(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` with apt-get when missing (CI runs
    as root). Under CI=true a missing binary fails the test instead of skipping it."""
    path = _installed(binary)
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        # One apt-get at a time: the suite runs in several processes (pytest-xdist), and dpkg
        # refuses a second install while one holds its lock.
        with open(os.path.join(tempfile.gettempdir(), "stream-tests-apt.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = _installed(binary)  # another process may have installed it meanwhile
            if path is None:
                # sys.__stderr__: pytest captures sys.stderr, and a minute of apt-get needs saying.
                print(f"\ninstalling {package} with apt-get (once per machine)…", file=sys.__stderr__, flush=True)
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                wait = ["-o", "DPkg::Lock::Timeout=300"]  # and whatever else holds dpkg's lock
                if not _APT_UPDATED:
                    subprocess.run(["apt-get", *wait, "update", "-qq"], env=env, check=False)
                    _APT_UPDATED.append(True)  # once per process, however many packages follow
                subprocess.run(["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", package], env=env, check=False)
                path = _installed(binary)
    if path is None:
        message = f"{binary} is not installed and could not be installed (apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _installed(binary: str) -> str | None:
    return shutil.which(binary) or next((f"{d}/{binary}" for d in ("/usr/sbin", "/usr/bin") if os.path.exists(f"{d}/{binary}")), None)


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="stream-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no",
            ],
            stdout=open(self.dir / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
