// A reconnecting subscription to stream's WebSocket protocol (docs/protocol.md).
//
// It keeps the id of the last event it saw and resubscribes with `since` after any drop, so
// nothing history still holds is lost; a `gap` from the server (history too short, or the
// server restarted) is handed to the page, which refetches its state over HTTP.

const MAX_DELAY_MS = 30000;
const OFFLINE_AFTER = 3; // failed attempts in a row before the badge says "offline"

export class LiveStream {
  /**
   * @param {object} options
   * @param {string[]} options.topics  patterns to subscribe to
   * @param {(event: object) => void} options.onEvent  every event (snapshot ones carry snapshot: true)
   * @param {(gap: {after: string|null, reason: string}) => void} options.onGap
   * @param {(state: "connecting"|"live"|"reconnecting"|"offline"|"refused", detail: string) => void} options.onState
   * @param {string|null} [options.token]  a key or JWT, for servers whose topics are not public
   */
  constructor({ topics, onEvent, onGap, onState, token = null }) {
    this.topics = topics;
    this.token = token;
    this.onEvent = onEvent;
    this.onGap = onGap;
    this.onState = onState;
    this.lastId = null;
    this.attempts = 0;
    this.socket = null;
    this.timer = null;
    this.stopped = false;
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // Browsers cannot set headers on a WebSocket: the token goes in the query (redacted in logs).
    const query = this.token ? `?token=${encodeURIComponent(this.token)}` : "";
    return `${scheme}//${location.host}/ws${query}`;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000, "page closed");
    this.socket = null;
    this.onState("offline", "page hidden");
  }

  connect() {
    this.onState(this.attempts === 0 && this.lastId === null ? "connecting" : this.stateWhileDown(), "");
    const socket = new WebSocket(this.url());
    this.socket = socket;
    socket.addEventListener("open", () => {
      const op = { op: "subscribe", topics: this.topics, ref: "dashboard" };
      if (this.lastId) op.since = this.lastId;
      else op.snapshot = true;
      socket.send(JSON.stringify(op));
    });
    socket.addEventListener("message", (frame) => this.receive(frame.data));
    socket.addEventListener("close", (close) => this.closed(socket, close));
    // "error" is always followed by "close"; the browser already reports the cause itself.
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    for (const item of Array.isArray(message) ? message : [message]) this.handle(item);
  }

  handle(message) {
    switch (message.type) {
      case "subscribed":
        if (this.lastId === null) this.lastId = message.position;
        this.attempts = 0;
        this.onState("live", "");
        break;
      case "event":
        if (!message.snapshot) this.lastId = message.id;
        this.onEvent(message);
        break;
      case "gap":
        this.onGap(message);
        break;
      case "error":
        console.warn(`stream: ${message.code}: ${message.message}`);
        // The subscription itself was refused (no key, or a key without these topics): the
        // socket stays open but nothing will come, so say so instead of "connecting".
        if (message.ref === "dashboard" && (message.code === "unauthorized" || message.code === "forbidden")) {
          this.onState("refused", message.message);
        }
        break;
      default:
        break; // welcome, pong
    }
  }

  closed(socket, close) {
    if (socket !== this.socket || this.stopped) return;
    this.socket = null;
    this.attempts += 1;
    // 4008: we fell behind; the server keeps our place, so come back at once.
    const delay = close.code === 4008 ? 0 : this.backoff();
    const why = close.code === 4008 ? "fell behind, resuming" : close.reason || "connection lost";
    this.onState(this.stateWhileDown(), delay > 0 ? `${why}; retrying in ${(delay / 1000).toFixed(1)} s` : why);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  stateWhileDown() {
    return this.attempts >= OFFLINE_AFTER ? "offline" : "reconnecting";
  }

  backoff() {
    // Exponential with full jitter, so a restarted server is not hit by every page at once.
    const ceiling = Math.min(MAX_DELAY_MS, 500 * 2 ** Math.min(this.attempts, 10));
    return 250 + Math.random() * ceiling;
  }
}
