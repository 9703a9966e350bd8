"""Keys and JWTs (stream/auth.py): unit checks of the verifier, then expiry on a real server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
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

from stream.auth import LEEWAY, Auth, mint_token
from stream.errors import ConfigError, Forbidden, Unauthorized
from stream.settings import KeySettings, ServerSettings, load_public_key, load_settings

from .support import AUTH, KEYS, Server

SECRET = "s" * 40
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _auth(public_key_path: Path | None = None, **server) -> Auth:
    public_key = load_public_key(str(public_key_path)) if public_key_path else None
    return Auth((KeySettings(name="ops", key="ops-key-123", publish=("ops.>",)),), ServerSettings(**server), public_key)


def _token(key=SECRET, algorithm="HS256", **claims) -> str:
    """A JWT made now (never at collection time, so a slow run cannot make it expire early)."""
    body = {"sub": "bot", "exp": int(time.time()) + 60, "subscribe": ["news.>"], "publish": ["bots.bot"]} | claims
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def _pem(tmp_path: Path, private) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def _handmade(header: dict, claims: dict, sign) -> str:
    """A JWT assembled by hand, for forgeries PyJWT itself refuses to produce."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{part(orjson.dumps(header))}.{part(orjson.dumps(claims))}"
    return f"{signing_input}.{part(sign(signing_input.encode()))}"


def test_hs256_token_grants_its_claims():
    """A valid HS256 JWT becomes a principal named after sub, with its patterns and expiry."""
    auth = _auth(jwt_secret=SECRET)
    principal = auth.identify(_token())
    assert (principal.kind, principal.name) == ("token", "bot")
    assert principal.subscribe == ("news.>",) and principal.publish == ("bots.bot",)
    assert principal.expires == pytest.approx(time.time() + 60 + LEEWAY, abs=2)
    auth.check_publish(principal, "bots.bot")
    with pytest.raises(Forbidden, match=r"token 'bot' may not publish to 'news\.x'"):
        auth.check_publish(principal, "news.x")
    assert auth.identify("ops-key-123").name == "ops"


BAD_CLAIMS = [
    ({"exp": -LEEWAY - 5}, "token: expired"),
    ({"exp": None}, "no 'exp' claim"),
    ({"sub": None}, "no 'sub' claim"),
    ({"sub": ""}, "claim 'sub' must be a non-empty string"),
    ({"publish": "bots.>"}, "claim 'publish' must be a list of topic patterns"),
    ({"subscribe": ["news..x"]}, "token claim 'subscribe'"),
    ({"nbf": 600}, "not valid yet"),
    ({"aud": "someone-else"}, "set server.jwt_audience to accept it"),
]


@pytest.mark.parametrize(("claims", "message"), BAD_CLAIMS)
def test_bad_claims_are_401_naming_the_problem(claims, message):
    """Each way a token's claims can be wrong is an Unauthorized whose message says which."""
    now = int(time.time())
    timed = {name: now + value if name in ("exp", "nbf") and value is not None else value for name, value in claims.items()}
    with pytest.raises(Unauthorized, match=message):
        _auth(jwt_secret=SECRET).identify(_token(**timed))


def test_clock_skew_within_leeway_is_tolerated():
    """An iat/nbf a few seconds in the future (another machine's clock) is still accepted."""
    assert _auth(jwt_secret=SECRET).identify(_token(nbf=int(time.time()) + 3, iat=int(time.time()) + 3))


def test_bad_signatures_and_garbage_are_401():
    """A token signed with another secret, or not a JWT at all, gets a 401 saying so."""
    auth = _auth(jwt_secret=SECRET)
    with pytest.raises(Unauthorized, match="bad signature"):
        auth.identify(_token(key="x" * 40))
    with pytest.raises(Unauthorized, match="not a known key or a valid JWT"):
        auth.identify("a.b.c")
    with pytest.raises(Unauthorized, match="not a known key or a valid JWT"):
        auth.identify("not-a-key")
    with pytest.raises(Unauthorized, match=r"^token: not a known key$"):
        _auth().identify(_token())  # no JWT settings: only keys are looked up


def test_audience_and_issuer_when_configured():
    """With jwt_audience / jwt_issuer set, tokens must carry them."""
    auth = _auth(jwt_secret=SECRET, jwt_audience="stream", jwt_issuer="https://id.example")
    assert auth.identify(_token(aud=["stream", "other"], iss="https://id.example")).name == "bot"
    with pytest.raises(Unauthorized, match="'aud' does not include 'stream'"):
        auth.identify(_token(aud="other", iss="https://id.example"))
    with pytest.raises(Unauthorized, match="'iss' is not the configured"):
        auth.identify(_token(aud="stream", iss="https://evil.example"))


