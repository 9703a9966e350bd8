"""uvicorn's httptools protocol, plus a hook that lets ``/sse`` write to the socket directly.

The ASGI scope gets ``extensions["stream.http"]`` = this protocol. An event stream registers
itself as ``stream_sink``; it then hears about flow control (pause/resume writing) and about
the connection going away, and writes pre-framed chunks to ``transport`` without a task switch
per event. Everything else is uvicorn's, unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HttpProtocol", "StreamSink"]


class StreamSink(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def lost(self) -> None: ...


class HttpProtocol(HttpToolsProtocol):
    stream_sink: StreamSink | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"stream.http": self}  # type: ignore[typeddict-unknown-key]

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stream_sink is not None:
            self.stream_sink.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stream_sink is not None:
            self.stream_sink.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        sink, self.stream_sink = self.stream_sink, None
        super().connection_lost(exc)
        if sink is not None:
            sink.lost()

    @property
    def chunked(self) -> bool:
        cycle: Any = self.cycle
        return bool(cycle is not None and cycle.chunked_encoding)
