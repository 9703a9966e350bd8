"""Settings: one TOML file plus ``STREAM_*`` environment overrides, read once into frozen values.

This is the only module that reads ``os.environ`` (it is handed a mapping; the CLI passes the real
environment). ``STREAM_CONFIG`` names the file; ``STREAM_<NAME>`` sets a ``[server]`` setting over
it (lists comma-separated, booleans 1/true/yes/on or 0/false/no/off); ``PORT`` (PaaS) sets the port
unless ``STREAM_PORT`` does, and ``REDIS_URL`` the broker unless the file or ``STREAM_BROKER`` does.
Secrets stay out of the file: ``key_env = "VAR"``, or ``${VAR}`` in a key or a provider's header
and parameter values. Every mistake is reported with its key path, one line each (``stream check``).

Timings are in seconds unless the name says otherwise; ``None`` (``"off"``) switches a timer off.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasPath, BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .provider_settings import (
    Frozen,
    Overflow,
    Pattern,
    Providers,
    ProviderSettings,
    Secret,
    environment_values,
    fill_secrets,
    problem_lines,
)

__all__ = ["KeySettings", "ProviderSettings", "PublicKey", "ServerSettings", "Settings", "load_public_key", "load_settings", "unknown_variables"]

# A setting that may be off, and a list, as the environment writes them: "off" (or "none", or nothing) and "a,b".
Off = BeforeValidator(lambda value: None if isinstance(value, str) and value.strip().lower() in ("off", "none", "") else value)
Commas = BeforeValidator(lambda value: [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value)
AtLeast1 = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0)]  # seconds, or a rate per second
Timer = Annotated[Positive | None, Off]  # seconds; None switches it off
TextOrOff = Annotated[str | None, Off]


class ServerSettings(Frozen):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    history_size: AtLeast1 = 10_000  # events kept for replay, across all topics
    history_ttl: Timer = 3600.0  # seconds an event stays in history
    max_event_bytes: AtLeast1 = 64 * 1024  # one event's data, JSON-encoded
    max_batch_bytes: AtLeast1 = 1024 * 1024  # one POST /api/publish body
    max_batch_events: AtLeast1 = 100
    subscriber_buffer: AtLeast1 = 1000  # events waiting for one slow subscriber
    max_patterns: AtLeast1 = 100  # per connection
    max_frame_bytes: AtLeast1 = 64 * 1024  # largest WebSocket message a client may send
    max_connections: AtLeast1 = 10_000  # client sockets of every kind (HTTP, long-poll, SSE, WebSocket), whole process
    max_connections_per_client: AtLeast1 = 1000  # the same, from one client address (an IPv6 client: its /ipv6_prefix)
    ipv6_prefix: Annotated[int, Field(ge=16, le=128)] = 64  # IPv6 addresses count per-address limits by this prefix (one client owns a /64)
    fd_margin: Annotated[int, Field(ge=10)] = 100  # file descriptors kept for the server itself below `ulimit -n`
    max_head_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024  # request line + headers; larger gets 431
    head_timeout: Timer = 10.0  # seconds for a request head to arrive, from the socket's first byte or its opening
    body_timeout: Timer = 30.0  # seconds a request body may go without a byte before the socket is closed
    keep_alive_timeout: Positive = 5.0  # seconds an idle keep-alive socket is kept (uvicorn's timeout_keep_alive)
    write_delay: Annotated[float, Field(ge=0, le=1)] = 0.005  # under load, seconds (at least) events are held after a fan-out to share one write per socket; 0 = off
    write_load: Annotated[float, Field(ge=0)] = 0.8  # holding starts when, 3 events in a row, the last writes took CPU for this share of the time since the event before; 0 = always
    write_stall_timeout: Timer = 30.0  # seconds a socket may accept no bytes of waiting output before it is closed
    max_topics: AtLeast1 = 100_000  # topics with a retained value; a publish creating one more gets 507
    history_bytes: Annotated[int, Field(ge=1024 * 1024)] = 256 * 1024 * 1024  # memory history may hold, every copy of an event counted
    ssl_certfile: TextOrOff = None  # PEM certificate chain: serve https:// and wss:// without a proxy in front
    ssl_keyfile: TextOrOff = None  # its private key (PEM), unless ssl_certfile holds it too
    ssl_handshake_timeout: Positive = 10.0  # seconds a TLS handshake may take from accept
    forwarded_allow_ips: Annotated[tuple[str, ...], Commas] = ()  # proxies whose X-Forwarded-For is believed; none by default
    metrics_public: bool = True  # false: /metrics needs a valid key or token
    providers_public: bool = True  # false: /api/providers needs a valid key or token
    ws_ops_rate: Positive = 50.0  # client ops per second per WebSocket connection
    ws_ops_burst: AtLeast1 = 100  # ops a connection may send at once before the rate applies
    ws_ops_rate_per_client: Positive = 500.0  # op work per second all WebSocket connections of one address share (an op costs 1, a (un)subscribe 1 per pattern)
    ws_ops_burst_per_client: AtLeast1 = 2000  # op work one address may do at once before its connections are read slower
    publish_rate: Positive = 100.0  # events per second one key may publish (HTTP and WebSocket together)
    publish_burst: AtLeast1 = 100  # events one key may publish at once before the rate applies
    sse_heartbeat: Timer = 15.0  # seconds between ": ping" comments
    sse_retry: Annotated[int, Field(ge=0)] = 3000  # milliseconds, the reconnect delay advertised to EventSource
    ws_ping_interval: Timer = 20.0
    ws_ping_timeout: Timer = 20.0
    socket_send_buffer: Annotated[Annotated[int, Field(ge=4096)] | None, Off] = 128 * 1024  # SO_SNDBUF per streaming socket; None = kernel autotuning
    close_timeout: Positive = 5.0  # seconds a closing client gets to drain its close frame
    shutdown_timeout: Positive = 8.0  # seconds SIGTERM waits for connections before cancelling
    broker: str = "memory://"  # memory:// (one process) or redis://… / rediss://… (one hub over many processes)
    lease_ttl: Annotated[float, Field(ge=1)] = 10.0  # seconds a provider lease lasts unrenewed (Redis; renewed every third)
    redis_timeout: Annotated[float, Field(ge=0.05, le=10)] = 1.0  # seconds any one Redis command (or wait for a connection) may take
    public: Annotated[tuple[Pattern, ...], Commas] = (">",)  # patterns anyone may subscribe to
    jwt_secret: TextOrOff = Field(default=None, repr=False)  # HS256 tokens; best set as STREAM_JWT_SECRET
    jwt_public_key: TextOrOff = None  # path to a PEM public key: RS256 (RSA) or ES256 (EC P-256) tokens
    jwt_audience: TextOrOff = None  # when set, JWTs must carry it in "aud"; when not, JWTs with "aud" are refused
    jwt_issuer: TextOrOff = None  # when set, JWTs must carry it as "iss"
    jwt_max_ttl: Annotated[float, Field(ge=0)] = 30 * 86400.0  # seconds: a JWT whose exp lies further out is refused (0 = no bound)
    allowed_origins: Annotated[tuple[str, ...], Commas] = ("*",)  # Origin values accepted on /ws and /sse; "*" = any
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = "info"
    log_json: bool = False

    @field_validator("broker")
    @classmethod
    def _known_broker(cls, broker: str) -> str:
        if not broker.startswith(("memory://", "redis://", "rediss://")):  # never echo the URL: it may carry a password
            raise ValueError(f"expected memory:// or redis://…, got a {broker.split(':', 1)[0]!r} URL")
        return broker

    @field_validator("jwt_secret")
    @classmethod
    def _hs256_secret(cls, secret: str | None) -> str | None:
        if secret and secret.lstrip().startswith("-----BEGIN"):
            raise ValueError("looks like a PEM key; put a public key's path in server.jwt_public_key")
        if secret and len(secret) < 32:
            raise ValueError("expected at least 32 characters for HS256")
        return secret


class KeySettings(Frozen):
    name: str
    key: Secret = Field(repr=False)
    subscribe: tuple[Pattern, ...] = ()
    publish: tuple[Pattern, ...] = ()
    max_connections: AtLeast1 | None = None
    publish_rate: Positive | None = None  # None: [server] publish_rate
    publish_burst: AtLeast1 | None = None  # None: [server] publish_burst

    @field_validator("key")
    @classmethod
    def _long_enough(cls, key: str) -> str:
        if len(key) < 8:
            raise ValueError("expected a secret string of at least 8 characters (or key_env)")
        return key


class PublicKey(Frozen):
    """The key that verifies RS256 / ES256 JWTs, read once from ``jwt_public_key``."""

    key: Any = Field(repr=False)
    algorithm: Literal["RS256", "ES256"]


class Settings(BaseSettings):
    """``Settings()`` is the built-in defaults; ``load_settings`` reads a file and an environment into one."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=False, case_sensitive=True, env_prefix="STREAM_")

    server: ServerSettings = ServerSettings()
    keys: tuple[KeySettings, ...] = ()
    overflow: Overflow = ()
    providers: Providers = ()
    # Loaded while the rest is checked, so that a bad key file is reported with the other problems.
    jwt_public_key: Annotated[PublicKey | None, BeforeValidator(lambda path: load_public_key(path) if isinstance(path, str) else None)] = Field(
        default=None, validation_alias=AliasPath("server", "jwt_public_key")
    )
    source: str = "built-in defaults"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, *_: Any, **__: Any) -> tuple[Any, ...]:
        return (init_settings,)  # neither os.environ nor a file: load_settings passes those in


