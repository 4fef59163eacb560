// One rtws protocol v1 session over a WebSocket (subprotocol rtws.v1.msgpack,
// binary frames), reopened with exponential backoff whenever it drops.
//
// The connection knows frames, not the page: it reports state changes and
// decoded server frames to callbacks, and `send(frame)` encodes a client frame.
// Frames are plain objects with a `type` field, exactly as in the protocol.

import { decode, encode } from "@msgpack/msgpack";

export const SUBPROTOCOL = "rtws.v1.msgpack";

/** Connection states, in the order a healthy connection goes through them. */
export const State = Object.freeze({
  CONNECTING: "connecting", // socket opening, or waiting for `ready`
  CONNECTED: "connected", // `ready` received: generate frames are accepted
  WAITING: "waiting", // closed; a reconnect is scheduled (see `retryAt`)
  STOPPED: "stopped", // close() was called: no reconnect
});

/** Delay before reconnect attempt `attempt` (0-based): exponential, capped, with jitter in [base/2, base]. */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 8000, factor = 2 } = {}, random = Math.random) {
  const base = Math.min(maxMs, initialMs * factor ** attempt);
  return Math.round(base / 2 + (random() * base) / 2);
}

/** The default WebSocket URL: `/ws` on the page's own host, or `?server=ws://...` when given. */
export function defaultUrl(loc = window.location) {
  const override = new URLSearchParams(loc.search).get("server");
  if (override) return override;
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/ws`;
}

export class Connection {
  /**
   * @param {string} url WebSocket URL (ws:// or wss://, path /ws).
   * @param {object} opts
   * @param {() => (string|null)} [opts.token] returns the API key to send in `hello` (or null).
   * @param {(state: string, info: object) => void} opts.onState state changes; info has
   *   `ready` (the ready frame) when CONNECTED, `retryAt` (ms epoch) and `code` when WAITING.
   * @param {(frame: object) => void} opts.onFrame every decoded server frame, `ready` included.
   * @param {(message: string) => void} opts.onProtocolError a frame that could not be decoded.
   * @param {object} [opts.backoff] {initialMs, maxMs, factor}.
   */
  constructor(url, { token = () => null, onState, onFrame, onProtocolError, backoff = {} }) {
    this.url = url;
    this.token = token;
    this.onState = onState;
    this.onFrame = onFrame;
    this.onProtocolError = onProtocolError;
    this.backoff = backoff;
    this.ws = null;
    this.ready = null;
    this.state = State.STOPPED;
    this.attempt = 0;
    this.timer = null;
  }

  get connected() {
    return this.state === State.CONNECTED;
  }

  /** Open the socket (no-op while one is open or opening). */
  start() {
    if (this.ws !== null) return;
    clearTimeout(this.timer);
    this.timer = null;
    this._open();
  }

  /** Reconnect now instead of waiting for the backoff timer. */
  retryNow() {
    if (this.state === State.WAITING) this.start();
  }

  /** Close for good (no reconnect). */
  close() {
    this._setState(State.STOPPED, {});
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
  }

  /** Encode and send one client frame. Returns false when the socket is not open. */
  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(encode(frame, { ignoreUndefined: true }));
    return true;
  }

  _setState(state, info) {
    this.state = state;
    this.onState(state, info);
  }

  _open() {
    this._setState(State.CONNECTING, { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url, [SUBPROTOCOL]);
    } catch (err) {
      // A malformed URL throws synchronously; nothing will ever connect.
      this.onProtocolError(`cannot open ${this.url}: ${err.message}`);
      this._setState(State.STOPPED, {});
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const token = this.token();
      if (token) this.send({ type: "hello", token });
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      if (typeof ev.data === "string") {
        this.onProtocolError("the server sent a text frame on a msgpack session");
        return;
      }
      let frame;
      try {
        frame = decode(new Uint8Array(ev.data));
      } catch (err) {
        this.onProtocolError(`undecodable frame: ${err.message}`);
        return;
      }
      if (frame === null || typeof frame !== "object" || typeof frame.type !== "string") {
        this.onProtocolError("frame without a type");
        return;
      }
      if (frame.type === "ready") {
        this.attempt = 0;
        this.ready = frame;
        this._setState(State.CONNECTED, { ready: frame });
      }
      this.onFrame(frame);
    };
    // The browser reports a failed connect as `error` then `close`; only `close` matters.
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.ready = null;
      if (this.state === State.STOPPED) return;
      const delay = backoffDelay(this.attempt, this.backoff);
      this.attempt += 1;
      this.timer = setTimeout(() => this._open(), delay);
      this._setState(State.WAITING, { retryAt: Date.now() + delay, code: ev.code, reason: ev.reason });
    };
  }
}
