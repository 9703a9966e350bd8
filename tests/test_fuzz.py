"""Property-based fuzzing (hypothesis) of WebSocket frames, HTTP query strings and publish bodies
against one real server: no 500, no traceback in the log, and the server stays healthy.

Everything here is synchronous and goes through raw sockets, so each example sends exactly the
bytes hypothesis drew (bad percent-encoding, invalid UTF-8, odd opcodes, unfinished fragments),
and every read has a timeout instead of a sleep.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

from .support import PUBLISH_KEY

pytestmark = pytest.mark.slow

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=False,
)

TIMEOUT = 5.0  # per read; a healthy server answers any of these requests in milliseconds
# Close codes a fuzzing client may see (docs/protocol.md): 1011 is only for a keepalive timeout,
# which cannot happen within one example, so here it would mean an internal error.
CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009, 1013, 4008}
# Error codes of an `error` frame that keeps the connection open (docs/protocol.md §2, SPEC §6);
# `internal` is a server bug.
ERROR_CODES = {
    "bad_request",
    "unknown_op",
    "bad_topic",
    "forbidden",
    "too_many_subscriptions",
    "rate_limited",
    "payload_too_large",
    "too_many_topics",
}
SENTINEL = "fuzz-sentinel-7f3a9c"  # the ref of the ping op that ends every WebSocket example
# The issue's own examples, always run first: a duration past float range, 1e999, 5000 digits.
HUGE_SINCE = "-" + "9" * 400 + "d"
DIGITS_5000 = "9" * 5000
# An access line (HTTP or WebSocket) with a 5xx other than 503 over capacity.
BAD_ACCESS = re.compile(r'^.*(?:HTTP/1\.[01]|"WebSocket [^"]*)" 5(?!03)\d\d$')


# -- the server's log -----------------------------------------------------------------------


class Log:
    """Reads what the server logged, whole lines at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.mark()
        self.start = self.offset

    def _read(self, offset: int) -> bytes:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        return data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read

    def mark(self) -> None:
        """Start a new example: what was logged before is not its doing (a failed example
        stops before it reads its own lines)."""
        self.offset += len(self._read(self.offset))

    def new(self) -> str:
        data = self._read(self.offset)
        self.offset += len(data)
        return data.decode(errors="replace")

    def since_start(self) -> str:
        return self._read(self.start).decode(errors="replace")


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # a CR or an escape sequence forges lines too


def bad_lines(text: str) -> list[str]:
    """What must not be in the log: tracebacks (shown as their exception line), 5xx access
    lines, lines that are not a log record of their own or hold control characters (client
    input that carried a newline, CR or escape into the log, where it forges lines), and the
    publish key (we send it only as a token, which is always redacted)."""
    lines = text.split("\n")
    found = []
    at = 0
    while at < len(lines):
        line = lines[at]
        at += 1
        if PUBLISH_KEY in line:
            found.append(f"the publish key is in the log: {line[:300]}")
        if LOG_LINE.match(line):
            if BAD_ACCESS.match(line):
                found.append(line[:300])
            if CONTROL.search(line):
                found.append(f"a control character in a log line (from client input?): {line[:300]!r}")
        elif line == "Traceback (most recent call last):":
            # one traceback (chained ones too) runs until the next log line; its last line is
            # the exception
            block = []
            while at < len(lines) and not LOG_LINE.match(lines[at]):
                block.append(lines[at])
                at += 1
            found.append("Traceback … " + next((b for b in reversed(block) if b.strip()), "?"))
        elif line:
            previous = lines[at - 2] if at >= 2 else ""
            found.append(f"a log record spans lines (a newline from client input?): {previous[:200]!r} + {line[:200]!r}")
    return found


def check_example_log(log: Log) -> None:
    problems = bad_lines(log.new())
    assert not problems, f"the server logged: {problems}"


def check_healthy(server) -> None:
    status, body = http_raw(server.port, b"GET", b"/healthz")
    assert status == 200, f"/healthz answered {status}: {body[:200]!r}"


def check_clean(server, log: Log) -> None:
    """After a hypothesis run: nothing bad in this test's part of the log, and /healthz 200."""
    check_healthy(server)
    problems = bad_lines(log.since_start())
    assert not problems, f"the server logged: {problems}"


# -- raw HTTP ---------------------------------------------------------------------------------


def http_raw(
    port: int,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    *,
    streaming: bool = False,
) -> tuple[int, bytes]:
    """Send one request and return (status, body bytes). ``streaming``: return once the head and
    the first bytes of the body are in (or TIMEOUT passes), then drop the connection."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed before a response head; got {data[:200]!r}"
                data += chunk
        except TimeoutError:
            raise AssertionError(f"no response head within {TIMEOUT} s; got {data[:200]!r}") from None
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        try:
            if streaming:
                while not rest and (chunk := sock.recv(65536)):
                    rest += chunk
            else:
                while chunk := sock.recv(65536):
                    rest += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            if not streaming:
                raise AssertionError(f"HTTP {status}: the body did not end within {TIMEOUT} s (Connection: close)") from None
        return status, rest


def check_status(status: int, body: bytes) -> None:
    assert status < 500 or status == 503, f"HTTP {status}: {body[:300]!r}"


# -- raw WebSocket ------------------------------------------------------------------------------


def frame_bytes(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    declared: int | None = None,
) -> bytes:
    """One client frame exactly as given: any opcode, FIN/RSV bits, mask or not, and a declared
    length that may differ from the payload's (only used for lengths over the frame limit)."""
    length = len(payload) if declared is None else declared
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode & 0x0F
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text_frame(text: str) -> bytes:
    return frame_bytes(0x1, text.encode())


