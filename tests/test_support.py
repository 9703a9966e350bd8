"""The test harness itself (tests/support.py): a `stream serve` it starts never outlives it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent

_ORPHANING = """
import os, sys
sys.path.insert(0, {root!r})
from tests.support import Server
server = Server().start()
print(server.proc.pid, flush=True)
os._exit(1)  # dies without stopping it, like a killed test run
"""


def test_a_server_dies_with_the_test_process_that_started_it():
    """A test process that exits without stop() (killed, timed out) takes its server with it."""
    child = subprocess.run(
        [sys.executable, "-c", _ORPHANING.format(root=str(ROOT))], capture_output=True, text=True, timeout=60
    )
    pid = int(child.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"stream serve {pid} outlived the process that started it"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    if state == "Z":  # a zombie is dead; its new parent just has not reaped it yet
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
