"""Baseline: sse-starlette's EventSourceResponse with an asyncio.Queue per client, the pattern
its README and most tutorials show; publish puts the message on every client's queue."""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvicorn
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

app = FastAPI()
queues: set[asyncio.Queue[str]] = set()


@app.get("/sse")
async def sse(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()
    queues.add(queue)

    async def events():
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            queues.discard(queue)

    return EventSourceResponse(events())


@app.post("/api/publish", status_code=202)
async def publish(request: Request) -> dict:
    body = orjson.loads(await request.body())
    for item in body if isinstance(body, list) else [body]:
        message = orjson.dumps(item["data"]).decode()
        for queue in queues:
            queue.put_nowait(message)
    return {"ok": True}


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools")
