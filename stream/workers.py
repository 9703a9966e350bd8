"""``stream serve --workers N``: N processes on one port, each a node of the same Redis hub.

Each worker is ``stream serve`` itself, run with ``--reuse-port``: it binds its own listening
socket with SO_REUSEPORT and the kernel spreads new connections over the workers. This parent
only starts them, passes SIGTERM / SIGINT on, and restarts a worker that dies (one that dies
within its first seconds, e.g. on a busy port, ends the whole group instead: it would only die
again). Workers get SIGKILL from the kernel if this process is killed, so none is left behind.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

__all__ = ["listening_socket", "run_workers"]

_PR_SET_PDEATHSIG = 1
EARLY_EXIT = 5.0  # seconds: a worker gone sooner than this failed to start
RESTART_DELAY = 1.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other workers may bind to the same port as well."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: a killed parent may leave workers, which SIGTERM still ends


def run_workers(count: int, worker_args: list[str], shutdown_timeout: float) -> int:
    """Run ``count`` workers (``python -m stream serve <worker_args> --reuse-port``) until
    SIGTERM / SIGINT; returns the exit status for the parent."""
    command = [sys.executable, "-m", "stream", "serve", *worker_args, "--reuse-port"]
    stopping = False

    def start() -> tuple[subprocess.Popen[bytes], float]:
        # A session of its own: Ctrl-C in a terminal reaches only this parent, which passes it on
        # once (twice would make uvicorn skip its graceful shutdown).
        return subprocess.Popen(command, preexec_fn=_die_with_parent, start_new_session=True), time.monotonic()

    def stop(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in workers:
            if proc.poll() is None:
                proc.send_signal(sig)

    workers: list[tuple[subprocess.Popen[bytes], float]] = []
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers += [start() for _ in range(count)]
    print(f"stream: started {count} workers (pids {', '.join(str(p.pid) for p, _ in workers)})", file=sys.stderr, flush=True)
    status = 0
    while not stopping:
        time.sleep(0.2)
        for index, (proc, started) in enumerate(workers):
            code = proc.poll()
            if code is None or stopping:
                continue
            if time.monotonic() - started < EARLY_EXIT:
                print(f"stream: worker {proc.pid} exited at start (status {code}); stopping every worker", file=sys.stderr, flush=True)
                status = 1
                stop(signal.SIGTERM, None)
                break
            print(f"stream: worker {proc.pid} exited (status {code}); starting another", file=sys.stderr, flush=True)
            time.sleep(RESTART_DELAY)
            if not stopping:  # a stop may have come during the delay
                workers[index] = start()
    deadline = time.monotonic() + shutdown_timeout + 5
    for proc, _ in workers:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return status