PROVIDER_SECRETS = ("headers", "params", "subscribe")  # where a provider's ${VAR} secrets may be


def _config_file(file: Path | Traversable, env: Mapping[str, str]) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The TOML file, read once even when it is a pipe (``--config /dev/stdin``: pydantic-settings'
    TOML source skips what is not a regular file and so served the defaults), with the secrets
    it names filled from ``env``. A ``[[keys]]`` table without a name is named by its position
    (key0, key1, …); ``key_env = "VAR"`` means ``key = "${VAR}"``. Also, per provider, the values
    filled in (its secrets)."""
    with file.open("rb") as handle:
        document = tomllib.load(handle)
    if isinstance(keys := document.get("keys"), list):
        document["keys"] = fill_secrets([_named_key(index, table) for index, table in enumerate(keys)], ("key",), env)
    tables = document.get("providers")
    filled = [environment_values(table, PROVIDER_SECRETS, env) for table in tables] if isinstance(tables, list) else []
    if "providers" in document:
        document["providers"] = fill_secrets(document["providers"], PROVIDER_SECRETS, env)
    return document, filled


def _named_key(index: int, table: Any) -> Any:
    if isinstance(table, dict) and "key_env" in table:
        table = {name: value for name, value in table.items() if name != "key_env"} | {"key": f"${{{table['key_env']}}}"}
    return {"name": f"key{index}"} | table if isinstance(table, dict) else table


class _Environment(EnvSettingsSource):
    """``STREAM_<NAME>`` for each ``[server]`` setting, read from ``env`` rather than ``os.environ``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(Settings, case_sensitive=False)
        self.env_vars = {name.lower(): value for name, value in env.items()}

    def __call__(self) -> dict[str, Any]:
        found = {name: self.get_field_value(field, name)[0] for name, field in ServerSettings.model_fields.items()}
        return {name: value for name, value in found.items() if value is not None}


