"""The three ways clients meet the hub: WebSocket, Server-Sent Events and the HTTP API."""
