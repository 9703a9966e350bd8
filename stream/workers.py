"""``stream serve --workers N``: N processes on one port, each a node of the same Redis hub.

Each worker is ``stream serve`` itself, run with ``--reuse-port --worker I/N --worker-dir DIR``:
it binds its own listening socket with SO_REUSEPORT (the kernel spreads new connections over
the workers), and shares with its siblings what ``siblings`` describes (metrics, per-address
counts) through DIR, which this parent makes and removes. The parent only starts the workers,
passes SIGTERM / SIGINT on, and restarts a worker that dies; then it re-raises the signal, so
whoever supervises it sees "terminated by SIGTERM", as with one process.

A worker that dies before it ever served (a busy port, a bad config: it says it serves by
leaving ``ready-<index>`` in DIR once its socket listens) ends the whole group: it would only die
again. One that dies later is restarted, after a delay that doubles while it keeps dying within
EARLY_EXIT of its start, up to RESTART_DELAY_MAX; the healthy ones are never stopped for it.
Workers get SIGKILL from the kernel if this process is killed, so none is left behind.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

from .logs import announce
from .siblings import create_table

__all__ = ["Supervisor", "listening_socket", "run_workers"]

_PR_SET_PDEATHSIG = 1
EARLY_EXIT = 5.0  # seconds: a restarted worker gone sooner than this waits twice as long for its next start
RESTART_DELAY, RESTART_DELAY_MAX = 1.0, 30.0
POLL = 0.2  # seconds between looks at the workers


def listening_socket(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A listening TCP socket; ``shared``: other workers may bind to the same port as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: a killed parent may leave workers, which SIGTERM still ends


class _Slot:
    """One worker's place: its current process, when it started, and its restart delay."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None
        self.started = 0.0
        self.first = True  # until it first serves: dying then means it cannot start at all
        self.delay = RESTART_DELAY
        self.restart_at: float | None = None


class Supervisor:
    """Starts ``count`` workers with ``spawn(index)`` and keeps them running until ``stop``."""

    def __init__(self, count: int, spawn: Callable[[int], Any], serving: Callable[[int], bool], *, out: IO[str] | None = None) -> None:
        self.spawn = spawn
        self.serving = serving  # whether the worker of that index has served (listened) yet
        self.out = out
        self.slots = [_Slot(index) for index in range(count)]
        self.signal: int | None = None  # the signal that stopped the group
        self.status = 0

    def stop(self, sig: int, frame: FrameType | None) -> None:
        """Pass ``sig`` on to every running worker (a signal handler; also called directly)."""
        if self.signal is None:
            self.signal = sig
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig)

    def _start(self, slot: _Slot) -> None:
        slot.proc, slot.started, slot.restart_at = self.spawn(slot.index), time.monotonic(), None
        if self.signal is not None:  # the signal came while it was being started: it gets it too
            slot.proc.send_signal(self.signal)

    def run(self, shutdown_timeout: float) -> int:
        for slot in self.slots:
            self._start(slot)
        self._say(f"started {len(self.slots)} workers (pids {', '.join(str(slot.proc.pid) for slot in self.slots)})")
        while self.signal is None:
            time.sleep(POLL)
            for slot in self.slots:
                if self.signal is None:
                    self._look_after(slot, time.monotonic())
        deadline = time.monotonic() + shutdown_timeout + 5
        for slot in self.slots:
            try:
                slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
        return self.status

    def _look_after(self, slot: _Slot, now: float) -> None:
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                self._start(slot)
            return
        code = slot.proc.poll()
        if slot.first and self.serving(slot.index):
            slot.first = False
        if code is None:
            return
        if slot.first:
            self._say(f"worker {slot.proc.pid} exited at start (status {code}); stopping every worker")
            self.status = 1
            self.stop(signal.SIGTERM, None)
            return
        early = now - slot.started < EARLY_EXIT
        slot.delay = min(RESTART_DELAY_MAX, slot.delay * 2) if early else RESTART_DELAY
        slot.restart_at = now + slot.delay
        self._say(f"worker {slot.proc.pid} exited (status {code}); starting another in {slot.delay:g} s")

    def _say(self, line: str) -> None:
        announce(f"stream: {line}", logger="stream.workers", out=self.out)


def run_workers(count: int, worker_args: list[str], shutdown_timeout: float) -> int:
    """Run ``count`` workers until SIGTERM / SIGINT, which they get too; then re-raise it (the
    process ends by it). Returns the exit status only when no signal stopped the group."""
    shared = Path(tempfile.mkdtemp(prefix="stream-workers-"))
    create_table(shared, count)
    command = [sys.executable, "-m", "stream", "serve", *worker_args, "--reuse-port", "--worker-dir", str(shared)]

    def spawn(index: int) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C in a terminal reaches only this parent, which passes it on
        # once (twice would make uvicorn skip its graceful shutdown).
        return subprocess.Popen([*command, "--worker", f"{index}/{count}"], preexec_fn=_die_with_parent, start_new_session=True)

    supervisor = Supervisor(count, spawn, lambda index: (shared / f"ready-{index}").exists())
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    try:
        status = supervisor.run(shutdown_timeout)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    if supervisor.signal is not None and supervisor.status == 0:
        signal.signal(supervisor.signal, signal.SIG_DFL)
        os.kill(os.getpid(), supervisor.signal)
    return status
