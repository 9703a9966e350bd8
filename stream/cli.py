"""The ``stream`` command: serve, check, tail, publish and token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
import time
from typing import Any, Literal

from . import __version__
from .errors import ConfigError
from .logs import announce
from .settings import ServerSettings, Settings, load_settings, unknown_variables

__all__ = ["main"]


def _load(path: str | None) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    server_settings = settings.server
    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.log_json:
        overrides["log_json"] = True
    if args.ssl_certfile is not None:
        overrides["ssl_certfile"] = args.ssl_certfile
    if args.ssl_keyfile is not None:
        overrides["ssl_keyfile"] = args.ssl_keyfile
    if overrides:
        server_settings = server_settings.model_copy(update=overrides)
        settings = settings.model_copy(update={"server": server_settings})

    if args.workers != 1:
        return _serve_workers(args, settings)

    from .app import build
    from .logs import configure_logging
    from .server import StreamServer, make_config

    configure_logging(server_settings.log_level, json=server_settings.log_json)
    tls = _own_tls(server_settings)
    if tls is False:
        return 1
    announce(f"stream {__version__}: starting (config: {settings.source})")
    from .workers import listening_socket

    try:
        # Bound before the app starts: a busy port is one line, not a started-then-stopped app.
        sock = listening_socket(server_settings.host, server_settings.port, shared=args.reuse_port)
    except OSError as exc:
        logging.getLogger("stream").error("cannot listen on %s:%s: %s", server_settings.host, server_settings.port, exc.strerror or exc)
        return 1
    if not args.worker:  # the parent of --workers warned already
        for line in unknown_variables():
            logging.getLogger("stream").warning("%s", line)
    seat = None
    if args.worker:  # one of --workers' processes: its place among them
        from .siblings import Seat

        seat = Seat.parse(args.worker, args.worker_dir)
    service = build(settings, seat, tls)
    server = StreamServer(make_config(service, server_settings.host, server_settings.port), service.runtime, seat.serving if seat else None)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _own_tls(server: ServerSettings) -> ssl.SSLContext | Literal[False] | None:
    """The TLS context of ``ssl_certfile``, None without one; False (said in one line) when the
    files cannot serve: checked before anything listens."""
    from .tls import server_context

    try:
        return server_context(server)
    except ConfigError as exc:
        for problem in exc.problems:
            logging.getLogger("stream").error("config error: %s", problem)
        return False


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    server = settings.server
    if args.workers < 1:
        print(f"stream serve: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    if not server.broker.startswith(("redis://", "rediss://")):
        print(
            f"stream serve: --workers {args.workers} needs the Redis broker (broker = \"redis://…\", STREAM_BROKER or "
            "REDIS_URL): with memory:// each worker would be a separate hub",
            file=sys.stderr,
        )
        return 2
    if server.port == 0:
        print("stream serve: --workers needs a fixed --port (workers share it)", file=sys.stderr)
        return 2
    from .logs import configure_logging
    from .workers import listening_socket, run_workers

    configure_logging(server.log_level, json=server.log_json)  # the parent's own lines, JSON too under --log-json
    if _own_tls(server) is False:
        return 1
    try:
        listening_socket(server.host, server.port, shared=True).close()  # a busy port: one line, before any worker
    except OSError as exc:
        logging.getLogger("stream").error("cannot listen on %s:%s: %s", server.host, server.port, exc.strerror or exc)
        return 1
    for line in unknown_variables():
        logging.getLogger("stream").warning("%s", line)

    passed = ["--config", args.config] if args.config else []
    passed += ["--host", server.host, "--port", str(server.port)] + (["--log-json"] if server.log_json else [])
    for flag, path in (("--ssl-certfile", server.ssl_certfile), ("--ssl-keyfile", server.ssl_keyfile)):
        passed += [flag, path] if path else []
    announce(f"stream {__version__}: {args.workers} workers on {server.host}:{server.port}, broker {server.broker.split('@')[-1]}")
    return run_workers(args.workers, passed, server.shutdown_timeout)


def _check(args: argparse.Namespace) -> int:
    if args.config and args.file and args.config != args.file:
        print("stream check: give the config file once (FILE or --config FILE)", file=sys.stderr)
        return 2
    from .tls import server_context

    try:
        settings = load_settings(args.config or args.file)
        server_context(settings.server)  # the certificate files, as serve will read them
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    for line in unknown_variables():
        print(f"warning: {line}")
    server = settings.server
    enabled = [p.name for p in settings.providers if p.enabled]
    print(
        f"ok: {settings.source}: listen {server.host}:{server.port}, broker {server.broker.split('@')[-1]}, "
        f"{len(settings.keys)} key(s), {len(settings.providers)} provider(s)"
        + (f" ({', '.join(enabled)})" if enabled else "")
        + f", public {list(server.public)}"
    )
    return 0


DEFAULT_URL = "http://127.0.0.1:8000"


def pretty(topic: str, ts: int, data: Any, width: int = 160) -> str:
    """One readable line for an event: headlines and quotes get their own shape."""
    stamp = time.strftime("%H:%M:%S", time.localtime(ts / 1000))
    if isinstance(data, dict) and isinstance(data.get("title"), str):
        symbols = f" [{' '.join(data['symbols'])}]" if data.get("symbols") else ""
        source = f" — {data['source']}" if data.get("source") else ""
        text = f"{data['title']}{symbols}{source}"
    elif isinstance(data, dict) and isinstance(data.get("price"), (int, float)):
        change = data.get("change_pct")
        text = f"{data['price']:,}" + (f" ({change:+.2f}%)" if isinstance(change, (int, float)) else "")
    else:
        import orjson

        text = orjson.dumps(data).decode()
    line = f"{stamp} {topic}  {text}"
    return line if len(line) <= width else line[: width - 1] + "…"


def _tail(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_tail_loop(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


async def _tail_loop(args: argparse.Namespace) -> int:
    import orjson

    from .client import Gap, SubscribeError, Subscriber

    waited = False

    def note(state: str, detail: str) -> None:
        nonlocal waited
        if state == "waiting":
            waited = True
            print(f"stream tail: waiting for the server: {detail}; retrying", file=sys.stderr, flush=True)
        elif state == "reconnecting" and waited and not sub.reconnects:
            print(f"stream tail: still waiting ({detail})", file=sys.stderr, flush=True)
        elif state == "reconnecting" or sub.reconnects or waited:
            print(f"stream tail: {state} ({detail})", file=sys.stderr, flush=True)
            waited = False

    token = args.token or os.environ.get("STREAM_TOKEN")
    sub = Subscriber(args.url, args.patterns, since=args.since, token=token, symbols=args.symbols, on_state=note, wait=True)
    try:
        async with sub:
            async for item in sub:
                if isinstance(item, Gap):
                    print(f"stream tail: gap after {item.after or 'an unknown point'} ({item.reason})", file=sys.stderr, flush=True)
                    if args.json:
                        print(orjson.dumps({"type": "gap", "after": item.after, "reason": item.reason}).decode(), flush=True)
                elif args.json:
                    event = {"id": item.id, "topic": item.topic, "ts": item.ts, "data": item.data}
                    print(orjson.dumps(event).decode(), flush=True)
                else:
                    print(pretty(item.topic, item.ts, item.data), flush=True)
    except SubscribeError as exc:
        print(f"stream tail: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stream tail: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    import httpx
    import orjson

    try:
        data = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        print(f"stream publish: JSON: not valid JSON ({exc})", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("STREAM_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/api/publish", json={"topic": args.topic, "data": data}, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"stream publish: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 202:
        try:
            error = response.json()["error"]
            print(f"stream publish: {response.status_code} {error['code']}: {error['message']}", file=sys.stderr)
        except (ValueError, KeyError, TypeError):
            print(f"stream publish: HTTP {response.status_code}", file=sys.stderr)
        return 1
    print(response.json()["ids"][0])
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` as seconds (argparse type for --ttl)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 1h or 7d, got {text!r}") from None
    if not 1 <= seconds <= 10 * 365 * 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected between 1 second and 10 years, got {text!r}")
    return seconds


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_token
    from .errors import BadTopic
    from .topics import validate_pattern

    settings = _load(args.config)
    if settings is None:
        return 1
    secret = settings.server.jwt_secret
    if not secret:
        print("stream token: no server.jwt_secret in the config (or $STREAM_JWT_SECRET) to sign with", file=sys.stderr)
        return 1
    limit = settings.server.jwt_max_ttl
    if limit and args.ttl > limit:
        print(f"stream token: --ttl {args.ttl:g} s is over the server's jwt_max_ttl ({limit:g} s), which would refuse it", file=sys.stderr)
        return 2
    try:
        for option in ("subscribe", "publish"):
            for pattern in getattr(args, option):
                validate_pattern(pattern, f"--{option}")
    except BadTopic as exc:
        print(f"stream token: {exc.message}", file=sys.stderr)
        return 2
    token, expires = mint_token(secret, args.sub, args.subscribe, args.publish, args.ttl)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    print(f"stream token: for {args.sub!r}, subscribe {args.subscribe}, publish {args.publish}, expires {when}", file=sys.stderr)
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream", description="Real-time push service.")
    parser.add_argument("--version", action="version", version=f"stream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML config file (default: $STREAM_CONFIG or the built-in demo config)")
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port and $PORT)")
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.add_argument("--ssl-certfile", help="PEM certificate chain: serve https:// and wss:// (overrides [server] ssl_certfile)")
    serve.add_argument("--ssl-keyfile", help="its PEM private key (overrides [server] ssl_keyfile)")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port, each a node of the hub (needs the Redis broker)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by --workers for its workers
    serve.add_argument("--worker", help=argparse.SUPPRESS)  # "<index>/<count>", set by --workers
    serve.add_argument("--worker-dir", help=argparse.SUPPRESS)  # what the workers share, made by --workers
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config file; exit 1 with one line per problem")
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML config file (same as --config)")
    check.add_argument("--config", help="TOML config file (default: $STREAM_CONFIG or the built-in config)")
    check.set_defaults(run=_check)

    url = os.environ.get("STREAM_URL", DEFAULT_URL)
    tail = commands.add_parser("tail", help="print events as they arrive, reconnecting and resuming by itself")
    tail.add_argument("patterns", nargs="+", metavar="PATTERN", help="topic patterns, e.g. 'news.>' quotes.AAPL")
    tail.add_argument("--url", default=url, help=f"server URL (default: $STREAM_URL or {DEFAULT_URL})")
    tail.add_argument("--since", help="start after this event id, or at a time: 2026-11-25T10:00:00Z, -10m")
    tail.add_argument("--symbols", type=lambda text: [s for s in text.split(",") if s], help="only events about these symbols: AAPL,MSFT")
    tail.add_argument("--json", action="store_true", help="one JSON object per line instead of a readable line")
    tail.add_argument("--token", help="key or token (default: $STREAM_TOKEN)")
    tail.set_defaults(run=_tail)

    publish = commands.add_parser("publish", help="publish one event; prints its id")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("json", metavar="JSON", help="the event data, as JSON")
    publish.add_argument("--url", default=url, help=f"server URL (default: $STREAM_URL or {DEFAULT_URL})")
    publish.add_argument("--token", help="a key with publish rights (default: $STREAM_TOKEN)")
    publish.set_defaults(run=_publish)

    token = commands.add_parser("token", help="mint an HS256 JWT with the configured jwt_secret; prints it")
    token.add_argument("--subscribe", action="append", default=[], metavar="PATTERN", help="may subscribe to (repeatable)")
    token.add_argument("--publish", action="append", default=[], metavar="PATTERN", help="may publish to (repeatable)")
    token.add_argument("--ttl", type=duration, default=3600.0, help="lifetime: 90s, 15m, 1h (default), 7d")
    token.add_argument("--sub", default="cli", help="the subject (who the token is for; default: cli)")
    token.add_argument("--config", help="TOML config file holding server.jwt_secret (or set $STREAM_JWT_SECRET)")
    token.set_defaults(run=_token)

    args = parser.parse_args(_glue_dashed_values(sys.argv[1:] if argv is None else argv))
    return args.run(args)


# Options whose value may start with a dash (``--since -10m``), which argparse would otherwise
# read as an unknown option.
_DASHED_VALUES = ("--since",)


def _glue_dashed_values(argv: list[str]) -> list[str]:
    glued: list[str] = []
    items = iter(argv)
    for item in items:
        if item in _DASHED_VALUES:
            value = next(items, None)
            glued.append(item if value is None else f"{item}={value}")
        else:
            glued.append(item)
    return glued