def test_huge_exp_does_not_crash():
    """With jwt_max_ttl off (0), a signed token whose exp is absurdly far away is accepted with a
    bounded expiry."""
    principal = _auth(jwt_secret=SECRET, jwt_max_ttl=0).identify(_token(exp=10**400))
    assert principal.expires == 4_102_444_800 + LEEWAY


def test_a_jwt_expiring_past_jwt_max_ttl_is_refused():
    """jwt_max_ttl (30 days by default): a token whose exp lies further out, +1000 years
    included, is a 401 that says why; one within it passes."""
    auth = _auth(jwt_secret=SECRET)
    assert auth.identify(_token(exp=int(time.time()) + 29 * 86400)).name == "bot"
    for exp in (int(time.time()) + 31 * 86400, int(time.time()) + 1000 * 366 * 86400, 10**400):
        with pytest.raises(Unauthorized, match="jwt_max_ttl"):
            auth.identify(_token(exp=exp))
    assert _auth(jwt_secret=SECRET, jwt_max_ttl=3600).identify(_token(exp=int(time.time()) + 3000)).name == "bot"


def test_stream_token_refuses_to_mint_past_jwt_max_ttl(tmp_path: Path):
    """`stream token --ttl 60d` with the default jwt_max_ttl (30 days) exits 2 and says so."""
    env = {"STREAM_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "stream", "token", "--ttl", "60d"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2 and "jwt_max_ttl" in done.stderr and not done.stdout, done
    fine = subprocess.run([sys.executable, "-m", "stream", "token", "--ttl", "7d"], capture_output=True, text=True, env=env, timeout=30)
    assert fine.returncode == 0 and fine.stdout.count(".") == 2, fine


@pytest.mark.parametrize(("private", "algorithm"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256")])
def test_public_key_tokens(tmp_path: Path, private, algorithm):
    """jwt_public_key verifies RS256 (RSA key) or ES256 (EC P-256 key) tokens, alone or next to a secret."""
    pem = _pem(tmp_path, private)
    assert _auth(pem).identify(_token(key=private, algorithm=algorithm)).name == "bot"
    both = _auth(pem, jwt_secret=SECRET)
    assert both.identify(_token(key=private, algorithm=algorithm)).name == "bot"
    assert both.identify(_token()).name == "bot"
    with pytest.raises(Unauthorized, match="algorithm 'HS256' is not accepted"):
        _auth(pem).identify(_token())


def test_algorithm_confusion_and_alg_none_are_refused(tmp_path: Path):
    """An HS256 token HMAC'd with the public key's PEM, or an unsigned one, never passes."""
    pem = _pem(tmp_path, RSA_KEY)
    claims = {"sub": "mallory", "exp": int(time.time()) + 60, "publish": [">"]}
    forged = _handmade({"alg": "HS256", "typ": "JWT"}, claims, lambda data: hmac.new(pem.read_bytes(), data, hashlib.sha256).digest())
    unsigned = _handmade({"alg": "none", "typ": "JWT"}, claims, lambda data: b"")
    for auth in (_auth(pem), _auth(pem, jwt_secret=SECRET)):
        for token in (forged, unsigned):
            with pytest.raises(Unauthorized):
                auth.identify(token)


def test_settings_check_jwt_fields(tmp_path: Path):
    """A short or PEM-looking secret (never echoed), an unreadable or non-PEM key file: a line each."""
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("hello")
    config = tmp_path / "c.toml"
    for secret, problem in (("tooshort-secret", "at least 32 characters"), ("-----BEGIN PUBLIC KEY-----xyz", "looks like a PEM key")):
        config.write_text(f'[server]\njwt_secret = "{secret}"\njwt_public_key = "{bad_pem}"\n')
        with pytest.raises(ConfigError) as caught:
            load_settings(config, env={})
        problems = "\n".join(caught.value.problems)
        assert f"server.jwt_secret: {problem}" in problems.replace("expected ", "")
        assert secret not in problems
        assert "server.jwt_public_key: " in problems and "is not a PEM public key" in problems
    from_env = load_settings(None, env={"STREAM_JWT_SECRET": SECRET})
    assert from_env.server.jwt_secret == SECRET and SECRET not in repr(from_env)


def _stream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "stream", *args]
    return subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=30)


def test_stream_token_mints_a_verifiable_jwt():
    """`stream token` signs with the configured secret: the claims are what was asked for."""
    done = _stream("token", "--subscribe", "news.>", "--publish", "bots.a", "--ttl", "15m", "--sub", "b1", env={"STREAM_JWT_SECRET": SECRET})
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "b1" and claims["subscribe"] == ["news.>"] and claims["publish"] == ["bots.a"]
    assert claims["exp"] - claims["iat"] == 900
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(claims["exp"])) in done.stderr
    no_secret = _stream("token", "--publish", "x", env={})
    assert no_secret.returncode == 1 and "jwt_secret" in no_secret.stderr
    for ttl in ("0.5", "nan", "inf", "5x"):
        refused = _stream("token", "--ttl", ttl, env={"STREAM_JWT_SECRET": SECRET})
        assert refused.returncode == 2 and "--ttl" in refused.stderr and "Traceback" not in refused.stderr