class Wire(bytes):
    """Raw bytes for the socket that show (in a failing example) as what they are meant to be;
    ``big``: more than one TCP segment."""

    description: str
    big: bool

    def __new__(cls, data: bytes, description: str, *, big: bool = False) -> Wire:
        wire = super().__new__(cls, data)
        wire.description = description
        wire.big = big
        return wire

    def __repr__(self) -> str:
        return f"<{self.description}>"


class Peer:
    """A WebSocket client over a plain socket: a handshake with any path and headers, raw bytes
    out, frames in, every read under a timeout (tests.support.RawWebSocket cannot send a
    non-final, RSV or unmasked frame, and its handshake read has no timeout)."""

    def __init__(self, port: int, path: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
        names = {name.lower() for name, _ in headers}
        base = [
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ]
        head = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
        head += [name + b": " + value for name, value in base if name.lower() not in names]
        head += [name + b": " + value for name, value in headers]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        self.buffer = b""
        try:
            while b"\r\n\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                assert chunk, f"closed during the handshake; got {self.buffer[:200]!r}"
                self.buffer += chunk
        except TimeoutError:
            self.sock.close()
            raise AssertionError(f"no handshake answer within {TIMEOUT} s") from None
        response, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = int(response.split(b" ", 2)[1])
        self.response_head = response

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed already; what it said is still to be read

    def _read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frame(self) -> tuple[int, bytes]:
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        return first & 0x0F, self._read(length)

    def close(self) -> None:
        self.sock.close()


def check_server_message(payload: bytes) -> None:
    """A server text frame is JSON: an object (or a batch of them); errors have a known code."""
    message = orjson.loads(payload)
    for item in message if isinstance(message, list) else [message]:
        assert isinstance(item, dict) and "type" in item, f"server sent {payload[:300]!r}"
        if item["type"] == "error":
            assert item.get("code") in ERROR_CODES, f"error frame {item!r}"


SENTINEL_FRAME = text_frame(json.dumps({"op": "ping", "ref": SENTINEL}))


def run_until_sentinel(peer: Peer, echo_close: bytes | None = None) -> str:
    """After the sentinel ping op was sent, read until its pong (the connection is open and answering)
    or a close frame with an allowed code. ``echo_close``: the payload of a close frame the
    client sent, which the server may echo back as it is (RFC 6455 §5.5.1)."""
    while True:
        try:
            opcode, payload = peer.frame()
        except EOFError:
            raise AssertionError("the server closed the TCP connection without a close frame") from None
        except ConnectionResetError:
            raise AssertionError("the server reset the connection without a close frame") from None
        except TimeoutError:
            raise AssertionError(f"no answer to the sentinel ping within {TIMEOUT} s") from None
        if opcode == 0x1:
            check_server_message(payload)
            message = orjson.loads(payload)
            if isinstance(message, dict) and message.get("ref") == SENTINEL:
                # its pong, or (after a flood) its refusal: either way the connection answers
                assert message.get("type") == "pong" or message.get("code") == "rate_limited", message
                return "open"
        elif opcode == 0x8:
            if echo_close is not None and payload == echo_close:
                return "closed"
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            note(f"close frame {code} {payload[2:]!r}")
            assert code in CLOSE_CODES, f"close code {code} ({payload[2:]!r})"
            return "closed"
        elif opcode in (0x2, 0x0) or opcode not in (0x9, 0xA):
            raise AssertionError(f"the server sent opcode {opcode:#x}: {payload[:200]!r}")


# -- strategies: values -------------------------------------------------------------------------
# Most examples are a valid request with exactly one field made bad (so the bad value gets past
# the checks in front of it); the rest are chaos. A bad value is often one of a curated list of
# edge cases, otherwise generated.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
# JSON nested deeper than orjson encodes (254) or decodes (1024), as text
deep_json = st.sampled_from([200, 255, 300, 1100]).map(lambda depth: "[" * depth + "1" + "]" * depth)

# digit counts around the edges: 64-bit, float overflow (309), Python's int() limit (4300)
DIGIT_COUNTS = [1, 19, 20, 39, 308, 309, 400, 4300, 4301, 5000]
huge_digits = st.one_of(
    st.integers(min_value=0, max_value=10**40).map(str),
    st.sampled_from(DIGIT_COUNTS).map(lambda n: "9" * n),
    st.sampled_from(DIGIT_COUNTS).map(lambda n: "1" + "0" * n),
)
NASTY_NUMBERS = [
    "", "0", "-0", "-1", "00", "1e999", "-1e999", "1e-999", "1e3", "NaN", "inf", "-inf", "0x10", "1_000",
    " 5", "+7", "1.5", ".", "٣", "５", "9" * 19, "9" * 20, "1" + "0" * 20, "9" * 309, "9" * 4300, "9" * 4301,
    "9" * 5000, "-" + "9" * 5000,
]  # fmt: skip
numbers_fuzz = st.one_of(
    st.sampled_from(NASTY_NUMBERS),
    huge_digits,
    huge_digits.map(lambda d: "-" + d),
    st.floats().map(repr),
    st.integers().map(str),
)

valid_segment = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True) | st.sampled_from(["news", "quotes", "AAPL", "fuzz"])
valid_topics = st.lists(valid_segment, min_size=1, max_size=4).map(".".join)
valid_patterns = st.one_of(
    valid_topics,
    st.lists(valid_segment | st.just("*"), min_size=1, max_size=4).map(".".join),
    valid_topics.map(lambda t: t + ".>"),
    st.sampled_from([">", "*", "_system.providers", "_system.>", "*.AAPL", "news.>"]),
)
NASTY_PATTERNS = [
    "", " ", ".", "..", "a..b", "a.", ".a", "a b", "é", "x" * 201, "a." * 8 + "b", "*>", ">.a", "a.>.b", "a*", ">x",
    "\x00", "%", "a/b", "_x", "_system", "_system.providers.x", "*._system", "news.>,", "\ud7ff", "🙂", "A" * 200,
]  # fmt: skip
bad_patterns = st.one_of(
    st.sampled_from(NASTY_PATTERNS),
    st.lists(valid_segment | st.sampled_from(["", " ", "*>", "é", "*", ">"]), min_size=1, max_size=10).map(".".join),
    st.text(max_size=30),
)
topics_valid = st.one_of(
    st.lists(valid_patterns, min_size=1, max_size=3),
    st.lists(valid_patterns, min_size=1, max_size=3).map(",".join),
    st.just([f"many.{n}" for n in range(60)]),  # two of these on one connection pass max_patterns
)
topics_fuzz = st.one_of(
    st.lists(st.one_of(valid_patterns, bad_patterns), min_size=1, max_size=3),
    st.lists(st.one_of(valid_patterns, bad_patterns), min_size=1, max_size=3).map(",".join),
    st.sampled_from([[], "", ",", " , ", ",,a", [f"p{n}" for n in range(101)], ",".join(f"p{n}" for n in range(101))]),
    json_values,
)
topic_fuzz = st.one_of(bad_patterns, valid_patterns, st.sampled_from(["_system.providers", "_x", "a.b.c.d.e.f.g.h.i"]))

