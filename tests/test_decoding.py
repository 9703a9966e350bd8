"""Body decoding with caps (stream/decoding.py): bombs, truncation, trailing junk, raw deflate."""

from __future__ import annotations

import gzip
import zlib

import pytest

from stream.decoding import BodyDecoder
from stream.errors import UpstreamError


def decode(encoding: str, data: bytes, limit: int = 1 << 20, piece: int = 1024) -> bytes:
    decoder = BodyDecoder(encoding, limit)
    out = b"".join(decoder.feed(data[i : i + piece]) for i in range(0, len(data), piece))
    decoder.finish()
    return out


def test_identity_gzip_and_both_kinds_of_deflate_decode():
    """Plain bodies pass; gzip, zlib-wrapped deflate and raw deflate (no header) are decoded."""
    body = b'{"items": []}' * 100
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode("identity", body) == body
    assert decode("gzip", gzip.compress(body)) == body
    assert decode("deflate", zlib.compress(body)) == body
    assert decode("deflate", raw.compress(body) + raw.flush()) == body


def test_multi_member_gzip_is_read_whole():
    """Concatenated gzip members (legal, e.g. from a log rotator) decode to the whole body."""
    assert decode("gzip", gzip.compress(b"first ") + gzip.compress(b"second")) == b"first second"


def test_a_bomb_stops_at_the_limit_of_output():
    """64 MiB of zeros in ~64 KiB of gzip: too_large as soon as the output passes the limit."""
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    decoder = BodyDecoder("gzip", 1 << 20)
    with pytest.raises(UpstreamError) as info:
        decoder.feed(bomb)
    assert info.value.kind == "too_large" and decoder.size <= (1 << 20) + 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b"x" * 1000)[:-10], "truncated"),
        (gzip.compress(b"ok") + b"junk" * 100, "data after the end"),
        (b"\x00\x01 not gzip at all", "cannot decode"),
    ],
)
def test_broken_gzip_bodies_are_bad_bodies(data, message):
    """A cut-off stream, junk after the end, or no gzip at all: bad_body, never a half body."""
    with pytest.raises(UpstreamError) as info:
        decode("gzip", data)
    assert info.value.kind == "bad_body" and message in info.value.message


def test_compressed_input_is_capped_too():
    """Incompressible input beyond the limit is refused without decoding it all."""
    with pytest.raises(UpstreamError) as info:
        decode("gzip", gzip.compress(bytes(range(256)) * 40_000), limit=100_000, piece=65536)
    assert info.value.kind == "too_large"


def test_unknown_encodings_are_refused():
    """br or zstd were never asked for: refuse rather than publish compressed bytes."""
    with pytest.raises(UpstreamError, match="unsupported Content-Encoding"):
        BodyDecoder("br", 100)
