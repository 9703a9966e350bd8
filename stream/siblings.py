"""What the workers of one host share (``stream serve --workers N``): every worker's metrics, and
the per-address counts behind the per-client limit.

The parent (``workers``) makes a directory for them and gives each worker its ``Seat``: its index,
how many workers there are, and that directory, which holds

    addresses          a table of counts, SLOTS rows of one 32-bit cell per worker: a worker
                       writes only its own cell of a row (no lock), and the host's count for an
                       address is the row's sum. An address picks its row by a CRC of its group,
                       so two addresses sharing a row are counted together: stricter, never looser.
    metrics-<i>.sock   worker i's own Prometheus exposition, served on a unix socket; the
                       worker that answers /metrics reads every sibling's and merges them,
                       each series labelled worker="<i>".
    ready-<i>          left by worker i once it listens: the parent tells a worker that cannot
                       start from one that died later.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .limits import AddressCounts

__all__ = ["SLOTS", "HostMetrics", "Seat", "SharedCounts", "create_table"]

log = logging.getLogger("stream")

SLOTS = 1 << 16
TABLE = "addresses"
SIBLING_WAIT = 1.0  # seconds a scrape waits for a sibling's exposition; one that does not answer is left out


@dataclass(frozen=True)
class Seat:
    """One worker's place among the workers of a host."""

    index: int
    count: int
    directory: Path

    def serving(self) -> None:
        """Tell the parent this worker started: it listens (``workers`` restarts it if it dies)."""
        (self.directory / f"ready-{self.index}").touch()

    @classmethod
    def parse(cls, text: str, directory: str) -> Seat:
        """``"<index>/<count>"`` as the parent passes it (``--worker``)."""
        index, _, count = text.partition("/")
        return cls(int(index), int(count), Path(directory))


def create_table(directory: Path, workers: int) -> None:
    """The parent's part: the shared table, all zeros."""
    (directory / TABLE).write_bytes(bytes(SLOTS * workers * 4))


class SharedCounts(AddressCounts):
    """``AddressCounts`` over the workers' shared table."""

    def __init__(self, seat: Seat) -> None:
        self.seat = seat
        with open(seat.directory / TABLE, "r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), 0)
        self._cells = memoryview(self._map).cast("i")
        # A restarted worker's sockets died with its predecessor: its cells start from zero.
        for row in range(SLOTS):
            self._cells[row * seat.count + seat.index] = 0

    def _row(self, group: str) -> int:
        return (zlib.crc32(group.encode()) & (SLOTS - 1)) * self.seat.count

    def count(self, group: str) -> int:
        row = self._row(group)
        return sum(self._cells[row : row + self.seat.count])

    def add(self, group: str, delta: int) -> None:
        self._cells[self._row(group) + self.seat.index] += delta


class HostMetrics:
    """Serves this worker's exposition to its siblings, and gathers all of them for /metrics."""

    def __init__(self, seat: Seat, render: Callable[[], bytes]) -> None:
        self.seat = seat
        self.render = render
        self.path = seat.directory / f"metrics-{seat.index}.sock"
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a predecessor's, if this worker was restarted
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.render())
            await writer.drain()
        finally:
            writer.close()

    async def gather(self) -> dict[str, bytes]:
        """Every worker's exposition by worker label; a sibling that does not answer in time is
        left out of this scrape (and logged)."""
        expositions = {str(self.seat.index): self.render()}
        siblings = [path for path in self.seat.directory.glob("metrics-*.sock") if path != self.path]
        answers = await asyncio.gather(*(self._read(path) for path in siblings))
        for path, answer in zip(siblings, answers, strict=True):
            if answer is not None:
                expositions[path.stem.removeprefix("metrics-")] = answer
        return expositions

    async def _read(self, path: Path) -> bytes | None:
        try:
            async with asyncio.timeout(SIBLING_WAIT):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.info("metrics: worker %s did not answer (%s); its series are missing from this scrape", path.stem, exc.__class__.__name__)
            return None
