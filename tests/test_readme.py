"""Every shell command in the README works as written, after the Quick start.

The README's ```sh blocks are read from the file itself; each command runs in bash, in the
repository, with the environment activated as the README says, against a real server started
with examples/publisher.toml (its key and demo market are what the README's examples use). The
only rewrite is the address: 127.0.0.1:8000 becomes the test server's port. Commands that stream
forever (`curl -N`, `stream tail`) must print something within a few seconds; commands that
start servers, install things or run the suite (the Quick start, `stream serve`, the benchmark,
pytest) are the ones this very run already exercises and are left out.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .support import Server, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()

# Commands that are not run here, and why.
_NOT_RUN = (
    "python3 -m venv",  # the Quick start and the benchmark: install, serve forever, or take minutes
    "stream serve",  # servers: this test runs one
    ".venv/bin/python -m pytest",  # the suite itself
)
_STREAMING = ("curl -N", "stream tail")
# The Scaling out commands start Redis and two nodes of their own: test_scaling_out runs them.
_CLUSTER = ("redis-server", "127.0.0.1:8001", "127.0.0.1:8002")


def shell_commands() -> list[str]:
    """Each command of the README's ```sh blocks, with backslash continuations joined."""
    commands: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_readme_has_the_commands_this_test_expects():
    """The extraction finds the README's commands (so a changed README cannot make this vacuous)."""
    commands = shell_commands()
    assert "source .venv/bin/activate" in commands
    assert sum(command.startswith("curl") for command in commands) >= 7
    assert sum(command.startswith("stream ") for command in commands) >= 5


def test_every_readme_shell_command_works_as_written(tmp_path):
    """Each non-interactive command exits 0 without an error answer; each streaming one is
    still running after 3 s and has printed what it follows."""
    config = (ROOT / "examples" / "publisher.toml").read_text()
    activate = ROOT / ".venv" / "bin" / "activate"
    with Server(config) as server:
        env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_")}
        env["STREAM_URL"] = server.url  # `stream tail` / `publish` default to 127.0.0.1:8000
        if not activate.exists():  # the suite runs from some other environment: put it on PATH
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        failures = []
        ran = 0
        exports = ""  # `export X=…` lines stay in force for the commands after them, as in a shell
        for command in shell_commands():
            if command.startswith(_NOT_RUN) or any(part in command for part in _CLUSTER):
                continue
            if command.startswith("source ") and not activate.exists():
                continue
            line = command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
            if line.startswith("export "):
                exports += line + "\n"
            prelude = ("source .venv/bin/activate\n" if activate.exists() else "") + exports
            streaming = line.startswith(_STREAMING)
            script = prelude + (f"timeout 3 {line}" if streaming else line)
            result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            ran += 1
            output = result.stdout + result.stderr
            if streaming:
                # Still running at the deadline, with output (a symbol filter may rightly have none yet).
                printed = result.stdout.strip() != "" or "--symbols" in line
                ok = result.returncode == 124 and printed and "Traceback" not in output
            else:
                ok = result.returncode == 0 and '{"error"' not in result.stdout
            if not ok:
                failures.append(f"$ {command}\n(exit {result.returncode})\n{output[-600:]}")
    assert ran >= 12
    assert not failures, "\n\n".join(failures)


def test_the_docs_stand_alone():
    """README and docs/ never send a reader to a specification or an issue the repository does
    not contain."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for phrase in ("SPEC", "the issue", "issue's"):
            assert phrase not in text, f"{path.name} mentions {phrase!r}"


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run is the README's Quick start command 2, so a green CI means that command works."""
    quick_start = re.search(r"^# 2\..*\n(.+)$", README, flags=re.MULTILINE)
    assert quick_start is not None
    ci = (ROOT / ".ci" / "run").read_text()
    assert quick_start.group(1).strip() in ci.splitlines()


def test_scaling_out_shows_a_publish_on_one_node_arriving_on_the_other(redis_binary, tmp_path):
    """The README's two Scaling out commands, as written but on free ports, in one shell as a
    reader would type them: Redis and two nodes start, the event published on the first node is
    printed by `stream tail` on the second, and both nodes still run afterwards (command 2 stops
    its own tail, not a node)."""
    from .support import free_port

    block = README[README.index("## Scaling out") :]
    commands = [c for c in shell_commands() if any(part in c for part in _CLUSTER) and c in block]
    assert len(commands) == 2 and commands[0].startswith("redis-server")
    ports = {"6379": str(free_port()), "8001": str(free_port()), "8002": str(free_port())}
    script = []
    for command in commands:
        for old, new in ports.items():
            command = command.replace(old, new)
        script.append(command.replace("redis-server", redis_binary, 1))
    activate = ROOT / ".venv" / "bin" / "activate"
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_")}
    if not activate.exists():
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    prelude = "source .venv/bin/activate\n" if activate.exists() else ""
    printed = tmp_path / "shown"
    ready = " && ".join(f"until curl -sf http://127.0.0.1:{ports[port]}/readyz >/dev/null; do sleep 0.1; done" for port in ("8001", "8002"))
    shell = f"{prelude}{script[0]}\n{ready}\n{script[1]}\necho __done__\nwait"
    with printed.open("w") as out:
        nodes = subprocess.Popen(["bash", "-c", shell], cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "__done__" in printed.read_text(), 60)
        still = [_is_ready(f"http://127.0.0.1:{ports[port]}") for port in ("8001", "8002")]
    finally:
        os.killpg(nodes.pid, signal.SIGTERM)
        nodes.wait(30)
        import redis

        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=int(ports["6379"])).shutdown(nosave=True)
    shown = printed.read_text()
    assert "desk.hello" in shown and "node 8001" in shown.replace(ports["8001"], "8001"), shown
    assert still == [True, True], f"a node stopped with command 2: {still}\n{shown}"


def _is_ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