symbols_valid = st.sampled_from(["AAPL", "aapl,msft", "BTC-USD", ""])
NASTY_SYMBOLS = ["S" * 33, ",,,", " , ", "é", "\x00", "a" * 5000, ",".join(["X"] * 2000), "AAPL,,MSFT", "%"]
symbols_fuzz = st.one_of(
    st.sampled_from(NASTY_SYMBOLS),
    st.lists(st.from_regex(r"[A-Za-z.\-]{0,6}", fullmatch=True) | st.text(max_size=40), max_size=4).map(",".join),
)
flags_valid = st.sampled_from(["1", "true", "0", "false"])
flags_fuzz = st.sampled_from(["TRUE", "yes", "on", "no", "off", "", "2", "maybe", "-1", "1.0", " 1", "１"])

offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59))
iso_times = st.one_of(
    st.datetimes().map(datetime.isoformat),
    st.builds(lambda moment, offset: moment.replace(tzinfo=timezone(offset)).isoformat(), st.datetimes(), offsets),
    st.datetimes().map(lambda moment: moment.isoformat() + "Z"),
)


def nasty_since(epoch: str) -> list[str]:
    return [
        "-" + "9" * 400 + "d", "-" + "9" * 309 + "ms", "-" + "9" * 5000 + "s", "-" + "9" * 20 + "d",
        "-" + "9" * 15 + "." + "9" * 400 + "h", "-99999999999999999999.5h", "-0s", "-0.0000000001ms", "-1e999d",
        "-inf" + "d", "-", "-d", "--1s", "+1s", "1s", "-1S", "-1d ", " -1d", "-١d",
        f"{epoch}-0", f"{epoch}-1", f"{epoch}-" + "9" * 30, f"{epoch}-" + "9" * 31, f"{epoch}-" + "9" * 5000,
        f"{epoch}--1", f"{epoch}-", f"-{epoch}-1", "z" * 32 + "-1", "z" * 33 + "-1", "0-0", "a-b",
        "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "0001-01-01", "9999-12-31T23:59:59.999999Z",
        "2026-13-40T25:61:61Z", "2026-02-30", "2026-11-25T10:00:00+99:00", "2026-11-25T10:00:00.9999999999Z",
        "2026-11-25T10:00:00z", "2026-W48", "99999-01-01", "1970-01-01T00:00:00-23:59", "\x00", " ", "%", "9" * 5000,
    ]  # fmt: skip


@functools.lru_cache
def since_fuzz(epoch: str) -> st.SearchStrategy[str]:
    """``since`` values the server must refuse or take: ids of this epoch and others, times,
    durations (huge ones too), garbage."""
    units = st.sampled_from(["ms", "s", "m", "h", "d"])
    durations = st.builds(
        lambda number, unit: f"-{number}{unit}",
        huge_digits | st.builds(lambda a, b: f"{a}.{b}", huge_digits, huge_digits),
        units,
    )
    ids = st.builds(lambda e, seq: f"{e}-{seq}", st.just(epoch) | st.from_regex(r"[0-9a-z]{1,40}", fullmatch=True), huge_digits)
    return st.one_of(st.sampled_from(nasty_since(epoch)), durations, ids, iso_times, st.text(max_size=40))


def since_valid(epoch: str) -> st.SearchStrategy[str]:
    return st.sampled_from([f"{epoch}-0", f"{epoch}-1", "-60s", "-1h", "-500ms", "2026-11-25T10:00:00Z", ""])


