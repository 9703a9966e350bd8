"""The benchmark itself (bench/run.py --quick): stream and the Python baselines must run and
deliver every message exactly once, so neither the harness nor a baseline can rot. No timing is
asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


def test_quick_benchmark_delivers_everything_once(tmp_path):
    """A few seconds, 200 subscribers over WebSocket and SSE, for stream and each Python
    baseline: no loss, no duplicate, in order. And the hostile scenario at a tenth of its size:
    the attacker opens all its sockets and stream's subscribers lose nothing under it."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert {(r["server"], r["transport"]) for r in results} == {
        ("stream", "ws"),
        ("fastapi-connection-manager", "ws"),
        ("floor-raw-uvloop", "ws"),
        ("stream", "sse"),
        ("sse-starlette-queues", "sse"),
    }
    for result in results:
        assert result["published"] > 0
        assert result["delivered"] == result["expected"] == result["published"] * result["subscribers"]
        assert result["lost"] == result["duplicates"] == result["out_of_order"] == 0
    assert "WebSocket fan-out" in done.stdout and "user µs" in done.stdout
    assert {r["scenario"] for r in results} == {"ws", "sse", "hostile-clean", "hostile"}
    hostile = json.loads(out.read_text())["hostile"]
    assert hostile["lost"] == 0 and hostile["hostile"]["lost"] == hostile["clean"]["lost"] == 0
    assert hostile["attack_complete"], hostile["hostile"]["attacker"]  # no timing: "passed" is not asserted
    assert "verdict:" in done.stdout
