"""stream's own TLS (`stream serve --ssl-certfile/--ssl-keyfile`, docs/deploy.md): https:// and
wss:// served directly, the demo connecting to itself over it, the workers serving it too, a
handshake bounded in time and counted from accept, and files that cannot serve refused in one line."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from .support import KEYS, Certificate, Server, SSEReader, metric, publish, wait_until
from .test_resume import recv
from .test_scaleout import cluster_config


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Certificate:
    return Certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(certificate):
    with Server(KEYS + "\n[server]\nssl_handshake_timeout = 1\n", tls=certificate) as server:
        yield server


async def test_wss_and_https_sse_are_served_directly(tls_server):
    """A WebSocket subscriber over wss:// and an SSE subscriber over https:// each get what is
    published over https://; a client that does not trust the certificate is refused by TLS."""
    async with httpx.AsyncClient(verify=tls_server.verify, timeout=10) as client:
        async with connect(tls_server.ws_url, ssl=tls_server.verify) as ws:
            assert (await recv(ws))["type"] == "welcome"
            await ws.send(orjson.dumps({"op": "subscribe", "topics": ["tls.direct"]}).decode())
            assert (await recv(ws))["type"] == "subscribed"
            async with aconnect_sse(client, "GET", f"{tls_server.url}/sse?topics=tls.direct") as source:
                assert source.response.url.scheme == "https"
                reader = SSEReader(source)
                await asyncio.sleep(0.1)
                ids = await publish(client, tls_server, [{"topic": "tls.direct", "data": {"n": n}} for n in range(3)])
                got = await reader.take(3)
            frames = [await recv(ws) for _ in range(3)]
    assert [event.id for event in got] == ids
    assert [frame["id"] for frame in frames] == ids
    async with httpx.AsyncClient() as untrusting:  # the system's trust store has never heard of it
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.get(f"{tls_server.url}/healthz")


async def test_a_handshake_counts_from_accept_and_ends_within_ssl_handshake_timeout(tls_server):
    """A socket that connects and never says hello holds a place in stream_sockets at once (not
    only once a handshake is done), and is closed after ssl_handshake_timeout (1 s here), counted
    in stream_sockets_closed_total{reason="tls_handshake"}."""
    async with httpx.AsyncClient(verify=tls_server.verify, timeout=10) as client:
        before = await metric(client, tls_server, 'stream_sockets_closed_total{reason="tls_handshake"}')
        quiet = [socket.create_connection(("127.0.0.1", tls_server.port)) for _ in range(5)]
        try:
            # Each look is a socket of its own (a new client), so the 5 silent ones show as ≥ 6.
            while await metric(httpx.AsyncClient(verify=tls_server.verify, timeout=10), tls_server, "stream_sockets ") < 6:
                await asyncio.sleep(0.02)
            for sock in quiet:
                assert _closed_by_server(sock)
        finally:
            for sock in quiet:
                sock.close()
        after = await metric(client, tls_server, 'stream_sockets_closed_total{reason="tls_handshake"}')
    assert after - before == 5


async def test_a_refused_upgrade_over_tls_is_gone_within_close_timeout(certificate):
    """A WebSocket upgrade refused over TLS (403, a foreign Origin) whose client reads the answer
    but never says close_notify back: the server's side goes (its TLS shutdown waits
    close_timeout, 1 s here, not asyncio's 30 s) with no traceback on the way. The refusal used
    to close the TLS transport twice, which makes it forget its protocol: the upgrade's
    set_protocol, the abort timer and the stall watch then failed in callbacks."""
    toml = KEYS + '\n[server]\nclose_timeout = 1\nallowed_origins = ["https://ok.example"]\n'
    with Server(toml, tls=certificate) as server:
        async with httpx.AsyncClient(verify=server.verify, timeout=10) as client:
            raw = socket.create_connection(("127.0.0.1", server.port))
            sock = server.verify.wrap_socket(raw, server_hostname="127.0.0.1")
            try:
                sock.sendall(
                    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    b"Origin: https://evil.example\r\n\r\n"
                )
                sock.settimeout(10)
                answer = b""
                while chunk := sock.recv(4096):  # b"" at the server's close_notify; ours never goes
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
                started = asyncio.get_running_loop().time()
                while await metric(client, server, "stream_sockets ") > 1:  # 1: this client's own
                    assert asyncio.get_running_loop().time() - started < 10, "the refused socket is still open"
                    await asyncio.sleep(0.05)
            finally:
                raw.close()
        assert "Traceback" not in server.output(), server.output()[-3000:]