# -- strategies: query strings --------------------------------------------------------------------

# Reserved and broken bits spliced into a query string as they are (never decoded by us).
RAW_BITS = ["%", "%z", "%zz", "%ff", "%C3", "%C3%28", "%ED%A0%80", "%00", "%0A", "%0D%0A", "+", "&", "=", ";", "&&", "==", "#", "?"]
SAFE = ",.:*>-_~!$'()/@"


@st.composite
def encoded(draw, text: str) -> str:
    """``text`` percent-encoded one of several ways, sometimes with broken escapes spliced in.
    The publish key stays inside its value, where the server knows it is a token to redact."""
    if PUBLISH_KEY in text:
        return quote(text, safe="")
    how = draw(st.sampled_from(["quote-some", "quote-some", "quote", "plus", "raw-utf8", "broken"]))
    if how == "quote":
        return quote(text, safe="")
    if how == "quote-some":
        return quote(text, safe=SAFE)
    if how == "plus":
        return quote(text, safe=" ").replace(" ", "+")
    if how == "raw-utf8":
        # non-ASCII bytes as they are; spaces and controls still escaped so the request line holds
        return "".join(c if ord(c) > 127 or (c.isprintable() and c not in ' #"%') else quote(c, safe="") for c in text)
    cut = draw(st.integers(0, len(text)))
    return quote(text[:cut], safe="") + draw(st.sampled_from(RAW_BITS)) + quote(text[cut:], safe="")


def as_query_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    return json.dumps(value)


@st.composite
def query_strings(draw, fields: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]], required: tuple[str, ...] = ()) -> str:
    """Mostly: the endpoint's keys with valid values (``required`` ones always, the others now
    and then) and exactly one key with a bad value, sometimes under a percent-encoded name.
    Otherwise chaos: unknown keys, repeats, keys without '=', any value, any encoding."""
    names = sorted(fields)
    pairs: list[str] = []
    if draw(st.integers(0, 3)) != 0:
        bad = draw(st.sampled_from(names))
        for name in names:
            if name == bad:
                value = as_query_value(draw(fields[name][1]))
                key = name
                if draw(st.integers(0, 5)) == 0:  # %74opics is still "topics" once decoded
                    at = draw(st.integers(0, len(name) - 1))
                    key = quote(name[:at]) + "%" + format(ord(name[at]), "02" + draw(st.sampled_from("xX"))) + name[at + 1 :]
                pairs.append(f"{key}={draw(encoded(value))}")
            elif name in required or draw(st.booleans()):
                pairs.append(f"{name}={quote(as_query_value(draw(fields[name][0])), safe=SAFE)}")
        if draw(st.integers(0, 3)) == 0:
            pairs.append(f"{draw(encoded(draw(st.text(max_size=10))))}={draw(encoded(draw(st.text(max_size=20))))}")
        return "&".join(draw(st.permutations(pairs)))
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["known", "known", "unknown", "bare"]))
        if kind == "unknown":
            pairs.append(f"{draw(encoded(draw(st.text(max_size=10))))}={draw(encoded(draw(st.text(max_size=30))))}")
            continue
        name = draw(st.sampled_from(names))
        if kind == "bare":
            pairs.append(draw(encoded(name)))
            continue
        value = as_query_value(draw(fields[name][0] | fields[name][1] | st.text(max_size=30) | numbers_fuzz))
        name_text = quote(name) if PUBLISH_KEY in value else draw(encoded(name))  # the key only as a token
        pairs.append(f"{name_text}={draw(encoded(value))}")
    return "&".join(pairs)


def holds_long(query: str) -> bool:
    """Would /api/events long-poll for more than a second with this query (``wait`` 2-60)?
    Decoded as Starlette decodes it: the last ``wait`` wins."""
    waits = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "wait"]
    if not waits:
        return False
    try:
        return int(waits[-1]) > 1
    except ValueError:
        return False


def query_fields(epoch: str, names: str) -> dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]:
    """(valid values, bad values) for the query keys in ``names``."""
    table = {
        "topics": (topics_valid, topics_fuzz),
        "since": (since_valid(epoch), since_fuzz(epoch)),
        "limit": (st.integers(1, 500).map(str), numbers_fuzz),
        # a valid wait of 2-60 s would hold the request that long: 0 and 1 only
        "wait": (st.sampled_from(["0", "1"]), st.sampled_from(["-1", "61", "1e999", "0.5", "x", " 0", "٠"]) | huge_digits),
        "symbols": (symbols_valid, symbols_fuzz),
        "snapshot": (flags_valid, flags_fuzz),
        "q": (st.sampled_from(["nvidia", "8-K", ""]), st.text(max_size=40) | st.sampled_from(["%", "\x00", "a" * 5000])),
        "token": (st.just(PUBLISH_KEY), st.sampled_from(["", "nope", "Bearer " + PUBLISH_KEY, PUBLISH_KEY + " ", "a.b.c"]) | st.text(max_size=20)),
        "cursor": (valid_topics, st.text(max_size=20) | topic_fuzz | numbers_fuzz),
    }
    return {name: table[name] for name in names.split()}


ascii_header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
# Authorization values, as bytes: the key, other keys, other schemes, and latin-1 beyond ASCII
authorizations = st.one_of(
    st.sampled_from(
        [f"Bearer {PUBLISH_KEY}".encode(), b"Bearer nope", b"bearer  " + PUBLISH_KEY.encode(), b"Bearer", b"Basic Zm9vOmJhcg==", b"Bearer a.b.c"]
    ),
    st.binary(max_size=40).map(lambda raw: b"Bearer " + bytes(b for b in raw if b >= 0x20 and b != 0x7F)),
)


