"""Baseline: the ConnectionManager from FastAPI's WebSocket docs ("Handling disconnections and
multiple clients"), with a publish endpoint that broadcasts. Faithful to the docs: one task per
connection, and broadcast awaits send_text() on each connection in turn."""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

app = FastAPI()


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        self.active_connections.remove(websocket)

    async def broadcast(self, message: str) -> None:
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(websocket)


@app.post("/api/publish", status_code=202)
async def publish(request: Request) -> dict:
    body = orjson.loads(await request.body())
    for item in body if isinstance(body, list) else [body]:
        await manager.broadcast(orjson.dumps(item["data"]).decode())
    return {"ok": True}


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, loop="uvloop", http="httptools", ws="websockets-sansio")
