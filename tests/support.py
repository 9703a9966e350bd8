"""Test helpers: a real ``stream serve`` process on a free port, and a raw WebSocket peer."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

PUBLISH_KEY = "test-publisher-key"
KEYS = f"""
[[keys]]
name = "tests"
key = "{PUBLISH_KEY}"
publish = [">"]
subscribe = [">"]
publish_rate = 1000000
publish_burst = 100000
"""
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}


_PR_SET_PDEATHSIG = 1
RUNNING: set[Server] = set()  # every started Server not yet stopped (conftest checks it at the end)


def die_with_parent() -> None:
    """In the child before exec: the kernel kills it when the test process dies, however that
    happens (a timeout, ^C, a crash), so no `stream serve` outlives the suite."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Certificate:
    """A self-signed certificate for ``names`` and 127.0.0.1, made in ``directory``: its PEM file
    (``cert``), its key (``key``) and both in one file (``bundle``, HAProxy's ``crt``)."""

    def __init__(self, directory: Path, names: tuple[str, ...] = ("localhost",)) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        now = datetime.datetime.now(datetime.UTC)
        alternatives = [*(x509.DNSName(name) for name in names), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.cert, self.key, self.bundle = (directory / f"{names[0]}{suffix}" for suffix in (".pem", ".key", "-bundle.pem"))
        self.cert.write_bytes(cert_pem)
        self.key.write_bytes(key_pem)
        self.bundle.write_bytes(cert_pem + key_pem)
        for path in (self.key, self.bundle):
            path.chmod(0o600)

    def trust(self) -> ssl.SSLContext:
        """A client context that trusts this certificate and nothing else (and checks the name)."""
        context = ssl.create_default_context(cafile=str(self.cert))
        context.set_alpn_protocols(["http/1.1"])
        return context


class Server:
    """``stream serve`` in a subprocess, with a config written from ``toml``."""

    def __init__(
        self,
        toml: str | None = KEYS,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        args: tuple[str, ...] = (),
        tls: Certificate | None = None,
    ) -> None:
        """``toml=None`` runs the built-in config, as `stream serve` with no --config does;
        ``port`` reuses a port (a restart); ``args`` are more options of `stream serve`;
        ``tls``: it serves TLS itself with that certificate (https://, wss://)."""
        self.port = port or free_port()
        self.tls = tls
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ws_url = f"{'wss' if tls is not None else 'ws'}://127.0.0.1:{self.port}/ws"
        self.args = [*args, *(("--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)) if tls is not None else ())]
        self.config: Path | None = None
        if toml is not None:
            handle, path = tempfile.mkstemp(suffix=".toml", prefix="stream-test-")
            os.write(handle, toml.encode())
            os.close(handle)
            self.config = Path(path)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("STREAM_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(suffix=".log", prefix="stream-test-")[1])

    def child_setup(self) -> None:
        """Runs in the child before exec; subclasses may add limits (call super)."""
        die_with_parent()

    def start(self, timeout: float = 20.0) -> Server:
        if self.proc is not None:
            raise RuntimeError("this Server was already started; use `with Server(...)` or start() once")
        self._log_file = open(self.log, "wb")
        config = ["--config", str(self.config)] if self.config is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream", "serve", *config, "--port", str(self.port), *self.args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=self.child_setup,
        )
        RUNNING.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stream serve exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"stream serve did not become ready:\n{self.output()}")

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What a client of this server trusts (``verify=`` of httpx, ``ssl=`` of websockets)."""
        return self.tls.trust() if self.tls is not None else True

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> float:
        """Signal the server and wait for it to exit; return how long that took."""
        assert self.proc is not None
        started = time.monotonic()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if self.proc.poll() is None:  # interrupted while waiting: never leave it running
                self.proc.kill()
                self.proc.wait()
            RUNNING.discard(self)
            self._log_file.close()
        return time.monotonic() - started

    def __enter__(self) -> Server:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            if self.config is not None:
                self.config.unlink(missing_ok=True)


async def publish(client: httpx.AsyncClient, server: Server, items: list[dict[str, Any]] | dict[str, Any]) -> list[str]:
    response = await client.post(f"{server.url}/api/publish", json=items, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["ids"]


def publish_sync(server: Server, items: list[dict[str, Any]] | dict[str, Any]) -> list[str]:
    response = httpx.post(f"{server.url}/api/publish", json=items, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["ids"]


class RawWebSocket:
    """A WebSocket peer over a plain socket, so a test can stop reading or ignore pings."""

    def __init__(self, port: int, path: str = "/ws", *, rcvbuf: int | None = None, headers: str = "") -> None:
        self.sock = self.open(port, rcvbuf)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        )
        self.sock.sendall(request.encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])

    def open(self, port: int, rcvbuf: int | None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return sock

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """One masked client frame (0x1 text, 0x8 close, 0x9 ping, 0xA pong)."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        self.sock.sendall(header + mask + masked)

    def _read(self, count: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        while len(self.buffer) < count:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame as (opcode, payload)."""
        first, second = self._read(2, timeout)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2, timeout))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8, timeout))
        return first & 0x0F, self._read(length, timeout)

    def messages_until_close(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
        """Read every text frame until a close frame; return (messages, close code)."""
        messages = []
        while True:
            try:
                opcode, payload = self.frame(timeout)
            except (EOFError, ConnectionResetError):
                return messages, None
            if opcode == 0x1:
                messages.append(orjson.loads(payload))
            elif opcode == 0x8:
                return messages, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self) -> None:
        self.sock.close()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class SSEReader:
    """Reads data-carrying messages from an httpx-sse source, skipping id-only position markers."""

    def __init__(self, source: Any) -> None:
        self.iterator = source.aiter_sse()
        self.position: str | None = None  # the Last-Event-ID a browser would now hold

    async def take(self, count: int, timeout: float = 10.0) -> list[Any]:
        found: list[Any] = []

        async def read() -> None:
            while len(found) < count:
                sse = await anext(self.iterator)
                if sse.id:
                    self.position = sse.id
                if sse.data or sse.event != "message":
                    found.append(sse)

        await asyncio.wait_for(read(), timeout)
        return found


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric_now(server: Server, line_prefix: str) -> float:
    """One metric of a running server, read synchronously (0 when the line is absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_prefix)), 0.0)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:
    """The synchronous wait_for: poll a condition, fail if it does not hold in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


async def metric(client: httpx.AsyncClient, server: Server, line_prefix: str) -> float:
    text = (await client.get(f"{server.url}/metrics")).text
    return float(next(line for line in text.splitlines() if line.startswith(line_prefix)).split()[-1])