# -- strategies: WebSocket frames -------------------------------------------------------------------

DEEP = "<deeply nested JSON here>"
OP_FIELDS = {"subscribe": ("topics", "since", "snapshot", "symbols"), "unsubscribe": ("topics",), "publish": ("topic", "data"), "ping": ()}


@functools.lru_cache
def op_field_strategies(epoch: str) -> dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]:
    """(valid values, bad values) for each field of an op, as JSON values."""
    return {
        "op": (st.sampled_from(sorted(OP_FIELDS)), st.sampled_from(["junk", "", "Subscribe", "subscribe ", "__proto__"]) | json_values),
        "topics": (topics_valid, topics_fuzz),
        "since": (since_valid(epoch) | st.none(), since_fuzz(epoch) | json_values),
        "snapshot": (st.booleans() | flags_valid, flags_fuzz | json_values),
        "symbols": (symbols_valid | st.just(["AAPL", "msft"]), symbols_fuzz | st.lists(st.text(max_size=40), max_size=4) | json_values),
        "ref": (st.none() | st.integers(-1000, 1000) | st.text(max_size=20), st.sampled_from(["r" * 201, 2**70, -(2**70), 1e308]) | json_values),
        "topic": (valid_topics, topic_fuzz | json_values),
        "data": (json_values, st.just(DEEP) | json_values),
    }


@st.composite
def op_messages(draw, epoch: str) -> str:
    """A client op as JSON text: mostly one of the four ops with its fields valid except one,
    sometimes any op with any fields (JSON nested too deep included)."""
    fields = op_field_strategies(epoch)
    if draw(st.integers(0, 3)) != 0:
        op = draw(fields["op"][0])
        names = ("op", "ref", *OP_FIELDS[op])
        bad = draw(st.sampled_from(names))
        message: dict[str, Any] = {"op": op}
        for name in names[1:]:
            if name == bad or name in ("topics", "topic", "data") or draw(st.booleans()):
                message[name] = draw(fields[name][name == bad])
        if bad == "op":
            message["op"] = draw(fields["op"][1])
            if draw(st.integers(0, 3)) == 0:
                del message["op"]
    else:
        message = {}
        for name, (valid, fuzz) in fields.items():
            if draw(st.integers(0, 2)) == 0:
                message[name] = draw(valid | fuzz)
    text = json.dumps(message, ensure_ascii=draw(st.booleans()))
    if DEEP in text:
        text = text.replace(json.dumps(DEEP), draw(deep_json))
    return text


def unambiguous(items: list[Wire]) -> list[Wire]:
    """Frames in an order whose outcome TCP cannot blur. The server closes the TCP connection as
    soon as it closes the WebSocket (a close from us, a protocol error, 1009); bytes of ours that
    reach it after that make the kernel reset the connection, which can destroy its close frame
    before we read it. So: nothing after our own close frame (RFC 6455 forbids it anyway), and
    at most one frame bigger than a TCP segment, first, so that whatever follows it arrives
    with its tail, in one read."""
    big = [item for item in items if item.big][:1]
    ordered = big + [item for item in items if not item.big]
    closes = [at for at, item in enumerate(ordered) if item[0] & 0x0F == 0x8]
    return ordered[: closes[0] + 1] if closes else ordered


ODD_OPCODES = [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]
FRAME_KINDS = ["op"] * 6 + ["json", "raw-text", "bad-utf8", "binary", "control", "close", "odd-opcode", "fragmented", "fragmented", "bad-header", "flood", "size"]
MAX_FRAME = 65536  # max_frame_bytes


def padded_ping(size: int) -> bytes:
    """A ping op of exactly ``size`` bytes."""
    head = b'{"op":"ping","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'



