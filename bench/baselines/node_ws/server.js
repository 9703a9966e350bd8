// Baseline: Node.js with the `ws` library, the broadcast loop from its README.
const http = require("http");
const { WebSocketServer, WebSocket } = require("ws");

const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  if (req.method === "POST" && req.url === "/api/publish") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = JSON.parse(Buffer.concat(chunks));
      for (const item of Array.isArray(body) ? body : [body]) {
        // Encoded once; every client gets the same Buffer (a string would be re-encoded per send).
        const message = Buffer.from(JSON.stringify(item.data));
        for (const client of wss.clients) {
          if (client.readyState === WebSocket.OPEN) client.send(message, { binary: false });
        }
      }
      res.writeHead(202, { "content-type": "application/json" });
      res.end('{"ok":true}');
    });
  } else {
    res.writeHead(200, { "content-type": "application/json" });
    res.end('{"status":"ok"}');
  }
});
const wss = new WebSocketServer({ server, path: "/ws", perMessageDeflate: false });
server.listen(port, "127.0.0.1");
