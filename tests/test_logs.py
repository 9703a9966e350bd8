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