@st.composite
def frames(draw, epoch: str) -> Wire:
    """One fuzz item: a frame or a few, as raw bytes."""
    kind = draw(st.sampled_from(FRAME_KINDS))
    if kind == "op":
        text = draw(op_messages(epoch))
        return Wire(text_frame(text), f"text {text[:2000]}")
    if kind == "json":
        text = json.dumps(draw(json_values))
        return Wire(text_frame(text), f"text {text}")
    if kind == "raw-text":
        payload = draw(st.binary(max_size=200))
        return Wire(frame_bytes(0x1, payload), f"text bytes {payload!r}")
    if kind == "bad-utf8":
        text = draw(op_messages(epoch)).encode()
        at = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"]))
        payload = text[:at] + bad + text[at:]
        return Wire(frame_bytes(0x1, payload), f"text (invalid UTF-8) {payload[:2000]!r}")
    if kind == "binary":
        payload = draw(st.binary(max_size=200) | op_messages(epoch).map(str.encode))
        return Wire(frame_bytes(0x2, payload), f"binary {payload[:2000]!r}")
    if kind == "control":
        opcode = draw(st.sampled_from([0x9, 0xA]))
        payload = draw(st.binary(max_size=130))
        return Wire(frame_bytes(opcode, payload), f"control {opcode:#x} {payload!r}")
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 1002, 1005, 1006, 1008, 1011, 1015, 2999, 3000, 4999, 5000, 0, 65535]) | st.integers(0, 65535))
        reason = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
        payload = draw(st.sampled_from([b"", b"\x03"]) | st.just(struct.pack("!H", code) + reason[:123]))
        return Wire(frame_bytes(0x8, payload), f"close {payload!r}")
    if kind == "odd-opcode":
        opcode = draw(st.sampled_from(ODD_OPCODES))
        payload = draw(st.binary(max_size=60))
        return Wire(frame_bytes(opcode, payload), f"opcode {opcode:#x} {payload!r}")
    if kind == "fragmented":
        message = draw(op_messages(epoch).map(str.encode) | st.binary(max_size=200))
        cuts = sorted(draw(st.lists(st.integers(0, len(message)), min_size=1, max_size=4)))
        parts = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=False)]
        opcode = draw(st.sampled_from([0x1, 0x1, 0x2]))
        shape = draw(st.sampled_from(["whole", "whole", "ping-inside", "unfinished", "starts-with-cont", "new-message-inside", "fragmented-ping"]))
        out = [frame_bytes(opcode if i == 0 else 0x0, part, fin=i == len(parts) - 1) for i, part in enumerate(parts)]
        if shape == "ping-inside":
            out.insert(1, frame_bytes(0x9, b"in"))
        elif shape == "unfinished":
            out[-1] = frame_bytes(opcode if len(parts) == 1 else 0x0, parts[-1], fin=False)
        elif shape == "starts-with-cont":
            out[0] = frame_bytes(0x0, parts[0], fin=len(parts) == 1)
        elif shape == "new-message-inside":
            out.insert(1, text_frame('{"op":"ping","ref":"inside"}'))
        elif shape == "fragmented-ping":
            out.insert(1, frame_bytes(0x9, b"frag", fin=False))
        return Wire(b"".join(out), f"fragmented {shape} opcode {opcode:#x} {parts!r}")
    if kind == "flood":
        # ops and control frames count against the op rate (50/s, burst 100): past the burst they
        # are refused with rate_limited, and a sustained flood closes with 1008
        count = draw(st.sampled_from([50, 101, 150, 205, 400]))
        opcode = draw(st.sampled_from([0x1, 0x9, 0xA]))
        one = frame_bytes(0x1, b'{"op":"ping"}') if opcode == 0x1 else frame_bytes(opcode, b"f")
        return Wire(one * count, f"{count} x {'ping op' if opcode == 0x1 else f'control {opcode:#x}'}")
    if kind == "size":
        # at max_frame_bytes (sent whole: it needs two TCP segments), or past it, whole or across
        # two fragments, announced by a header that the server must refuse at once (only a few
        # of the bytes it announces follow)
        size = draw(st.sampled_from([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]))
        message = padded_ping(size)
        fragments = draw(st.booleans())
        if size <= MAX_FRAME:
            if not fragments:
                return Wire(frame_bytes(0x1, message), f"ping op of {size} bytes", big=True)
            half = size // 2
            out = frame_bytes(0x1, message[:half], fin=False) + frame_bytes(0x0, message[half:])
            return Wire(out, f"ping op of {size} bytes in two fragments", big=True)
        if not fragments:
            return Wire(frame_bytes(0x1, message[:8], declared=size), f"text frame announcing {size} bytes", big=True)
        first = draw(st.sampled_from([1, 40000, MAX_FRAME - 1]))
        out = frame_bytes(0x1, message[:first], fin=False) + frame_bytes(0x0, message[first : first + 8], declared=size - first)
        return Wire(out, f"fragments of {first} bytes and then one announcing {size - first} more", big=True)
    # bad-header
    variant = draw(st.sampled_from(["rsv", "unmasked", "too-long", "huge-length"]))
    payload = b'{"op":"ping","ref":"h"}'
    if variant == "rsv":
        rsv = draw(st.integers(1, 7))
        return Wire(frame_bytes(0x1, payload, rsv=rsv), f"text with rsv {rsv}")
    if variant == "unmasked":
        return Wire(frame_bytes(0x1, payload, masked=False), "unmasked text")
    # a declared length over the 64 KiB frame limit; only a few bytes follow, so the server can
    # refuse at the header without us flooding a socket it is about to close
    declared = draw(st.integers(65537, 2**63 - 1) if variant == "too-long" else st.integers(2**63, 2**64 - 1))
    return Wire(frame_bytes(0x1, payload[:8], declared=declared), f"text declaring {declared} bytes")


# -- the tests ----------------------------------------------------------------------------------------


def current_epoch(server) -> str:
    status, body = http_raw(server.port, b"GET", b"/api/events?limit=1")
    assert status == 200, body
    return orjson.loads(body)["next"].rsplit("-", 1)[0]


