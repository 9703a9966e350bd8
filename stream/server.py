"""Run the app under uvicorn with stream's protocols and a shutdown that tells clients first."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from . import __version__
from .app import Service
from .logs import announce
from .runtime import Runtime
from .transports.http_protocol import HttpProtocol
from .transports.ws import WebSocketProtocol
from .uvicorn_seam import Config, Server

__all__ = ["StreamServer", "make_config", "settle_heap"]

log = logging.getLogger("stream")

# Python's default runs a full collection after every 10 middle-generation ones (when enough
# objects have survived): each walks every tracked object, a stall of tens of ms once the
# server holds its connections and events. A tenth as often, after start-up's own objects
# are frozen out of it, see docs/architecture.md ("Garbage collection").
FULL_COLLECTION_EVERY = 100
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _loop(tls: bool = False) -> str:
    if tls:
        # uvloop starts reading an accepted socket after connection_made, whatever the protocol
        # asked there, so the ClientHello could reach the HTTP parser before start_tls takes the
        # socket over (HttpProtocol). asyncio's own loop honours the pause.
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def make_config(service: Service, host: str, port: int) -> Config:
    server = service.settings.server
    return Config(
        service.entry,
        host=host,
        port=port,
        http=HttpProtocol,
        ws=WebSocketProtocol,
        loop=_loop(tls=service.runtime.tls is not None),
        lifespan="on",
        log_config=None,
        # Our own drain (Runtime.drain) already waited for clients; what is left after it is
        # cancelled quickly so SIGTERM always ends the process within shutdown_timeout + ~1 s.
        timeout_graceful_shutdown=1,
        # uvicorn annotates it int but only ever uses it as a call_later delay; fractions work.
        timeout_keep_alive=server.keep_alive_timeout,  # type: ignore[arg-type]
        # X-Forwarded-For is believed only from forwarded_allow_ips (default: nobody).
        proxy_headers=bool(server.forwarded_allow_ips),
        forwarded_allow_ips=list(server.forwarded_allow_ips) or "",
        server_header=False,
    )


def settle_heap() -> None:
    """Exempt what start-up built (modules, classes, the app: ~70,000 objects) from every later
    collection, which never frees any of it, and make full collections rarer."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


class StreamServer(Server):
    """uvicorn's Server (touchpoint 3 of ``uvicorn_seam``) whose shutdown first drains stream's connections (SPEC §8)."""

    def __init__(self, config: Config, runtime: Runtime, serving: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.serving = serving  # called once the socket listens (a worker tells its parent)
        self.stopped_by: int | None = None  # the signal that started the shutdown

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            if self.serving is not None:
                self.serving()  # first: whoever reads the line below may rely on it
            # Said only now that the socket listens: a busy port fails before this line.
            server = self.runtime.settings.server
            announce(f"stream {__version__}: serving on {self.base_url()} (broker: {server.broker.split('@')[-1]})")
            self.runtime.start_pollers(self.base_url())
            settle_heap()

    def base_url(self) -> str:
        """How this process reaches itself (demo providers connect to /demo/…), https:// over its own TLS."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        scheme = "https" if self.runtime.tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only flip the flag, so /readyz answers 503 at once.
        self.runtime.stopping = True
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT start the graceful shutdown; once it is done, one closing line, and
        the process ends by the signal it got, as a supervisor expects. uvicorn's own version
        re-raises SIGINT into asyncio's handler, which turns it into a KeyboardInterrupt and a
        traceback on every Ctrl-C."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stopped_by is not None:
            name = signal.Signals(self.stopped_by).name
            announce(f"stream {__version__}: stopped by {name} after a graceful shutdown")
            signal.signal(self.stopped_by, signal.SIG_DFL)
            signal.raise_signal(self.stopped_by)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.runtime.drain()
        await super().shutdown(sockets)
