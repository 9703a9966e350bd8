"""Configuration loading (stream/settings.py): defaults, TOML, environment, and problem reports."""

from __future__ import annotations

import pytest

from stream.errors import ConfigError
from stream.settings import load_settings


def write(tmp_path, text: str):
    path = tmp_path / "stream.toml"
    path.write_text(text)
    return path


def test_built_in_defaults_match_the_spec():
    """With no file, the documented defaults apply."""
    settings = load_settings(None, env={})
    server = settings.server
    assert (server.host, server.port, server.broker) == ("127.0.0.1", 8000, "memory://")
    assert (server.history_size, server.history_ttl, server.max_event_bytes) == (10_000, 3600.0, 65536)
    assert (server.subscriber_buffer, server.sse_heartbeat, server.ws_ping_interval) == (1000, 15.0, 20.0)
    assert server.public == (">",) and settings.keys == ()
    # Hostile clients: every bound an anonymous client meets.
    assert (server.max_head_bytes, server.head_timeout, server.body_timeout, server.keep_alive_timeout) == (65536, 10.0, 30.0, 5.0)
    assert (server.max_connections, server.max_connections_per_client, server.ws_ops_rate, server.ws_ops_burst) == (10_000, 1000, 50.0, 100)
    assert (server.max_topics, server.history_bytes, server.write_stall_timeout) == (100_000, 256 * 1024 * 1024, 30.0)
    assert (server.publish_rate, server.forwarded_allow_ips, server.metrics_public, server.providers_public) == (100.0, (), True, True)


def test_environment_overrides_server_settings(tmp_path):
    """STREAM_<NAME> beats the file; PORT is honoured; 'off' disables a timer."""
    path = write(tmp_path, "[server]\nport = 9000\nhistory_size = 5\n")
    env = {"STREAM_HISTORY_SIZE": "7", "PORT": "5555", "STREAM_SSE_HEARTBEAT": "off", "STREAM_PUBLIC": "news.>,quotes.>"}
    server = load_settings(path, env=env).server
    assert (server.history_size, server.port, server.broker, server.sse_heartbeat) == (7, 5555, "memory://", None)
    assert server.public == ("news.>", "quotes.>")


@pytest.mark.parametrize(
    ("text", "env", "url"),
    [
        ('[server]\nbroker = "redis://h:6379/0"\n', {}, "redis://h:6379/0"),
        ("", {"REDIS_URL": "redis://:pw@h:6379/0"}, "redis://:pw@h:6379/0"),
        ("", {"STREAM_BROKER": "rediss://h"}, "rediss://h"),
        ('[server]\nbroker = "redis://file"\n', {"REDIS_URL": "redis://paas"}, "redis://file"),
    ],
)
def test_a_redis_broker_comes_from_the_file_stream_broker_or_redis_url(tmp_path, text, env, url):
    """broker = redis://… from the file, STREAM_BROKER or (when neither names one) REDIS_URL."""
    assert load_settings(write(tmp_path, text), env=env).server.broker == url


def test_an_unknown_broker_is_refused_without_echoing_its_url(tmp_path):
    """Only memory:// and redis(s):// brokers exist; the URL (it may hold a password) is not shown."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, '[server]\nbroker = "kafka://user:pw@h"\n'), env={})
    [problem] = info.value.problems
    assert problem.startswith("server.broker: expected memory:// or redis://") and "pw" not in problem


def test_keys_read_secrets_from_the_environment(tmp_path):
    """key_env and ${VAR} keep secrets out of the file."""
    path = write(tmp_path, '[[keys]]\nkey_env = "PUB"\npublish = ["news.>"]\n[[keys]]\nname="b"\nkey = "${OTHER}"\n')
    keys = load_settings(path, env={"PUB": "s3cret-value", "OTHER": "another-secret"}).keys
    assert [k.key for k in keys] == ["s3cret-value", "another-secret"]
    assert "s3cret" not in repr(keys)


def test_every_mistake_is_reported_once_with_its_key(tmp_path):
    """Five different mistakes give five problems, each naming its key path."""
    path = write(
        tmp_path,
        """
[server]
port = "eighty"
history_size = 0
bogus = 1
[[keys]]
key = "short"
publish = ["news.>.x"]
[overflow]
"quotes.>" = "explode"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    problems = info.value.problems
    assert len(problems) == 6, problems
    for key in ["server.port", "server.history_size", "server.bogus", "keys[0].key", "keys[0].publish[0]", "overflow."]:
        assert any(problem.startswith(key) for problem in problems), (key, problems)


def test_unreadable_and_invalid_files_are_one_clear_problem(tmp_path):
    """A missing file or broken TOML is reported as such, not as a traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"), env={})


def test_push_providers_fill_the_environment_into_subscribe_and_refuse_settings_of_other_kinds(tmp_path):
    """`${VAR}` inside subscribe's string values (nested too) comes from the environment; an unset
    one, a poll-only setting on a push kind, a push-only setting on a polled kind and a URL of the
    wrong scheme are each one problem naming the key."""
    good = write(
        tmp_path,
        '[[providers]]\nname = "a"\nkind = "websocket"\nurl = "wss://h/x"\n'
        'subscribe = [{ action = "auth", creds = { key = "${K}" } }, "raw ${K}"]\nidle_timeout = 0.5\n',
    )
    [provider] = load_settings(good, env={"K": "k-123456"}).providers
    assert provider.subscribe == ({"action": "auth", "creds": {"key": "k-123456"}}, "raw k-123456")
    assert provider.idle_timeout == 0.5 and provider.push and provider.headlines
    bad = write(
        tmp_path,
        '[[providers]]\nname = "a"\nkind = "websocket"\nurl = "wss://h/x"\nsubscribe = [{ key = "${UNSET}" }]\n'
        '[[providers]]\nname = "b"\nkind = "sse"\nurl = "https://h/s"\ninterval = 5\n'
        '[[providers]]\nname = "c"\nkind = "json"\nurl = "https://h/j"\nidle_timeout = 5\n'
        '[[providers]]\nname = "d"\nkind = "websocket"\nurl = "https://h/w"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_settings(bad, env={})
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("providers[0].subscribe") and "UNSET" in problems[0]
    assert problems[1].startswith("providers[1]") and "interval: not a setting of a sse provider" in problems[1]
    assert problems[2].startswith("providers[2]") and "idle_timeout: only push providers" in problems[2]
    assert problems[3].startswith("providers[3].url") and "ws://" in problems[3]