# Read by the CLI rather than the config: never "unknown".
CLI_VARIABLES = frozenset({"STREAM_CONFIG", "STREAM_URL", "STREAM_TOKEN", "STREAM_JWT_SECRET"})


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per ``STREAM_*`` variable that is neither a ``[server]`` setting nor one the CLI
    reads, naming the closest setting: a typo (``STREAM_PROT=9``) is otherwise silently ignored."""
    env = os.environ if env is None else env
    known = {f"STREAM_{name.upper()}" for name in ServerSettings.model_fields} | CLI_VARIABLES
    lines = []
    for name in sorted(env):
        if name.upper().startswith("STREAM_") and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"environment variable {name} is not a setting of stream and is ignored{hint}")
    return lines


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or ``$STREAM_CONFIG``, or the built-in config) and apply the environment."""
    env = os.environ if env is None else env
    chosen = path or env.get("STREAM_CONFIG")
    source = str(chosen) if chosen else "built-in default config"
    try:
        document, filled = _config_file(Path(chosen) if chosen else resources.files("stream").joinpath("default.toml"), env)
    except OSError as exc:
        raise ConfigError([f"config: cannot read {source}: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {source} is not valid TOML: {exc}"]) from None
    server = document.get("server", {})
    if isinstance(server, dict):  # REDIS_URL, then the file, then PORT, then STREAM_<NAME>
        redis, paas = ({"broker": env["REDIS_URL"]} if env.get("REDIS_URL") else {}), ({"port": env["PORT"]} if env.get("PORT") else {})
        document["server"] = redis | server | paas | _Environment(env)()
    try:
        settings = Settings(**document | {"source": source})
    except ValidationError as exc:
        raise ConfigError(problem_lines(exc)) from None
    for provider, values in zip(settings.providers, filled, strict=False):
        provider._filled = values  # what filling put in: the secrets no message may show
    return settings


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
        return PublicKey(key=key, algorithm="RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return PublicKey(key=key, algorithm="ES256")
    raise ValueError(f"{path}: expected an RSA (RS256) or EC P-256 (ES256) public key")
