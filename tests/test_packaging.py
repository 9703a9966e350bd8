"""The built wheel: installed anywhere, it serves the dashboard as the source tree does."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from .support import Server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


class InstalledServer(Server):
    """`python -m stream serve` from a fresh environment holding only the wheel (its
    dependencies come from this environment's site-packages, read-only)."""

    def __init__(self, python: Path, cwd: Path) -> None:
        super().__init__(None)
        self.python = python
        self.cwd = cwd

    def start(self, timeout: float = 30.0) -> Server:
        command = [str(self.python), "-m", "stream", "serve", "--port", str(self.port)]
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            command, cwd=self.cwd, stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env, preexec_fn=self.child_setup
        )
        from .support import RUNNING

        RUNNING.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self


def test_the_wheel_serves_the_dashboard(tmp_path):
    """pip wheel . (no licence warning, an SPDX licence) → install into a new environment → GET /
    is the dashboard, with its scripts."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    # The licence is an SPDX expression: a TOML table makes setuptools warn that builds stop
    # working after 2027-02-18.
    assert "project.license" not in build.stdout + build.stderr, build.stderr[-2000:]
    [wheel] = wheels.glob("stream-*.whl")
    with zipfile.ZipFile(wheel) as built:
        metadata = built.read(next(name for name in built.namelist() if name.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300
    )
    # Dependencies from this environment; its editable `stream` is not reachable from there.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = env_dir / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import stream; print(stream.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert where.startswith(str(site)), where
    with InstalledServer(python, tmp_path) as server:
        page = httpx.get(f"{server.url}/", timeout=5)
        script = httpx.get(f"{server.url}/js/app.js", timeout=5)
    assert page.status_code == 200 and "<title>stream" in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