@pytest.fixture(scope="module")
def jwt_server():
    with Server("[server]\npublic = []\n" + KEYS, env={"STREAM_JWT_SECRET": SECRET}) as server:
        yield server


async def test_jwt_rights_over_http(jwt_server):
    """Publishing and reading history follow the token's claims: 202 inside, 403 outside, 401 expired."""
    async with httpx.AsyncClient(timeout=10) as client:
        token, _ = mint_token(SECRET, "bot", ["httpjwt.>"], ["httpjwt.bot"], 60)
        headers = {"Authorization": f"Bearer {token}"}
        ok = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "httpjwt.bot", "data": 1}, headers=headers)
        assert ok.status_code == 202
        outside = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "httpjwt.other", "data": 1}, headers=headers)
        assert outside.status_code == 403 and outside.json()["error"]["code"] == "forbidden"
        history = await client.get(f"{jwt_server.url}/api/events?topics=httpjwt.>", headers=headers)
        assert [e["data"] for e in history.json()["events"]] == [1]
        anonymous = await client.get(f"{jwt_server.url}/api/events?topics=httpjwt.>")
        assert anonymous.status_code == 401
        expired = {"Authorization": f"Bearer {_token(exp=int(time.time() - LEEWAY) - 1)}"}
        refused = await client.post(f"{jwt_server.url}/api/publish", json={"topic": "bots.bot", "data": 1}, headers=expired)
        assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]


async def _publish_soon(server: Server, topic: str) -> None:
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{server.url}/api/publish", json={"topic": topic, "data": "before expiry"}, headers=AUTH)
        assert answer.status_code == 202


async def test_expiry_closes_websocket_with_1008(jwt_server):
    """A WebSocket opened with a token that expires keeps working until exp, then gets an error
    frame and close code 1008."""
    expires = int(time.time()) + 3  # when the rights end: exp plus the clock-skew leeway
    token = _token(exp=int(expires - LEEWAY), subscribe=["wsexp.>"])
    async with connect(f"{jwt_server.ws_url}?topics=wsexp.>&token={token}") as ws:
        publishing = asyncio.create_task(_publish_soon(jwt_server, "wsexp.a"))
        frames = []
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                async for frame in ws:
                    frames.append(orjson.loads(frame))
        closed_at = time.time()
        await publishing
        assert ws.close_code == 1008 and ws.close_reason == "token expired"
    assert [f["type"] for f in frames] == ["welcome", "subscribed", "event", "error"]
    assert frames[2]["data"] == "before expiry" and "expired" in frames[-1]["message"]
    assert expires - 0.5 <= closed_at <= expires + 2
    assert "token expired" in jwt_server.output() and token not in jwt_server.output()


async def test_expiry_ends_sse_stream_with_an_error_event(jwt_server):
    """An event stream opened with a token that expires delivers until exp, then ends with
    `event: error` (unauthorized)."""
    expires = int(time.time()) + 3  # when the rights end: exp plus the clock-skew leeway
    token = _token(exp=int(expires - LEEWAY), subscribe=["sseexp.>"])
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{jwt_server.url}/sse?topics=sseexp.>&token={token}") as source:
            publishing = asyncio.create_task(_publish_soon(jwt_server, "sseexp.a"))
            events = [event async for event in source.aiter_sse()]
            ended_at = time.time()
            await publishing
    with_data = [e for e in events if e.data]  # not the retry: and id-only position blocks
    assert [e.event for e in with_data] == ["message", "error"]
    assert orjson.loads(with_data[0].data)["data"] == "before expiry"
    assert orjson.loads(events[-1].data)["error"]["code"] == "unauthorized"
    assert expires - 0.5 <= ended_at <= expires + 2


async def test_subscriber_stops_with_the_reason_when_its_token_expires(jwt_server):
    """stream.client does not retry an expired token forever: it raises, naming the cause."""
    from stream.client import SubscribeError, Subscriber

    async with Subscriber(jwt_server.ws_url, ["news.>"], token=_token(exp=int(time.time() - LEEWAY) + 2)) as sub:
        with pytest.raises(SubscribeError, match="1008 token expired"):
            async with asyncio.timeout(10):
                async for _ in sub:
                    pass
