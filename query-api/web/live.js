// Live data: a small client of the graphql-transport-ws protocol (graphql-ws's) over one
// WebSocket at /graphql. It reconnects with backoff and subscribes again, and the server sends
// every subscription's current answer at once, so a reconnect also refreshes the page.

const PROTOCOL = "graphql-transport-ws";
// Close codes after which trying again cannot help (bad token, forbidden, bad request).
const FATAL = new Set([4400, 4401, 4403]);

export class LiveClient {
  /** `onState(state, detail)`: "connecting", "live", "offline" (retrying) or "refused". */
  constructor(url, token, onState = () => {}) {
    this.url = url;
    this.token = token;
    this.onState = onState;
    this.subscriptions = new Map(); // id -> { payload, next, error }
    this.nextId = 1;
    this.attempt = 0;
    this.closed = false;
    this.connect();
  }

  /** Subscribes; `next(data, errors)` on every answer, `error(errors)` if refused. Returns an unsubscribe function. */
  subscribe(query, variables, { next, error = () => {} }) {
    const id = String(this.nextId++);
    this.subscriptions.set(id, { payload: { query, variables }, next, error });
    if (this.acked) this.send({ id, type: "subscribe", payload: { query, variables } });
    return () => {
      if (this.subscriptions.delete(id) && this.acked) this.send({ id, type: "complete" });
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000, "bye");
  }

  connect() {
    this.acked = false;
    this.onState("connecting");
    const socket = new WebSocket(this.url, PROTOCOL);
    this.socket = socket;
    socket.onopen = () => this.send({ type: "connection_init", payload: { authorization: `Bearer ${this.token}` } });
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = (event) => {
      this.acked = false;
      if (this.closed) return;
      if (FATAL.has(event.code)) {
        this.onState("refused", event.reason || `closed with ${event.code}`);
        return;
      }
      // 0.5 s, 1 s, 2 s ... up to 15 s, with jitter so that many consoles do not return together.
      const delay = Math.min(15000, 500 * 2 ** this.attempt++) * (0.75 + Math.random() / 2);
      this.onState("offline", `retrying in ${Math.round(delay / 1000)} s`);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    const subscription = message.id && this.subscriptions.get(message.id);
    switch (message.type) {
      case "connection_ack":
        this.acked = true;
        this.attempt = 0;
        this.onState("live");
        for (const [id, { payload }] of this.subscriptions) this.send({ id, type: "subscribe", payload });
        break;
      case "ping":
        this.send({ type: "pong" });
        break;
      case "next":
        if (subscription) subscription.next(message.payload.data, message.payload.errors);
        break;
      case "error":
        if (subscription) {
          this.subscriptions.delete(message.id);
          subscription.error(message.payload);
        }
        break;
      case "complete":
        this.subscriptions.delete(message.id);
        break;
    }
  }
}

/** The WebSocket URL of /graphql on this page's host. */
export function liveUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/graphql`;
}
