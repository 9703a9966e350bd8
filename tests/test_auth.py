"""Keys and JWTs (stream/auth.py): unit checks of the verifier, then expiry on a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stream.auth import Auth, mint_token
from stream.errors import ConfigError, Forbidden, Unauthorized
from stream.settings import KeySettings, ServerSettings, load_settings

from .support import Server

SECRET = "s" * 40


def _auth(**server) -> Auth:
    return Auth((KeySettings("ops", "ops-key-123", publish=("ops.>",)),), ServerSettings(**server))


def _token(key=SECRET, algorithm="HS256", **claims) -> str:
    body = {"sub": "bot", "exp": int(time.time()) + 60, "subscribe": ["news.>"], "publish": ["bots.bot"]} | claims
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def test_hs256_token_grants_its_claims():
    """A valid HS256 JWT becomes a principal named after sub, with its patterns and expiry."""
    auth = _auth(jwt_secret=SECRET)
    principal = auth.identify(_token())
    assert principal.name == "jwt:bot"
    assert principal.subscribe == ("news.>",) and principal.publish == ("bots.bot",)
    assert principal.expires == pytest.approx(time.time() + 60, abs=2)
    auth.check_publish(principal, "bots.bot")
    with pytest.raises(Forbidden, match="'jwt:bot' may not publish to 'news.x'"):
        auth.check_publish(principal, "news.x")
    assert auth.identify("ops-key-123").name == "ops"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (_token(exp=int(time.time()) - 5), "token: expired"),
        (_token(key="x" * 40), "bad signature"),
        (_token(exp=None), "no 'exp' claim"),
        (_token(sub=None), "no 'sub' claim"),
        (_token(publish="bots.>"), "claim 'publish' must be a list of topic patterns"),
        (_token(subscribe=["news..x"]), "token claim 'subscribe'"),
        (_token(nbf=int(time.time()) + 600), "not valid yet"),
        ("a.b.c", "not a JWT signed with the configured key"),
        ("not-a-key", "not a known key or a valid JWT"),
    ],
)
def test_bad_tokens_are_401_naming_the_problem(token, message):
    """Each way a token can be wrong is an Unauthorized whose message says which."""
    with pytest.raises(Unauthorized, match=message):
        _auth(jwt_secret=SECRET).identify(token)


def test_without_jwt_settings_a_jwt_is_just_an_unknown_key():
    """With no jwt_secret / jwt_public_key, tokens are only looked up as keys."""
    with pytest.raises(Unauthorized, match="^token: not a known key$"):
        _auth().identify(_token())


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"), (ec.generate_private_key(ec.SECP256R1()), "ES256")],
)
def test_public_key_tokens(tmp_path: Path, private, algorithm):
    """jwt_public_key verifies RS256 (RSA key) or ES256 (EC P-256 key) tokens; HS256 ones are refused."""
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    auth = _auth(jwt_public_key=str(pem))
    assert auth.identify(_token(key=private, algorithm=algorithm)).name == "jwt:bot"
    with pytest.raises(Unauthorized):
        auth.identify(_token())


def test_settings_check_jwt_fields(tmp_path: Path):
    """A short secret (not echoed), an unreadable or non-PEM key file each get a line naming the key."""
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("hello")
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\njwt_secret = "tooshort-secret"\njwt_public_key = "{bad_pem}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    problems = "\n".join(caught.value.problems)
    assert "server.jwt_secret: expected at least 32 characters" in problems
    assert "tooshort" not in problems
    assert "server.jwt_public_key: " in problems and "is not a PEM public key" in problems
    missing = load_settings(None, env={"STREAM_JWT_SECRET": SECRET})
    assert missing.server.jwt_secret == SECRET and SECRET not in repr(missing)


def test_stream_token_mints_a_verifiable_jwt():
    """`stream token` signs with the configured secret: the claims are what was asked for."""
    env = {"STREAM_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "stream", "token", "--subscribe", "news.>", "--publish", "bots.a", "--ttl", "15m", "--sub", "b1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "b1" and claims["subscribe"] == ["news.>"] and claims["publish"] == ["bots.a"]
    assert claims["exp"] - claims["iat"] == 900
    assert "expires" in done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "stream", "token", "--publish", "x"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30
    )
    assert refused.returncode == 1 and "jwt_secret" in refused.stderr


@pytest.fixture(scope="module")
def jwt_server():
    with Server('[server]\npublic = []\n', env={"STREAM_JWT_SECRET": SECRET}) as server:
        yield server


async def test_jwt_rights_over_http(jwt_server):
    """Publishing and reading history follow the token's claims: 202 inside, 403 outside, 401 expired."""
    async with httpx.AsyncClient(timeout=10) as client:
        headers = {"Authorization": f"Bearer {mint_token(SECRET, 'bot', ['news.>'], ['news.bot'], 60)}"}
        ok = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "news.bot", "data": 1}, headers=headers)
        assert ok.status_code == 202
        outside = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "news.other", "data": 1}, headers=headers)
        assert outside.status_code == 403 and outside.json()["error"]["code"] == "forbidden"
        history = await client.get(f"{jwt_server.url}/api/events?topics=news.>", headers=headers)
        assert [e["data"] for e in history.json()["events"]] == [1]
        anonymous = await client.get(f"{jwt_server.url}/api/events?topics=news.>")
        assert anonymous.status_code == 401
        expired = {"Authorization": f"Bearer {_token(exp=int(time.time()) - 1)}"}
        refused = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "bots.bot", "data": 1}, headers=expired)
        assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]


async def test_expiry_closes_websocket_with_1008(jwt_server):
    """A WebSocket opened with a token that expires gets an error frame, then close code 1008."""
    token = _token(exp=int(time.time()) + 2)
    async with connect(f"{jwt_server.ws_url}?topics=news.>&token={token}") as ws:
        frames = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                async for frame in ws:
                    frames.append(orjson.loads(frame))
        assert ws.close_code == 1008 and ws.close_reason == "token expired"
    assert [f["type"] for f in frames] == ["welcome", "subscribed", "error"]
    assert "expired" in frames[-1]["message"]
    assert "token expired" in jwt_server.output() and token not in jwt_server.output()


async def test_expiry_ends_sse_stream_with_an_error_event(jwt_server):
    """An event stream opened with a token that expires ends with `event: error` (unauthorized)."""
    token = _token(exp=int(time.time()) + 2)
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{jwt_server.url}/sse?topics=news.>&token={token}") as source:
            events = [event async for event in source.aiter_sse()]
    assert events[-1].event == "error"
    assert orjson.loads(events[-1].data)["error"]["code"] == "unauthorized"


async def test_subscriber_stops_with_the_reason_when_its_token_expires(jwt_server):
    """stream.client does not retry an expired token forever: it raises, naming the cause."""
    from stream.client import SubscribeError, Subscriber

    async with Subscriber(jwt_server.ws_url, ["news.>"], token=_token(exp=int(time.time()) + 2)) as sub:
        with pytest.raises(SubscribeError, match="1008 token expired"):
            async with asyncio.timeout(10):
                async for _ in sub:
                    pass