async def test_the_built_in_demo_connects_to_itself_over_its_own_tls(certificate):
    """With no config and --ssl-*, the demo's push providers reach /demo/… over wss:// and
    https:// (trusting the certificate served) and headlines arrive."""
    with Server(None, tls=certificate) as server:
        async with httpx.AsyncClient(verify=server.verify, timeout=10) as client:

            providers: list = []
            news: list = []
            while len(providers) != 3 or any(p["state"] != "connected" for p in providers) or not news:
                await asyncio.sleep(0.1)
                providers = (await client.get(f"{server.url}/api/providers")).json()
                news = (await client.get(f"{server.url}/api/news?limit=1")).json()["headlines"]
        assert "serving on https://127.0.0.1:" in server.output()
    assert news[0]["data"]["provider"].startswith("demo-")


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # dropped: a reset, so the kernel keeps nothing of it
        return True


@pytest.mark.slow
def test_workers_all_serve_tls(certificate, redis_server):
    """--ssl-* reaches every worker of --workers 2: each says it serves https://, and fresh
    connections (spread over the workers by the kernel) all shake hands."""
    server = Server(cluster_config(redis_server.url), args=("--workers", "2"), tls=certificate)
    with server:
        wait_until(lambda: server.output().count("serving on https://") == 2, timeout=30)
        for _ in range(12):
            with httpx.Client(verify=server.verify, timeout=10) as client:  # a new connection each
                assert client.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.parametrize("problem", ["missing", "not_pem", "wrong_key", "encrypted_key", "no_key"])
def test_certificate_files_that_cannot_serve_are_one_line_before_listening(certificate, tmp_path, problem):
    """serve exits 1 with one line naming the setting, and `stream check` says the same."""
    other = Certificate(tmp_path, ("other",))
    cert, key = {
        "missing": (tmp_path / "nope.crt", certificate.key),
        "not_pem": (tmp_path / "garbage.crt", certificate.key),
        "wrong_key": (certificate.cert, other.key),
        "encrypted_key": (certificate.cert, _encrypted(certificate.key, tmp_path / "encrypted.key")),
        "no_key": (certificate.cert, None),
    }[problem]
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    config = tmp_path / "stream.toml"
    config.write_text(f'[server]\nport = 0\nssl_certfile = "{cert}"\n' + ("" if key is None else f'ssl_keyfile = "{key}"\n'))
    served = subprocess.run([sys.executable, "-m", "stream", "serve", "--config", str(config)], capture_output=True, text=True, timeout=30)
    checked = subprocess.run([sys.executable, "-m", "stream", "check", str(config)], capture_output=True, text=True, timeout=30)
    lines = (served.stdout + served.stderr).strip().splitlines()
    assert served.returncode == 1 and checked.returncode == 1
    assert len(lines) == 1 and "server.ssl_" in lines[0], lines
    expected = {
        "missing": f"cannot read {cert}",
        "not_pem": "expected a PEM certificate chain",
        "wrong_key": "expected a PEM certificate chain",
        "encrypted_key": "the private key is encrypted",  # not a pass phrase prompt on the terminal
        "no_key": "holds no private key",
    }[problem]
    assert expected in lines[0] and expected in checked.stdout
    assert "serving on" not in served.stdout + served.stderr


def _encrypted(key: Path, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")))
    return path
