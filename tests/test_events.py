"""Event ids and since positions (stream/events.py)."""

from __future__ import annotations

import pytest

from stream.errors import BadRequest
from stream.events import format_id, new_epoch, parse_id, parse_since, symbols_of


def test_ids_round_trip_and_epochs_differ():
    """An id is epoch-seq; two hub lives never share an epoch."""
    epoch = new_epoch()
    assert parse_id(format_id(epoch, 42)) == (epoch, 42)
    assert new_epoch() != new_epoch()


@pytest.mark.parametrize(
    ("text", "millis"),
    [("2026-11-25T10:00:00Z", 1795600800000), ("2026-11-25T11:00:00+01:00", 1795600800000), ("-60s", 1_000_000 - 60_000), ("-2m", 1_000_000 - 120_000), ("-1h", 1_000_000 - 3_600_000), ("-500ms", 999_500)],
)
def test_since_accepts_iso_times_and_relative_durations(text, millis):
    """since may be an ISO-8601 time or a negative duration."""
    assert parse_since(text, now_ms=1_000_000).time_ms == millis


def test_since_accepts_ids():
    """since may be an event id."""
    since = parse_since("abc123-77")
    assert (since.epoch, since.seq, since.time_ms) == ("abc123", 77, None)


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "",
        "12:00",
        "-5x",
        "abc-",
        "tomorrow",
        "-99999999999999999999999999999d",
        "-" + "9" * 5000 + "s",
        "-1e999s",
        "-40000d",
        "99999-01-01T00:00:00Z",
    ],
)
def test_garbage_since_is_a_bad_request_naming_since(text):
    """Anything else is refused with a message naming the field and the accepted forms."""
    with pytest.raises(BadRequest) as info:
        parse_since(text)
    assert info.value.message.startswith("since:")


def test_symbols_are_read_from_a_symbols_list_only():
    """Only data objects with a list of strings under 'symbols' carry symbols; upper-cased."""
    assert symbols_of({"symbols": ["aapl", 3, "MSFT"]}) == {"AAPL", "MSFT"}
    assert symbols_of({"symbols": "AAPL"}) is None
    assert symbols_of([1, 2]) is None
