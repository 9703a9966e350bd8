"""bench/client.py for the ``push`` scenario (bench/push.py): the same connections and protocol
with the harness, but the events are headlines, ``{"id": "h<n>", "published": <send time>, …}``
(bench/push_upstream.py). Every delivery on every connection is measured: receive time minus
the ``published`` time the upstream (or the fan-out publisher) took right before writing the
item; ``n`` is checked for order, gaps and repeats per connection as ``seq`` is there.
"""

from __future__ import annotations

import time
from datetime import datetime

import client  # bench/ is this script's directory: on sys.path
import orjson


class Headlines(client.Stats):
    def message(self, conn: client.Connection, payload: bytes) -> None:
        now = time.time()
        if not payload.startswith(b'{"type":"event"'):
            return  # welcome, subscribed, …
        data = orjson.loads(payload)["data"]
        seq = int(data["id"][1:])
        self.latencies.append(now - datetime.fromisoformat(data["published"]).timestamp())
        if seq <= conn.last_seq:
            self.duplicates += 1
        elif conn.last_seq >= 0 and seq != conn.last_seq + 1:
            self.out_of_order += 1
        elif conn.last_seq < 0 and seq != 0:
            self.out_of_order += 1  # the first item missed
        conn.last_seq = max(conn.last_seq, seq)
        conn.count += 1
        self.received += 1


if __name__ == "__main__":
    client.Stats = Headlines  # client.run() makes its Stats by this name
    client.main()
