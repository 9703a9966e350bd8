"""Settings: one TOML file plus ``STREAM_*`` environment overrides, read once into frozen values.

This is the only module that reads ``os.environ`` (it is handed a mapping; the CLI passes the
real environment). Every mistake is collected and reported with its key path, so
``stream check`` can print one line per problem.

Timings are in seconds unless the name says otherwise; ``None`` (``"off"`` in the environment)
switches a timer off.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import BadTopic, ConfigError
from .provider_settings import ProviderSettings, read_providers
from .topics import validate_pattern

__all__ = ["KeySettings", "ProviderSettings", "PublicKey", "ServerSettings", "Settings", "load_public_key", "load_settings"]

POLICIES = ("disconnect", "drop", "conflate")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    broker: str = "memory://"
    history_size: int = 10_000  # events kept for replay, across all topics
    history_ttl: float | None = 3600.0  # seconds an event stays in history
    max_event_bytes: int = 64 * 1024  # one event's data, JSON-encoded
    max_batch_bytes: int = 1024 * 1024  # one POST /api/publish body
    max_batch_events: int = 100
    subscriber_buffer: int = 1000  # events waiting for one slow subscriber
    max_patterns: int = 100  # per connection
    max_frame_bytes: int = 64 * 1024  # largest WebSocket message a client may send
    max_connections: int = 10_000  # client sockets of every kind (HTTP, long-poll, SSE, WebSocket), whole process
    max_connections_per_client: int = 1000  # the same, from one client address
    fd_margin: int = 100  # file descriptors kept for the server itself below `ulimit -n`
    max_head_bytes: int = 64 * 1024  # request line + headers; larger gets 431
    head_timeout: float | None = 10.0  # seconds for a request head to arrive, from the socket's first byte or its opening
    body_timeout: float | None = 30.0  # seconds a request body may go without a byte before the socket is closed
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive socket is kept (uvicorn's timeout_keep_alive)
    write_stall_timeout: float | None = 30.0  # seconds a socket may accept no bytes of waiting output before it is closed
    max_topics: int = 100_000  # topics with a retained value; a publish creating one more gets 507
    history_bytes: int = 256 * 1024 * 1024  # memory history may hold, every copy of an event counted
    forwarded_allow_ips: tuple[str, ...] = ()  # proxies whose X-Forwarded-For is believed; none by default
    metrics_public: bool = True  # false: /metrics needs a valid key or token
    providers_public: bool = True  # false: /api/providers needs a valid key or token
    ws_ops_rate: float = 50.0  # client ops per second per WebSocket connection
    ws_ops_burst: int = 100  # ops a connection may send at once before the rate applies
    ws_ops_rate_per_client: float = 500.0  # op work per second all WebSocket connections of one address share (an op costs 1, a (un)subscribe 1 per pattern)
    ws_ops_burst_per_client: int = 2000  # op work one address may do at once before its connections are read slower
    publish_rate: float = 100.0  # events per second one key may publish (HTTP and WebSocket together)
    publish_burst: int = 100  # events one key may publish at once before the rate applies
    sse_heartbeat: float | None = 15.0  # seconds between ": ping" comments
    sse_retry: int = 3000  # milliseconds, the reconnect delay advertised to EventSource
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    socket_send_buffer: int | None = 128 * 1024  # SO_SNDBUF per streaming socket; None = kernel autotuning
    close_timeout: float = 5.0  # seconds a closing client gets to drain its close frame
    shutdown_timeout: float = 8.0  # seconds SIGTERM waits for connections before cancelling
    public: tuple[str, ...] = (">",)  # patterns anyone may subscribe to
    jwt_secret: str | None = field(default=None, repr=False)  # HS256 tokens; best set as STREAM_JWT_SECRET
    jwt_public_key: str | None = None  # path to a PEM public key: RS256 (RSA) or ES256 (EC P-256) tokens
    jwt_audience: str | None = None  # when set, JWTs must carry it in "aud"; when not, JWTs with "aud" are refused
    jwt_issuer: str | None = None  # when set, JWTs must carry it as "iss"
    allowed_origins: tuple[str, ...] = ("*",)  # Origin values accepted on /ws and /sse; "*" = any
    log_level: str = "info"
    log_json: bool = False


@dataclass(frozen=True)
class KeySettings:
    name: str
    key: str = field(repr=False)
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    max_connections: int | None = None
    publish_rate: float | None = None  # None: [server] publish_rate
    publish_burst: int | None = None  # None: [server] publish_burst


@dataclass(frozen=True)
class PublicKey:
    """The key that verifies RS256 / ES256 JWTs, read once from ``jwt_public_key``."""

    key: Any = field(repr=False)
    algorithm: str  # "RS256" or "ES256"


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    keys: tuple[KeySettings, ...] = ()
    jwt_public_key: PublicKey | None = None
    overflow: tuple[tuple[str, str], ...] = ()  # (pattern, policy), first match wins
    providers: tuple[ProviderSettings, ...] = ()
    source: str = "built-in defaults"


_SERVER_FIELDS = {f.name: f for f in fields(ServerSettings)}
_ENV_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or ``$STREAM_CONFIG``, or the built-in config) and apply the environment."""
    env = os.environ if env is None else env
    problems: list[str] = []
    chosen = path or env.get("STREAM_CONFIG")
    if chosen:
        source = str(chosen)
        try:
            text = Path(chosen).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"config: cannot read {source}: {exc.strerror or exc}"]) from None
    else:
        source = "built-in default config"
        text = resources.files("stream").joinpath("default.toml").read_text(encoding="utf-8")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {source} is not valid TOML: {exc}"]) from None

    for key in document:
        if key not in ("server", "keys", "overflow", "providers"):
            problems.append(f"{key}: unknown section (expected server, keys, overflow, providers)")
    server = _server(document.get("server", {}), env, problems)
    public_key = None
    if server.jwt_public_key is not None:
        try:
            public_key = load_public_key(server.jwt_public_key)
        except ValueError as exc:
            problems.append(f"server.jwt_public_key: {exc}")
    keys = _keys(document.get("keys", []), env, problems)
    overflow = _overflow(document.get("overflow", {}), problems)
    providers = read_providers(document.get("providers", []), env, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(
        server=server, keys=keys, jwt_public_key=public_key, overflow=overflow, providers=providers, source=source
    )


def _server(table: Any, env: Mapping[str, str], problems: list[str]) -> ServerSettings:
    if not isinstance(table, dict):
        problems.append("server: expected a table ([server])")
        return ServerSettings()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _SERVER_FIELDS:
            problems.append(f"server.{key}: unknown setting")
            continue
        values[key] = value
    for name in _SERVER_FIELDS:
        raw = env.get(f"STREAM_{name.upper()}")
        if raw is not None:
            values[name] = _from_env(name, raw)
    if "broker" not in table and "STREAM_BROKER" not in env and env.get("REDIS_URL"):
        values["broker"] = env["REDIS_URL"]
    if env.get("PORT") and "STREAM_PORT" not in env:
        values["port"] = env["PORT"]
    checked: dict[str, Any] = {}
    for name, value in values.items():
        result = _check(f"server.{name}", str(_SERVER_FIELDS[name].type), value, problems)
        if result is not _INVALID:
            checked[name] = result
    settings = ServerSettings(**checked)
    _check_ranges(settings, checked, problems)
    return settings


def _from_env(name: str, raw: str) -> Any:
    kind = _SERVER_FIELDS[name].type
    if "tuple" in kind:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if "None" in kind and raw.strip().lower() in ("off", "none", ""):
        return None
    if "bool" in kind:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw


_INVALID = object()


def _check(key: str, kind: str, value: Any, problems: list[str]) -> Any:
    """Coerce ``value`` to the declared type (as written in the dataclass), or note a problem."""
    if value is None:
        if "None" in kind:
            return None
        problems.append(f"{key}: must be set (cannot be off)")
        return _INVALID
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "int":
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if base.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ValueError
            return tuple(value)
    except (TypeError, ValueError):
        pass
    expected = {"bool": "true or false", "int": "an integer", "float": "a number of seconds", "str": "a string"}
    shown = "a secret (not shown)" if key.endswith("secret") else repr(value)
    problems.append(f"{key}: expected {expected.get(base, 'a list of strings')}, got {shown}")
    return _INVALID


def _check_ranges(s: ServerSettings, given: dict[str, Any], problems: list[str]) -> None:
    def need(name: str, ok: bool, what: str) -> None:
        if name in given and not ok:
            problems.append(f"server.{name}: {what}, got {given[name]!r}")

    need("port", 0 <= s.port <= 65535, "expected a TCP port 0-65535")
    for name in ("history_size", "max_event_bytes", "max_batch_bytes", "max_batch_events", "subscriber_buffer"):
        need(name, getattr(s, name) >= 1, "must be at least 1")
    need("ws_ops_rate", s.ws_ops_rate > 0, "must be a positive number of ops per second")
    need("ws_ops_rate_per_client", s.ws_ops_rate_per_client > 0, "must be a positive number of ops per second")
    need("ws_ops_burst_per_client", s.ws_ops_burst_per_client >= 1, "must be at least 1")
    need("publish_rate", s.publish_rate > 0, "must be a positive number of events per second")
    need("publish_burst", s.publish_burst >= 1, "must be at least 1")
    need("max_topics", s.max_topics >= 1, "must be at least 1")
    need("max_head_bytes", s.max_head_bytes >= 1024, "must be at least 1024 bytes")
    need("history_bytes", s.history_bytes >= 1024 * 1024, "must be at least 1048576 bytes (1 MiB)")
    need("fd_margin", s.fd_margin >= 10, "must be at least 10 file descriptors")
    need("keep_alive_timeout", s.keep_alive_timeout > 0, "must be a positive number of seconds")
    for name in ("max_patterns", "max_frame_bytes", "max_connections", "max_connections_per_client", "ws_ops_burst"):
        need(name, getattr(s, name) >= 1, "must be at least 1")
    for name in (
        "history_ttl",
        "sse_heartbeat",
        "ws_ping_interval",
        "ws_ping_timeout",
        "head_timeout",
        "body_timeout",
        "write_stall_timeout",
    ):
        value = getattr(s, name)
        need(name, value is None or value > 0, "must be a positive number of seconds, or off")
    need("socket_send_buffer", s.socket_send_buffer is None or s.socket_send_buffer >= 4096, "must be at least 4096 bytes, or off")
    need("close_timeout", s.close_timeout > 0, "must be a positive number of seconds")
    need("shutdown_timeout", s.shutdown_timeout > 0, "must be a positive number of seconds")
    need("sse_retry", s.sse_retry >= 0, "must be milliseconds >= 0")
    if "broker" in given and s.broker.startswith(("redis://", "rediss://")):
        # Accepting it would run separate in-memory hubs that only look like one cluster.
        problems.append(
            "server.broker: the Redis broker is not available in this version; use memory:// "
            "(set by broker, STREAM_BROKER or REDIS_URL)"
        )
    elif "broker" in given and not s.broker.startswith("memory://"):
        # Never echo the URL: it may carry a password.
        problems.append(f"server.broker: expected memory:// or redis://…, got a {s.broker.split(':', 1)[0]!r} URL")
    need("log_level", s.log_level.lower() in ("debug", "info", "warning", "error"), "expected debug|info|warning|error")
    if "jwt_secret" in given and s.jwt_secret is not None:  # never echo it
        if s.jwt_secret.lstrip().startswith("-----BEGIN"):
            problems.append("server.jwt_secret: looks like a PEM key; put a public key's path in server.jwt_public_key")
        elif len(s.jwt_secret) < 32:
            problems.append("server.jwt_secret: expected at least 32 characters for HS256")
    for index, pattern in enumerate(s.public):
        try:
            validate_pattern(pattern, f"server.public[{index}]")
        except BadTopic as exc:
            problems.append(exc.message)


def load_public_key(path: str) -> PublicKey:
    """The RS256/ES256 verifying key in the PEM file at ``path``; ValueError says what is wrong."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise ValueError(f"{path} is not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if isinstance(key, rsa.RSAPublicKey):
        return PublicKey(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return PublicKey(key, "ES256")
    raise ValueError(f"{path}: expected an RSA (RS256) or EC P-256 (ES256) public key")


def _keys(items: Any, env: Mapping[str, str], problems: list[str]) -> tuple[KeySettings, ...]:
    if not isinstance(items, list):
        problems.append("keys: expected an array of tables ([[keys]])")
        return ()
    keys = []
    for index, item in enumerate(items):
        where = f"keys[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table")
            continue
        for name in item:
            if name not in ("name", "key", "key_env", "subscribe", "publish", "max_connections", "publish_rate", "publish_burst"):
                problems.append(f"{where}.{name}: unknown setting")
        secret = item.get("key")
        if "key_env" in item:
            variable = item["key_env"]
            secret = env.get(variable) if isinstance(variable, str) else None
            if not secret:
                problems.append(f"{where}.key_env: environment variable {variable!r} is not set or empty")
        elif isinstance(secret, str) and _ENV_NAME.fullmatch(secret):
            variable = _ENV_NAME.fullmatch(secret).group(1)  # type: ignore[union-attr]
            secret = env.get(variable)
            if not secret:
                problems.append(f"{where}.key: environment variable {variable!r} is not set or empty")
        elif not isinstance(secret, str) or len(secret) < 8:
            problems.append(f"{where}.key: expected a secret string of at least 8 characters (or key_env)")
        lists = {}
        for name in ("subscribe", "publish"):
            value = _check(f"{where}.{name}", "tuple[str, ...]", item.get(name, []), problems)
            lists[name] = () if value is _INVALID else value
            for position, pattern in enumerate(lists[name]):
                try:
                    validate_pattern(pattern, f"{where}.{name}[{position}]")
                except BadTopic as exc:
                    problems.append(exc.message)
        limit = item.get("max_connections")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            problems.append(f"{where}.max_connections: expected a positive integer, got {limit!r}")
            limit = None
        rate = item.get("publish_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
            problems.append(f"{where}.publish_rate: expected a positive number of events per second, got {rate!r}")
            rate = None
        burst = item.get("publish_burst")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            problems.append(f"{where}.publish_burst: expected a positive integer, got {burst!r}")
            burst = None
        name = item.get("name", f"key{index}")
        if not isinstance(name, str):
            problems.append(f"{where}.name: expected a string")
            name = f"key{index}"
        if isinstance(secret, str) and secret:
            keys.append(
                KeySettings(
                    name,
                    secret,
                    lists["subscribe"],
                    lists["publish"],
                    limit,
                    None if rate is None else float(rate),
                    burst,
                )
            )
    return tuple(keys)


def _overflow(table: Any, problems: list[str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, dict):
        problems.append('overflow: expected a table of pattern = policy ("disconnect", "drop" or "conflate")')
        return ()
    rules = []
    for pattern, policy in table.items():
        try:
            validate_pattern(pattern, f"overflow.{pattern!r}")
        except BadTopic as exc:
            problems.append(exc.message)
            continue
        if policy not in POLICIES:
            problems.append(f"overflow.{pattern!r}: expected one of {', '.join(POLICIES)}, got {policy!r}")
            continue
        rules.append((pattern, policy))
    return tuple(rules)
