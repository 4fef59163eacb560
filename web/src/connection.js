// One rtws protocol v1 session over a WebSocket (subprotocol rtws.v1.msgpack,
// binary frames), reopened with exponential backoff whenever it drops.
//
// The connection knows frames, not the page: it reports state changes and
// decoded server frames to callbacks, and `send(frame)` encodes a client frame.
// Frames are plain objects with a `type` field, exactly as in the protocol.
//
// Resume (docs/protocol.md): every server frame but `ready` is counted; the
// connection acks (`ack {received}`) at every `done` and every window/8 bytes
// (whenever it holds a resume token, or the server requires acks:
// `ready.limits.ack_required`, as rtws.ray does).
// When the socket drops without a close frame it reconnects at once and sends
// `hello {resume, received}`: the server replays what was lost, and the page
// sees one continuous stream of frames (`onState(CONNECTED, {resumed: true})`).
// A close frame from the server (restart, drain) ends the session: no resume.

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
  constructor(url, {
    token = () => null, onState, onFrame, onProtocolError, backoff = {},
    onResumed = () => {}, onResumeFailed = () => {},
  }) {
    this.onResumed = onResumed; // (ready) after a resume's replay: everything lost has arrived again
    this.onResumeFailed = onResumeFailed; // (error) the session is gone: live generations are lost
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
    this.received = 0; // frames of this session received (ready not counted)
    this.unacked = 0; // bytes received since the last ack
    this.resumeToken = null; // from the session's latest ready; null: nothing to resume
    this.replica = null; // ready.replica: the Ray Serve replica holding the session (offered when resuming)
    this.session = null; // the session id being resumed
    this.replayLeft = 0;
    this.resumes = 0;
    this.fresh = null;
    this.lostAt = null;
    this.resumeWindowS = 30;
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

  /** Ack what arrives: the session can be resumed, or the server requires acks (ready.limits.ack_required). */
  get acking() {
    return this.resumeToken !== null || Boolean(this.ready?.limits?.ack_required);
  }

  _ack() {
    this.unacked = 0;
    this.send({ type: "ack", received: this.received });
  }

  _open() {
    const resuming = this.resumeToken !== null;
    this._setState(State.CONNECTING, { attempt: this.attempt, resuming });
    let ws;
    try {
      // Behind rtws.ray's router, `rtws.replica.<id>` (never chosen by the server) sends a resuming
      // socket back to the replica that holds the session (docs/scale-out.md).
      const replica = resuming ? this.replica : null;
      ws = new WebSocket(this.url, replica ? [SUBPROTOCOL, `rtws.replica.${replica}`] : [SUBPROTOCOL]);
    } catch (err) {
      // A malformed URL throws synchronously; nothing will ever connect.
      this.onProtocolError(`cannot open ${this.url}: ${err.message}`);
      this._setState(State.STOPPED, {});
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      const token = this.token() ?? undefined;
      if (this.resumeToken !== null) {
        this.send({ type: "hello", token, resume: this.resumeToken, received: this.received });
      } else if (token) {
        this.send({ type: "hello", token });
      }
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
        if (this.resumeToken !== null && !frame.resumed) {
          // The server's fresh session (auth off: sent before it read our hello). The verdict on the
          // resume follows: a `ready {resumed}` of our old session, or `error {resume_failed}`.
          this.fresh = frame;
          return;
        }
        this.attempt = 0;
        this.lostAt = null;
        this.ready = frame;
        this.resumeToken = frame.resume_token ?? null;
        this.replica = frame.replica ?? null;
        this.resumeWindowS = frame.limits?.resume_window_s ?? 30;
        if (frame.resumed) {
          this.resumes += 1;
          this.replayLeft = frame.replay ?? 0;
        } else {
          this.received = 0;
          this.unacked = 0;
          if (this.resumeToken !== null) this._ack(); // opt in: the session can be resumed
        }
        this.session = frame.session;
        this._setState(State.CONNECTED, { ready: frame, resumed: Boolean(frame.resumed) });
        this.onFrame(frame);
        if (frame.resumed && this.replayLeft === 0) this.onResumed(frame);
        return;
      }
      this.received += 1;
      this.unacked += ev.data.byteLength;
      if (frame.type === "error" && frame.code === "resume_failed") {
        // A fresh session instead (the old one expired, or the server restarted): say so, go on with it.
        const fresh = this.fresh ?? null;
        this.fresh = null;
        this.resumeToken = null;
        this.received = 1;
        this.attempt = 0;
        this.onResumeFailed(frame);
        if (fresh !== null) {
          this.ready = fresh;
          this.resumeToken = fresh.resume_token ?? null;
          this.session = fresh.session;
          this._setState(State.CONNECTED, { ready: fresh, resumed: false });
          this.onFrame(fresh);
          if (this.resumeToken !== null) this._ack();
        }
        return;
      }
      this.onFrame(frame);
      const win = this.ready?.limits?.window;
      if (this.acking && (frame.type === "done" || (win && this.unacked >= win / 8))) {
        this._ack();
      }
      if (this.replayLeft > 0) {
        this.replayLeft -= 1;
        if (this.replayLeft === 0) this.onResumed(this.ready);
      }
    };
    // The browser reports a failed connect as `error` then `close`; only `close` matters.
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.ready = null;
      this.fresh = null;
      if (this.state === State.STOPPED) return;
      // A drop (no close frame) of a session that can be resumed: try at once, then back off, for as long
      // as the server holds it. A close frame means the server ended the session: start afresh.
      const windowMs = (this.resumeWindowS ?? 30) * 1000;
      // 1006: the socket went without a close frame (a network drop); any code the server sent ends it.
      if (ev.code !== 1006 || this.resumeToken === null) {
        this.resumeToken = null;
        this.lostAt = null;
      } else if (this.lostAt === null || this.lostAt === undefined) {
        this.lostAt = Date.now();
        this.attempt = 0;
      } else if (Date.now() - this.lostAt > windowMs) {
        this.resumeToken = null;
        this.lostAt = null;
      }
      const resuming = this.resumeToken !== null;
      const delay = resuming && this.attempt === 0 ? 0 : backoffDelay(this.attempt, this.backoff);
      this.attempt += 1;
      this.timer = setTimeout(() => this._open(), delay);
      this._setState(State.WAITING, { retryAt: Date.now() + delay, code: ev.code, reason: ev.reason, resuming });
    };
  }
}
