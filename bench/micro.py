"""Micro-benchmarks behind docs/performance.md: the cost of one uvloop write, and of one
delivery through stream's fan-out, without HTTP and without real clients.

    .venv/bin/python bench/micro.py write   # bare transport.write of a pre-built frame
    .venv/bin/python bench/micro.py fanout  # Hub.publish to N subscribers on real sockets

A sink process accepts N loopback connections and discards what it reads. The numbers are the
CPU of this process (os.times) per write or delivery. For instruction counts, which do not
vary from run to run, run the fan-out twice under callgrind with different --rounds and divide
the difference by (rounds difference x connections):

    valgrind --tool=callgrind python bench/micro.py fanout --rounds 10 --connections 200
    valgrind --tool=callgrind python bench/micro.py fanout --rounds 60 --connections 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream import wire
from stream.hub import Hub

SINK = """
import asyncio, sys, uvloop
class Discard(asyncio.Protocol):
    def data_received(self, data): pass
async def main():
    server = await asyncio.get_running_loop().create_server(Discard, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
uvloop.install()
asyncio.run(main())
"""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.sub = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        if self.sub is not None:
            self.sub.pause()

    def resume_writing(self) -> None:
        if self.sub is not None:
            self.sub.resume()


class Sink:
    encode = staticmethod(wire.ws_event)
    encode_snapshot = staticmethod(wire.ws_snapshot)
    encode_gap = staticmethod(wire.ws_gap)

    def __init__(self, write) -> None:
        self.write = write

    def overflowed(self) -> None:
        pass


async def run(args: argparse.Namespace, port: int) -> None:
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(Connection, "127.0.0.1", port))[1] for _ in range(args.connections)]
    frame = wire.ws_frame(b"x" * 250)
    hub = Hub()
    if args.mode == "fanout":
        for connection in connections:
            connection.sub = hub.new_subscriber(Sink(connection.transport.write), transport="ws")
            hub.subscribe(connection.sub, ["bench.>"])
    data = {"seq": 1, "t": 1.0, "pad": "x" * 150}
    writes = [c.transport.write for c in connections]
    before = os.times()
    for _ in range(args.rounds):
        if args.mode == "write":
            for write in writes:
                write(frame)
        else:
            await hub.publish("bench.a", data)
        await asyncio.sleep(0.004)  # let the sink drain, as between real publishes
    after = os.times()
    count = args.rounds * args.connections
    print(
        f"{args.mode}: {count} writes, user {(after.user - before.user) * 1e6 / count:.2f} µs, "
        f"system {(after.system - before.system) * 1e6 / count:.2f} µs per write"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("write", "fanout"))
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        uvloop.install()
        asyncio.run(run(args, port))
    finally:
        sink.kill()


if __name__ == "__main__":
    main()
