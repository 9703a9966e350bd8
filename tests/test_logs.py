"""Log redaction (stream/logs.py): secrets never reach a log line, however they are encoded."""

from __future__ import annotations

import pytest

from stream.logs import redact


@pytest.mark.parametrize(
    "line",
    [
        '127.0.0.1:5 - "GET /sse?topics=a&token=SECRET HTTP/1.1" 200',
        '127.0.0.1:5 - "GET /sse?topics=a&%74oken=SECRET HTTP/1.1" 200',
        '127.0.0.1:5 - "GET /sse?%74%6F%6B%65%6E=SECRET HTTP/1.1" 200',
        '127.0.0.1:5 - "GET /sse?TOKEN=SECRET HTTP/1.1" 200',
        '127.0.0.1:5 - "GET /sse?%2574oken=SECRET HTTP/1.1" 200',
        '127.0.0.1:5 - "GET /ws?api_key=SECRET&topics=a" 101',
        "Authorization: Bearer SECRET",
    ],
)
def test_a_token_is_redacted_however_its_name_is_encoded(line):
    """token / key values and Bearer credentials become *** in every encoding of the name."""
    cleaned = redact(line)
    assert "SECRET" not in cleaned and "***" in cleaned


def test_other_parameters_are_left_alone():
    """Only secrets are hidden: topics, since and limits stay readable."""
    line = '127.0.0.1:5 - "GET /api/events?topics=news.>,a&since=-5m&limit=10 HTTP/1.1" 200'
    assert redact(line) == line


def test_under_log_json_every_line_is_json_the_banners_too():
    """`stream serve --log-json`: every line on stderr, the "starting" and "serving on" banners
    included, is one JSON object with ts, level, logger and message."""
    import orjson

    from .support import Server, metric_now

    server = Server(None, env={"STREAM_LOG_JSON": "true"})  # the log_json setting, as --log-json sets it
    with server:
        metric_now(server, "stream_")  # a request: an access-log line too
    lines = server.output().splitlines()
    banners = [line for line in lines if "starting (config" in line or "serving on" in line]
    assert len(banners) == 2, lines
    for line in lines:
        entry = orjson.loads(line)
        assert set(entry) >= {"ts", "level", "logger", "message"}, line
