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
    the attacker opens all its sockets and stream's subscribers lose nothing under it; the
    attack scenario, small: every group reaches the defence it probes, the canary loses
    nothing and the upstream was polled; the fdchurn scenario, short: /healthz was probed under
    the churn."""
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
    assert {r["scenario"] for r in results} == {"ws", "sse", "hostile-clean", "hostile", "attack-quiet", "attack"}
    report = json.loads(out.read_text())
    hostile = report["hostile"]
    assert hostile["lost"] == 0 and hostile["hostile"]["lost"] == hostile["clean"]["lost"] == 0
    assert hostile["attack_complete"], hostile["hostile"]["attacker"]  # no timing: "passed" is not asserted
    assert "verdict:" in done.stdout
    attack = report["attack"]  # no timing: its verdicts are not asserted
    assert attack["quiet"]["lost"] == attack["attacked"]["lost"] == 0
    assert attack["quiet"]["upstream_polled"] > 0 and attack["attacked"]["upstream_polled"] > 0
    assert set(attack["verdicts"]) == {"p99", "nothing_lost", "rss", "release", "pool"}
    assert len(attack["groups_reached"]) == 11 and all(attack["groups_reached"].values()), attack["groups_reached"]
    fdchurn = report["fdchurn"]
    assert fdchurn["tried"] > 0 and fdchurn["attacker"]["groups"]["fd_churn"]["connects"] >= fdchurn["sockets"]
    assert "verdicts:" in done.stdout and "fd churn:" in done.stdout


def test_the_sweep_writes_its_table_json_and_plot(tmp_path, redis_binary):
    """bench/run.py --only sweep, at one rate for stream's three variants (coalescing off, on, and
    2 workers on Redis): the capacity table, the JSON rows and the PNG. No timing is asserted."""
    out, png = tmp_path / "bench.json", tmp_path / "capacity.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "sweep", "--no-baselines", "--rates", "50",
         "--json", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    labels = {"stream, write_delay 0 (off)", "stream, coalescing", "stream, coalescing, 2 workers"}
    assert set(report["capacity"]) == labels
    for result in report["results"]:
        assert result["scenario"] == "sweep" and result["rate"] == 50
        assert result["delivered"] == result["expected"] == result["published"] * result["subscribers"] > 0
        assert result["lost"] == result["duplicates"] == result["out_of_order"] == 0
    assert {r["server"] for r in report["results"]} == labels
    assert "Rate sweep" in done.stdout and "capacity (highest rate sustained)" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
