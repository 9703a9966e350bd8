"""The command line (stream/cli.py), run as a subprocess like a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .support import Server


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


def test_check_reports_five_provider_mistakes_on_five_lines(tmp_path):
    """Five different provider mistakes: five lines, each naming providers[i].key, exit 1."""
    path = tmp_path / "providers.toml"
    path.write_text(
        """
[[providers]]
name = "edgar"
kind = "feed"
url = "ftp://sec.example/feed"          # 1: not http(s)
interval = 0.5                           # 2: below 1 s

[[providers]]
name = "news"
kind = "json"
url = "https://newsapi.example/v2/top"
params = { apiKey = "${NEWSAPI_KEY}" }   # 3: variable not set
topic = "news..{source}"                 # 4: empty segment

[[providers]]
name = "ticker"
kind = "snapshot"
url = "https://ticker.example/prices"
overflow = "squash"                      # 5: unknown policy
"""
    )
    result = run("check", "--config", str(path), env={"PATH": "/usr/bin:/bin"})
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 5, lines
    assert [line.split(":")[0] for line in lines] == [
        "providers[0].url",
        "providers[0].interval",
        "providers[1].params.apiKey",
        "providers[1].topic",
        "providers[2].overflow",
    ]


def test_the_example_providers_are_valid_config(tmp_path):
    """examples/providers.toml with every block switched on passes `stream check`."""
    example = Path(__file__).parent.parent / "examples" / "providers.toml"
    switched_on = "\n".join(line[2:] if (line.startswith("# ") and "=" in line) or line.startswith("# [[") else line for line in example.read_text().splitlines())
    path = tmp_path / "all.toml"
    path.write_text(switched_on)
    env = {
        "PATH": "/usr/bin:/bin",
        "NEWSAPI_KEY": "k" * 32,
        "EODHD_API_KEY": "e" * 16,
        "FINNHUB_API_KEY": "f" * 20,
        "ALPACA_KEY_ID": "a" * 20,
        "ALPACA_SECRET_KEY": "s" * 40,
        "MASTODON_TOKEN": "m" * 43,
    }
    result = run("check", "--config", str(path), env=env)
    assert result.returncode == 0, result.stdout
    assert "16 provider(s)" in result.stdout


def test_pretty_lines_for_headlines_quotes_and_anything_else():
    """Headlines show title, symbols and source; quotes price and change; other data as JSON."""
    from stream.cli import pretty

    assert pretty("news.x", 0, {"title": "Apple files", "symbols": ["AAPL"], "source": "SEC"}).endswith("news.x  Apple files [AAPL] — SEC")
    assert pretty("quotes.AAPL", 0, {"price": 1234.5, "change_pct": -0.25}).endswith("quotes.AAPL  1,234.5 (-0.25%)")
    assert pretty("misc", 0, {"k": [1, 2]}).endswith('misc  {"k":[1,2]}')
    assert len(pretty("misc", 0, "x" * 500, width=80)) == 80


def test_tail_follows_a_real_server_across_a_restart(tmp_path):
    """`stream tail --json` prints events as JSON lines, notes the reconnect on stderr, reports the
    restart's gap, and carries on with the new server's events."""
    import asyncio
    import json
    import signal
    import threading

    from .support import KEYS, Server, metric_now, publish_sync, wait_until

    first = Server(KEYS).start()
    tail = subprocess.Popen(
        [sys.executable, "-m", "stream", "tail", "clitail.>", "--url", first.url, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(tail.stderr), daemon=True).start()
    try:
        lines = []
        wait_until(lambda: metric_now(first, "stream_subscriptions ") >= 1)  # tail has subscribed
        ids = publish_sync(first, [{"topic": "clitail.a", "data": {"n": n}} for n in range(3)])
        lines = [json.loads(tail.stdout.readline()) for _ in range(3)]
        assert [line["id"] for line in lines] == ids
        first.stop()
        second = Server(KEYS)
        second.port, second.url, second.ws_url = first.port, first.url, first.ws_url
        with second:
            wait_until(lambda: metric_now(second, "stream_subscriptions ") >= 1)  # tail is back
            [after] = publish_sync(second, {"topic": "clitail.a", "data": {"n": 3}})
            gap = json.loads(tail.stdout.readline())
            event = json.loads(tail.stdout.readline())
            tail.send_signal(signal.SIGINT)
            code = tail.wait(10)
    finally:
        tail.kill()
        first.stop()
    assert gap == {"type": "gap", "after": None, "reason": "epoch"}
    assert event["id"] == after and event["data"] == {"n": 3}
    assert any("reconnecting" in line for line in stderr) and any("gap after" in line for line in stderr)
    assert code == 130
    assert asyncio


def test_publish_prints_the_id_and_reports_errors(tmp_path):
    """`stream publish` prints the new id; a refused publish exits 1 with the error code."""
    from .support import KEYS, PUBLISH_KEY, Server

    with Server(KEYS) as server:
        ok = run("publish", "clipub.a", '{"x": 1}', "--url", server.url, "--token", PUBLISH_KEY)
        denied = run("publish", "clipub.a", '{"x": 1}', "--url", server.url)
        bad_json = run("publish", "clipub.a", "{nope", "--url", server.url)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("-1")
    assert denied.returncode == 1 and "401 unauthorized" in denied.stderr
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr


def test_check_reports_every_problem_of_a_provider_with_a_bad_kind(tmp_path):
    """A bad kind does not hide the provider's other mistakes; FILE may be given positionally."""
    path = tmp_path / "kind.toml"
    path.write_text('[[providers]]\nname = "x"\nkind = "rss"\nurl = "ftp://x"\ninterval = 0\ntopic = "a..b"\n')
    result = run("check", str(path))
    keys = [line.split(":")[0] for line in result.stdout.strip().splitlines()]
    assert result.returncode == 1
    assert keys == ["providers[0].kind", "providers[0].url", "providers[0].interval", "providers[0].topic"], result.stdout


