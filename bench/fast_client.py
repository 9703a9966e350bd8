"""A fast subscriber process for bench/fast.py: many WebSocket connections read by picows.

picows parses frames in C and calls Python once per frame, and this process does little more
per frame than count it. What it cannot save is the kernel's part of a read (the syscall and the
wake-up), which every client pays once per socket read, whatever parses the bytes: when each
event is a read of its own, that is most of a client's CPU (docs/performance.md, *Two
harnesses*). Every ``--sample``-th connection also parses each message, checks its ``seq`` for
order, gaps and repeats, and takes its latency. Protocol with the harness, over stdin/stdout
(bench/client.py's):

    harness starts:  python bench/fast_client.py --url ws://127.0.0.1:PORT/ws --count N --latencies FILE
    client prints:   "ready <seconds to connect>"      once every connection is up and quiet
    harness writes:  "stop\n" to stdin                 when the run is over
    client prints:   one JSON object with counts; latencies go to FILE (float64)

Every message carries {"seq": n, "t": send time}. Counting starts at "ready": stream's welcome
and subscribed frames come before it. ``reads`` counts the socket reads that brought frames
(a frame that is ``last_in_buffer``): picows reads with recv(2), which /proc/PID/io does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from array import array

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect


class Stats:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.out_of_order = 0
        self.duplicates = 0
        self.closed = 0
        self.reads = 0  # socket reads that brought frames: frames with last_in_buffer


class Subscriber(WSListener):
    def __init__(self, stats: Stats, sampled: bool) -> None:
        self.stats = stats
        self.sampled = sampled
        self.frames = 0
        self.last_seq = -1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return  # picows answers pings itself
        self.frames += 1
        if frame.last_in_buffer:
            self.stats.reads += 1
        if self.sampled:
            self.check(frame.get_payload_as_bytes())

    def check(self, payload: bytes) -> None:
        message = orjson.loads(payload)
        data = message.get("data", message)  # stream wraps the published data; Node sends it bare
        if not isinstance(data, dict) or "seq" not in data:
            return  # welcome, subscribed
        self.stats.latencies.append(time.time() - data["t"])
        seq = data["seq"]
        if seq <= self.last_seq:
            self.stats.duplicates += 1
        elif self.last_seq >= 0 and seq != self.last_seq + 1:
            self.stats.out_of_order += 1
        self.last_seq = max(self.last_seq, seq)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.closed += 1


async def run(args: argparse.Namespace) -> None:
    stats = Stats()
    started = time.monotonic()

    def bound_socket(_url) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((args.source, 0))
        sock.setblocking(False)
        return sock

    subscribers: list[Subscriber] = []
    for first in range(0, args.count, 100):  # a hundred handshakes at a time
        batch = [Subscriber(stats, index % args.sample == 0) for index in range(first, min(args.count, first + 100))]
        await asyncio.gather(*(ws_connect(lambda s=s: s, args.url, socket_factory=bound_socket) for s in batch))
        subscribers += batch
    await asyncio.sleep(0.3)  # stream's welcome and subscribed frames arrive; they are not events
    base = [s.frames for s in subscribers]
    stats.reads = 0
    print(f"ready {time.monotonic() - started:.3f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + 10  # report once nothing has arrived for 0.3 s, not while behind
    seen = -1
    while (total := sum(s.frames for s in subscribers)) != seen and time.monotonic() < deadline:
        seen = total
        await asyncio.sleep(0.3)
    counts = [s.frames - b for s, b in zip(subscribers, base, strict=True)]
    with open(args.latencies, "wb") as out:  # noqa: ASYNC230 - once, after the measurement
        stats.latencies.tofile(out)
    print(orjson.dumps({
        "connections": len(subscribers),
        "received": sum(counts),
        "min_per_connection": min(counts),
        "max_per_connection": max(counts),
        "out_of_order": stats.out_of_order,
        "duplicates": stats.duplicates,
        "closed": stats.closed,
        "reads": stats.reads,
    }).decode(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://host:port/path")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--source", default="127.0.0.1", help="local address to connect from (127.0.0.x)")
    parser.add_argument("--latencies", required=True)
    parser.add_argument("--sample", type=int, default=5, help="check order and measure latency on every n-th connection")
    args = parser.parse_args()
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
