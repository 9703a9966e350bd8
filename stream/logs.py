"""Logging set-up: one line per notable event, plain or JSON, with secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import IO
from urllib.parse import unquote_plus

import orjson

from .uvicorn_seam import access_log_path

__all__ = ["announce", "configure_logging", "redact"]

# A query parameter: its name (any encoding) and its value.
_QUERY_PAIR = re.compile(r"(?P<name>(?:^|(?<=[?&;\s]))[^=&;\s?\"]+)=(?P<value>[^&;\s\"]*)")
_SECRET_NAMES = frozenset({"token", "key", "api_key", "apikey", "access_token"})
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=%-]+", re.IGNORECASE)


def _hide(match: re.Match[str]) -> str:
    name = match.group("name")
    decoded = name
    for _ in range(3):  # %2574oken is %74oken once decoded: decode until it stops changing
        decoded, previous = unquote_plus(decoded), decoded
        if decoded == previous:
            break
    if decoded.strip().lower() in _SECRET_NAMES and match.group("value"):
        return f"{name}=***"
    return match.group(0)


def redact(text: str) -> str:
    """Hide secrets in query strings however their names are encoded (``%74oken=``), and
    Authorization values."""
    if "=" in text:
        text = _QUERY_PAIR.sub(_hide, text)
    return _BEARER.sub(r"\1***", text)


class _Redacting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _QuietDemo(logging.Filter):
    """The demo providers poll this process every second or two: keep that out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = access_log_path(record)
        return not (path is not None and path.startswith("/demo/"))


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


_as_json = False  # configure_logging(json=True) was called: every line of the process is JSON


def announce(line: str, *, logger: str = "stream", out: IO[str] | None = None) -> None:
    """A line every run shows whatever the log level (starting, serving on, workers coming and
    going): plain on stderr, or under ``--log-json`` a JSON object like every log line."""
    stream = out or sys.stderr
    if _as_json:
        record = logging.LogRecord(logger, logging.INFO, __file__, 0, line, None, None)
        stream.write(_JSONFormatter().format(record) + "\n")
    else:
        stream.write(line + "\n")
    stream.flush()


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    global _as_json
    _as_json = json
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Redacting())
    if json:
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.addFilter(_QuietDemo())
    if root.level > logging.INFO:
        # uvicorn builds each access line's arguments before asking whether INFO is on; with no
        # handler in reach it skips the work entirely (~0.1 ms of CPU per request here).
        access.propagate = False
    # One line per request from httpx would drown the log; pollers log what matters themselves.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
