"""The ``stream`` command: serve and check (tail, publish and token arrive with the clients)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import __version__
from .errors import ConfigError
from .settings import Settings, load_settings

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
    if overrides:
        server_settings = dataclasses.replace(server_settings, **overrides)
        settings = dataclasses.replace(settings, server=server_settings)

    from .app import create_app
    from .logs import configure_logging
    from .server import StreamServer, make_config

    configure_logging(server_settings.log_level, json=server_settings.log_json)
    print(
        f"stream {__version__}: serving on http://{server_settings.host}:{server_settings.port} "
        f"(config: {settings.source}; broker: {server_settings.broker.split('@')[-1]})",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(settings)
    config = make_config(
        app, server_settings.host, server_settings.port, shutdown_timeout=server_settings.shutdown_timeout
    )
    server = StreamServer(config, app.state.runtime)
    server.run()
    return 0 if server.started else 1


def _check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    server = settings.server
    enabled = [p.name for p in settings.providers if p.enabled]
    print(
        f"ok: {settings.source}: listen {server.host}:{server.port}, broker {server.broker.split('@')[-1]}, "
        f"{len(settings.keys)} key(s), {len(settings.providers)} provider(s)"
        + (f" ({', '.join(enabled)})" if enabled else "")
        + f", public {list(server.public)}"
    )
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
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config file; exit 1 with one line per problem")
    check.add_argument("--config", help="TOML config file (default: $STREAM_CONFIG or the built-in config)")
    check.set_defaults(run=_check)

    args = parser.parse_args(argv)
    return args.run(args)