def test_websocket_frames_never_break_the_server(server):
    """Any sequence of WebSocket frames (ops with one bad field or garbage, any JSON, invalid JSON
    or UTF-8, binary, control, close, odd opcodes, fragments, bad headers, floods, frames at and
    past 64 KiB) gets answers and error frames without an `internal` code, or a close with a
    documented code; never a traceback or a 500 in the log, and /healthz stays 200."""
    log = Log(server.log)
    epoch = current_epoch(server)

    @settings(FUZZ, max_examples=250)
    @example(items=[Wire(text_frame(json.dumps({"op": "subscribe", "topics": ["a"], "since": HUGE_SINCE})), "subscribe, since -9…9d")], authed=False)
    @example(items=[Wire(frame_bytes(0x1, b'{"op":"ping"}\xff'), "text, invalid UTF-8")], authed=False)
    @given(items=st.lists(frames(epoch), min_size=1, max_size=5).map(unambiguous), authed=st.booleans())
    def fuzz(items: list[Wire], authed: bool) -> None:
        log.mark()
        peer = Peer(server.port, b"/ws", [(b"Authorization", f"Bearer {PUBLISH_KEY}".encode())] if authed else [])
        try:
            assert peer.status == 101, peer.response_head
            opcode, welcome = peer.frame()
            assert opcode == 0x1 and orjson.loads(welcome)["type"] == "welcome", welcome
            echo = None
            if items[-1][0] & 0x0F == 0x8:  # our close frame's payload, as the server may echo it
                length, key = items[-1][1] & 0x7F, items[-1][2:6]
                echo = bytes(b ^ key[i % 4] for i, b in enumerate(items[-1][6 : 6 + length]))
            # one write, so the server reads it all before it may close
            peer.send(b"".join(items) + SENTINEL_FRAME)
            run_until_sentinel(peer, echo)
        finally:
            peer.close()
        check_healthy(server)
        check_example_log(log)

    fuzz()
    check_clean(server, log)


WS_PATHS = ["/ws"] * 6 + ["/ws/", "/wsx", "//ws", "/ws%20", "/WS", "/api/events"]
WS_HEADERS = [b"Origin", b"Authorization", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Sec-WebSocket-Extensions", b"Sec-WebSocket-Protocol", b"X-Forwarded-For"]


def test_websocket_handshake_queries_never_break_the_server(server):
    """Any /ws handshake (query string, path, Origin, Authorization, key, version, extension and
    X-Forwarded-For headers) is refused with a 4xx (or 503), or opens with a welcome and then
    answers the sentinel ping or closes with a documented code; never a 500 or a traceback, and
    /healthz stays 200."""
    log = Log(server.log)
    epoch = current_epoch(server)
    fields = query_fields(epoch, "topics since snapshot symbols token")
    extra_headers = st.lists(
        st.tuples(
            st.sampled_from(WS_HEADERS),
            st.sampled_from([f"Bearer {PUBLISH_KEY}", "Bearer nope", "permessage-deflate", "13", "8", "", "x" * 30, "1.2.3.4, ::1"]) | ascii_header_values,
        ),
        max_size=2,
        unique_by=lambda pair: pair[0],
    )

    @settings(FUZZ, max_examples=150)
    @example(path="/ws", query=f"topics=a&since={HUGE_SINCE}", headers=[])
    @example(path="/ws", query=f"topics=a&since={DIGITS_5000}&symbols={'S' * 33}", headers=[])
    @example(path="/ws", query="topics=a%0Aforged", headers=[])
    @given(path=st.sampled_from(WS_PATHS), query=query_strings(fields), headers=extra_headers)
    def fuzz(path: str, query: str, headers: list[tuple[bytes, str]]) -> None:
        log.mark()
        target = (path + ("?" + query if query else "")).encode()
        peer = Peer(server.port, target, [(name, value.strip().encode()) for name, value in headers])
        try:
            if peer.status != 101:
                check_status(peer.status, peer.buffer)
            else:
                opcode, first = peer.frame()
                assert opcode == 0x1, (opcode, first)
                check_server_message(first)
                peer.send(SENTINEL_FRAME)
                run_until_sentinel(peer)
        finally:
            peer.close()
        check_healthy(server)
        check_example_log(log)

    fuzz()
    check_clean(server, log)


def test_http_query_strings_never_break_the_server(server):
    """Any query string on /api/events, /api/topics, /api/topics/{topic}, /api/news and /sse (and
    any topic in the path, any Last-Event-ID, any Authorization) is answered below 500 (or 503),
    an SSE 200 starts with `retry:`; never a traceback, and /healthz stays 200."""
    log = Log(server.log)
    epoch = current_epoch(server)
    endpoints = {
        "/api/events": query_strings(query_fields(epoch, "topics since limit wait symbols token")),
        "/api/topics": query_strings(query_fields(epoch, "limit cursor token")),
        "/api/topics/{topic}": query_strings(query_fields(epoch, "token")),
        "/api/news": query_strings(query_fields(epoch, "limit symbols q token")),
        "/sse": query_strings(query_fields(epoch, "topics since snapshot symbols token"), required=("topics",)),
    }
    requests = st.sampled_from(sorted(endpoints)).flatmap(lambda path: st.tuples(st.just(path), endpoints[path]))
    ascii_printable = lambda text: text.isascii() and text.isprintable()  # noqa: E731

    @settings(FUZZ, max_examples=300)
    @example(request=("/api/events", f"since={HUGE_SINCE}"), topic="a", last_event_id=None, authorization=None)
    @example(request=("/sse", f"topics=a&since={HUGE_SINCE}"), topic="a", last_event_id=None, authorization=None)
    @example(request=("/sse", "topics=a"), topic="a", last_event_id=HUGE_SINCE, authorization=None)
    @example(request=("/api/events", f"limit=1e999&wait={DIGITS_5000}"), topic="a", last_event_id=None, authorization=None)
    @example(request=("/api/news", f"limit={DIGITS_5000}&symbols=%ff%C3"), topic="a", last_event_id=None, authorization=None)
    @example(request=("/api/topics", "limit=1e999&cursor=%ff"), topic="a", last_event_id=None, authorization=None)
    @example(request=("/api/topics/{topic}", ""), topic="%ED%A0%80", last_event_id=None, authorization=None)
    @given(
        request=requests,
        topic=(valid_topics | topic_fuzz).flatmap(encoded),
        last_event_id=st.none() | (since_valid(epoch) | since_fuzz(epoch)).filter(ascii_printable),
        authorization=st.none() | authorizations,
    )
    def fuzz(request: tuple[str, str], topic: str, last_event_id: str | None, authorization: bytes | None) -> None:
        path, query = request
        log.mark()
        assume(not (path == "/api/events" and holds_long(query)))
        target = path.replace("{topic}", topic) + ("?" + query if query else "")
        headers = []
        if path == "/sse" and last_event_id is not None:
            headers.append((b"Last-Event-ID", last_event_id.encode()))
        if authorization is not None:
            headers.append((b"Authorization", authorization))
        streaming = path == "/sse"
        status, body = http_raw(server.port, b"GET", target.encode(), headers, streaming=streaming)
        check_status(status, body)
        if streaming and status == 200:
            assert b"retry:" in body, body[:200]
        check_healthy(server)
        check_example_log(log)

    fuzz()
    check_clean(server, log)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def big_body(size: int) -> bytes:
    """A publish whose data is ``size`` bytes: over max_event_bytes, or over the 1 MiB body limit."""
    return b'{"topic":"fuzz.big","data":"' + b"x" * size + b'"}'


publish_items = st.fixed_dictionaries(
    {"topic": valid_topics | topic_fuzz | json_values, "data": json_values},
    optional={"extra": json_values},
)
publish_bodies = st.one_of(
    publish_items.map(dumps),
    st.lists(publish_items, max_size=4).map(dumps),
    publish_items.map(lambda item: dumps([item] * 101)),  # one over max_batch_events
    json_values.map(dumps),
    st.binary(max_size=300),
    st.builds(lambda v, cut: v[:cut], publish_items.map(dumps), st.integers(0, 40)),
    st.sampled_from([65536, 70000, 1 << 20]).map(big_body),
    deep_json.map(lambda text: b'{"topic":"fuzz.deep","data":' + text.encode() + b"}"),
)


@st.composite
def framed(draw, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes, str]:
    """How the body goes on the wire: (headers, bytes, description). Never a body shorter than
    announced, which would hold the request until body_timeout."""
    how = draw(st.sampled_from(["length"] * 5 + ["huge-length", "chunked", "chunked", "bad-chunk", "length+chunked", "two-lengths"]))
    if how == "length":
        return [(b"Content-Length", str(len(body)).encode())], body, how
    if how == "huge-length":  # refused from the header alone, before any body is read
        return [(b"Content-Length", b"99999999999")], b"", how
    chunked = [(b"Transfer-Encoding", b"chunked")]
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    parts = [part for part in (body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=False)) if part]
    size = draw(st.sampled_from(["{:x}", "{:X}", "{:x};ext=1", "000{:x}"]))
    wire = b"".join(size.format(len(part)).encode() + b"\r\n" + part + b"\r\n" for part in parts) + b"0\r\n\r\n"
    if how == "chunked":
        return chunked, wire, f"chunked ({size})"
    if how == "bad-chunk":
        bad = draw(st.sampled_from([b"zz\r\n", b"-1\r\n", b"f" * 20 + b"\r\n", b"5\r\nhelloX\r\n", b"\r\n\r\n"]))
        return chunked, bad + wire, f"chunked, starting with {bad!r}"
    if how == "length+chunked":
        return [(b"Content-Length", str(len(wire)).encode()), *chunked], wire, how
    return [(b"Content-Length", str(len(body)).encode()), (b"Content-Length", b"0")], body, how