def test_serve_on_a_busy_port_never_claims_to_be_serving():
    """With the port taken, `stream serve` says why and fails without a 'serving on' line."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.returncode != 0
    assert "serving on" not in result.stderr and "address already in use" in result.stderr.lower()


def test_tail_accepts_a_relative_since_after_a_space():
    """`stream tail 'news.>' --since -10m` parses (argparse alone reads -10m as an option): it
    goes on to wait for the server."""
    tail = subprocess.Popen(
        [sys.executable, "-m", "stream", "tail", "news.>", "--since", "-10m", "--url", "http://127.0.0.1:9"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = tail.stderr.readline()  # type: ignore[union-attr]
    finally:
        tail.kill()
        tail.wait()
    assert "expected one argument" not in first and "waiting for the server" in first, first


def test_tail_started_before_the_server_waits_for_it_and_then_follows():
    """`stream tail` against a server that is not up yet says so on stderr and keeps trying; once
    the server starts, it subscribes and prints what is published (it used to exit at once)."""
    import json

    from .support import KEYS, free_port, metric_now, publish_sync, wait_until

    server = Server(KEYS, port=free_port())
    tail = subprocess.Popen(
        [sys.executable, "-m", "stream", "tail", "early.>", "--url", server.url, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waiting = tail.stderr.readline()  # type: ignore[union-attr]
        assert "stream tail: waiting for the server" in waiting and "retrying" in waiting, waiting
        with server:
            wait_until(lambda: metric_now(server, "stream_subscriptions ") >= 1, 60)  # its backoff is at most 30 s
            [event_id] = publish_sync(server, {"topic": "early.a", "data": {"n": 1}})
            line = json.loads(tail.stdout.readline())  # type: ignore[union-attr]
    finally:
        tail.kill()
        tail.wait()
    assert line["id"] == event_id and tail.returncode != 0  # killed: it was still following


def test_check_reads_a_config_from_a_pipe():
    """`stream check --config /dev/stdin` checks what is piped in (it used to say ok to anything)."""
    command = [sys.executable, "-m", "stream", "check", "--config", "/dev/stdin"]
    broken = subprocess.run(command, input='[server]\nport = "x"\n', capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and broken.stdout.startswith("server.port: expected an integer"), broken
    good = subprocess.run(command, input="[server]\nport = 9001\n", capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "listen 127.0.0.1:9001" in good.stdout, good


def test_an_unknown_stream_variable_is_warned_about_naming_the_closest_setting():
    """A typo in a STREAM_* variable (STREAM_PROT=9) is named, with the setting it is closest to,
    by `stream check` and at `stream serve`'s start; the CLI's own variables are not unknown."""
    env = {"PATH": "/usr/bin:/bin", "STREAM_PROT": "9", "STREAM_URL": "http://127.0.0.1:1", "STREAM_JWT_SECRET": "s" * 32}
    result = run("check", env=env)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[0] == "warning: environment variable STREAM_PROT is not a setting of stream and is ignored; did you mean STREAM_PORT?"
    assert "STREAM_URL" not in result.stdout and "STREAM_JWT_SECRET" not in result.stdout
    server = Server(None, env={"STREAM_PROT": "9"})
    with server:
        pass
    assert "STREAM_PROT is not a setting of stream and is ignored; did you mean STREAM_PORT?" in server.output()


def test_a_busy_port_is_one_line_and_exit_1_with_or_without_workers(tmp_path):
    """`stream serve` on a port another process holds says so in one line (after the start
    banner), exits 1, and starts nothing: no "startup complete", no traceback, one line too
    with --workers 2 (it printed one traceback per worker)."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "redis.toml"
    config.write_text('[server]\nbroker = "redis://127.0.0.1:1/0"\n')  # --workers needs a Redis broker; it is never reached
    try:
        alone = run("serve", "--port", str(port))
        workers = run("serve", "--config", str(config), "--port", str(port), "--workers", "2")
    finally:
        holder.close()
    for result in (alone, workers):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, result.stderr
        assert lines[-1].endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use"), lines
        assert len(lines) <= 2 and "Traceback" not in result.stderr and "startup complete" not in result.stderr, lines
