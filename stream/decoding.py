"""Response bodies decoded by hand (gzip, deflate), with hard caps on input and output. Pure.

httpx would inflate a whole network chunk at once (a 64 KiB gzip chunk can become 64 MiB), so
the poller reads raw bytes and feeds them here: output is produced at most ``limit + 1`` bytes
at a time, data after the end of the stream and truncated streams are refused.
"""

from __future__ import annotations

import zlib

from .errors import UpstreamError

__all__ = ["BodyDecoder"]

_GZIP_MAGIC = b"\x1f\x8b"
_SLACK = 4096  # compressed input may exceed the decoded size slightly (headers, stored blocks)


class BodyDecoder:
    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding.lower().strip() or "identity"
        if self.encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise UpstreamError("bad_body", f"unsupported Content-Encoding {encoding!r}")
        self.limit = limit
        self.size = 0  # decoded bytes so far
        self.raw = 0  # encoded bytes so far
        self._zlib = self._new()
        self._started = False

    def _new(self):
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.encoding == "deflate":
            return zlib.decompressobj(zlib.MAX_WBITS)
        return None

    def feed(self, data: bytes) -> bytes:
        self.raw += len(data)
        if self._zlib is None:
            return self._count(data)
        if self.raw > self.limit + _SLACK:
            raise UpstreamError("too_large", f"body is over max_bytes ({self.limit} bytes, compressed)")
        out = []
        while data:
            if self._zlib.eof:
                if self.encoding != "deflate" and data.startswith(_GZIP_MAGIC):
                    self._zlib = self._new()  # the next member of a multi-member gzip file
                else:
                    raise UpstreamError("bad_body", f"data after the end of the {self.encoding} stream")
            try:
                piece = self._zlib.decompress(data, self.limit - self.size + 1)
            except zlib.error as exc:
                if self.encoding == "deflate" and not self._started:
                    # Some servers send raw deflate without the zlib header.
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._started = True
                    continue
                raise UpstreamError("bad_body", f"cannot decode the {self.encoding} body: {exc}") from None
            self._started = True
            out.append(self._count(piece))
            data = self._zlib.unconsumed_tail or self._zlib.unused_data
        return b"".join(out)

    def finish(self) -> None:
        if self._zlib is not None and self.raw and not self._zlib.eof:
            raise UpstreamError("bad_body", f"the {self.encoding} body is truncated")

    def _count(self, piece: bytes) -> bytes:
        self.size += len(piece)
        if self.size > self.limit:
            raise UpstreamError("too_large", f"body is over max_bytes ({self.limit} bytes decoded)")
        return piece