def test_publish_bodies_never_break_the_server(server):
    """Any POST /api/publish body (publish objects and batches with garbage, any JSON, JSON nested
    too deep, any bytes; with a length, chunked, or framed wrongly), with or without the key, any
    Content-Type, through the shortcut or (with an Origin) the app, is answered below 500 (or 503)
    and 202 only with the key; never a traceback, and /healthz stays 200."""
    log = Log(server.log)

    @settings(FUZZ, max_examples=200)
    @given(
        request=publish_bodies.flatmap(framed),
        authorization=st.none() | authorizations,
        query_token=st.none() | st.sampled_from([PUBLISH_KEY, "nope", "", "%74oken"]),
        content_type=st.none()
        | st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
        | ascii_header_values,
        origin=st.none() | st.sampled_from(["http://127.0.0.1", "null"]) | ascii_header_values,
    )
    def fuzz(request: tuple[list[tuple[bytes, bytes]], bytes, str], authorization: bytes | None, query_token: str | None, content_type: str | None, origin: str | None) -> None:
        log.mark()
        headers, body, _ = request
        target = b"/api/publish" + (f"?token={query_token}".encode() if query_token is not None else b"")
        if authorization is not None:
            headers = [*headers, (b"Authorization", authorization)]
        if content_type is not None:
            headers = [*headers, (b"Content-Type", content_type.strip().encode())]
        if origin is not None:
            headers = [*headers, (b"Origin", origin.strip().encode())]
        status, answer = http_raw(server.port, b"POST", target, headers, body)
        check_status(status, answer)
        if status == 202:
            keyed = query_token == PUBLISH_KEY or (authorization is not None and PUBLISH_KEY.encode() in authorization)
            assert keyed, f"published without the key: {answer[:200]!r}"
        check_healthy(server)
        check_example_log(log)

    fuzz()
    check_clean(server, log)
