"""Subscribers for the soak test (tests/test_soak.py), run as a process of their own so that
parsing 100 events a second for each of them does not share a core with the test's clock:

    python -m tests.soak_subscribers URLS COUNT FIRST

``COUNT`` ``stream.client.Subscriber`` instances (the shipped client: it reconnects, resumes with
the last id, reports gaps) subscribe to ``soak.>``, spread over the comma-separated ``URLS``
starting at subscriber number ``FIRST``. It prints ``ready`` once all are subscribed. Then it
reads commands on stdin:

    check PATH SECONDS   PATH holds the accepted ids (one per line); wait up to SECONDS for every
                         subscriber to get the last of them, then print one JSON line: per
                         subscriber, what it got wrong against them (see ``verdict``), and exit.

What a subscriber received is kept as seqs (8 bytes each), so ten minutes at 100 events a
second for 100 subscribers stay under 100 MB.
"""

from __future__ import annotations

import asyncio
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

from stream.client import Gap, Subscriber

TOPICS = ["soak.>"]


def seq(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


class Record:
    def __init__(self) -> None:
        self.seqs = array("q")
        self.gaps: list[list[int | None]] = []  # [after (-1: unknown), first seq received after it (None: none yet)]

    def event(self, value: int) -> None:
        self.seqs.append(value)
        for gap in self.gaps:
            if gap[1] is None:
                gap[1] = value

    def gap(self, after: str | None) -> None:
        self.gaps.append([-1 if after is None else seq(after), None])

    def covered(self, value: int) -> bool:
        return any(value > low and (high is None or value < high) for low, high in self.gaps)  # type: ignore[operator]


def verdict(record: Record, accepted: list[int]) -> dict[str, Any]:
    """Against the accepted seqs (ascending): duplicates, out of order, accepted but missing
    without a gap that covers it, received but never accepted (a publish whose answer was lost,
    which is allowed), and the gap notices."""
    received = record.seqs
    ordered = all(received[i] < received[i + 1] for i in range(len(received) - 1))
    duplicates = len(received) - len(set(received))
    got = set(received)
    missing = [value for value in accepted if value not in got and not record.covered(value)]
    wanted = set(accepted)
    return {
        "received": len(received),
        "duplicates": duplicates,
        "ordered": ordered,
        "missing": len(missing),
        "missing_sample": missing[:3],
        "extra": sum(1 for value in got if value not in wanted),
        "gaps": len(record.gaps),
    }


def read_accepted(path: str) -> list[int]:
    return [seq(line) for line in Path(path).read_text().split()]


async def follow(url: str, record: Record, ready: asyncio.Event) -> None:
    async with Subscriber(url, TOPICS, min_delay=0.1, max_delay=2.0) as sub:
        ready.set()
        async for item in sub:
            if isinstance(item, Gap):
                record.gap(item.after)
            else:
                record.event(seq(item.id))


async def main() -> None:
    urls, count, first = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    records = [Record() for _ in range(count)]
    readies = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.ensure_future(follow(urls[(first + n) % len(urls)], records[n], readies[n])) for n in range(count)]
    await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 60)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    command = (await reader.readline()).decode().split()
    if command[:1] != ["check"]:
        return
    accepted = await asyncio.to_thread(read_accepted, command[1])
    last, deadline = accepted[-1] if accepted else 0, time.monotonic() + float(command[2])
    while time.monotonic() < deadline and not all(r.seqs and r.seqs[-1] >= last for r in records):
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    print(orjson.dumps([verdict(record, accepted) for record in records]).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
