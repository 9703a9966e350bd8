"""The command line (stream/cli.py), run as a subprocess like a user would."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=60, env=env)


def test_check_accepts_the_built_in_config():
    """`stream check` with no file validates the built-in config and exits 0."""
    result = run("check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")


def test_check_prints_one_line_per_mistake_and_exits_1(tmp_path):
    """Each mistake is one line naming its key; the exit status is 1."""
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = -1\nmax_patterns = "many"\nsse_retry = -5\nbroker = "kafka://x"\n[nonsense]\n')
    result = run("check", "--config", str(path))
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 5, lines
    assert [line.split(":")[0] for line in lines] == [
        "nonsense",
        "server.max_patterns",
        "server.port",
        "server.sse_retry",
        "server.broker",
    ]


def test_serve_refuses_a_broken_config_with_the_problem():
    """`stream serve` with a bad config exits 1 and says why, before binding anything."""
    result = run("serve", "--config", "/nonexistent.toml")
    assert result.returncode == 1
    assert "cannot read /nonexistent.toml" in result.stderr
