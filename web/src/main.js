// The chat page: conversation, compare mode, sampling controls, live stats.
//
// State lives in one `App` object. Server frames arrive through Connection
// callbacks; text is appended to the DOM once per animation frame, and at once
// when a generation ends, so nothing is drawn for a generation after its `done`.
//
// The conversation is held by the server (`generate {conversation}`): a turn
// sends only the new line. The page keeps its own copy of the turns and sends
// the whole history once, under a new conversation id, whenever the server's
// copy may differ (a new session, compare mode, a reply picked by hand).
// After a dropped connection the session is resumed and replies go on.

import { Connection, State, defaultUrl } from "./connection.js";
import { DEFAULTS, formatMs, readSettings, tokensPerSecond } from "./settings.js";

const STORAGE_KEY = "rtws.demo.settings.v1";
const REASON_LABEL = {
  stop: "finished",
  length: "max tokens",
  cancelled: "stopped",
  timeout: "timed out",
  error: "error",
  lost: "connection lost",
};

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function now() {
  return performance.now();
}

/** One generation: its DOM, its text, its timings. */
class Reply {
  constructor(app, turn, id, label) {
    this.app = app;
    this.turn = turn;
    this.id = id;
    this.text = "";
    this.pending = "";
    this.tokens = 0;
    this.firstTokens = 0;
    this.sentAt = now();
    this.firstAt = null;
    this.lastAt = null;
    this.usage = null;
    this.reason = null;
    this.state = "waiting";

    this.el = el("article", "reply");
    this.el.dataset.id = id;
    const head = el("header", "reply-head");
    head.append(el("span", "label", label));
    this.reasonEl = el("span", "reason");
    head.append(this.reasonEl, el("span", "spacer"));
    this.keepBtn = el("button", "keep", "Use in history");
    this.keepBtn.type = "button";
    this.keepBtn.hidden = true;
    this.keepBtn.addEventListener("click", () => turn.keep(this));
    this.stopBtn = el("button", "stop-one", "Stop");
    this.stopBtn.type = "button";
    this.stopBtn.title = "stop this generation";
    this.stopBtn.addEventListener("click", () => app.stop(this));
    head.append(this.keepBtn, this.stopBtn);
    this.textEl = el("div", "text");
    this.textNode = document.createTextNode("");
    this.textEl.append(this.textNode);
    this.errEl = el("div", "err");
    this.errEl.hidden = true;
    const stats = el("footer", "stats");
    this.statsEl = stats;
    this.ttftEl = el("span", "ttft", "TTFT –");
    this.rateEl = el("span", "rate", "– tok/s");
    this.tokensEl = el("span", "tokens", "0 tokens");
    stats.append(this.ttftEl, this.rateEl, this.tokensEl);
    this.el.append(head, this.textEl, this.errEl, stats);
    this._setState("waiting");
  }

  get live() {
    return this.state === "waiting" || this.state === "streaming" || this.state === "stopping";
  }

  /** Usable as the assistant turn in the history: ended normally or by Stop, with some text. */
  get usable() {
    return this.state === "done" && this.reason !== "error" && this.text.length > 0;
  }

  _setState(state) {
    this.state = state;
    this.el.dataset.state = state;
    this.stopBtn.hidden = !this.live;
  }

  onDelta(frame) {
    const t = now();
    if (this.firstAt === null) {
      this.firstAt = t;
      this.firstTokens = frame.tokens;
    }
    this.lastAt = t;
    this.tokens += frame.tokens;
    this.text += frame.text;
    this.pending += frame.text;
    if (this.state === "waiting") this._setState("streaming");
    this.app.scheduleRender(this);
  }

  onDone(frame) {
    this.usage = frame.usage;
    this.reason = frame.reason;
    if (frame.usage) this.tokens = frame.usage.completion_tokens;
    this._end(frame.reason);
  }

  onError(code, message) {
    this.reason = "error";
    this.errEl.textContent = `${code}: ${message}`;
    this.errEl.hidden = false;
    if (!this.text) {
      // Rejected before any token: the error is the whole reply.
      this.textEl.hidden = true;
      this.statsEl.hidden = true;
    }
    this._end("error", "error");
  }

  _end(reason, state = "done") {
    this._setState(state);
    this.el.dataset.reason = reason;
    this.reasonEl.textContent = REASON_LABEL[reason] ?? reason;
    this.reasonEl.dataset.reason = reason;
    this.render();
    this.turn.update();
  }

  /** Append pending text and refresh the stats (called once per animation frame). */
  render() {
    if (this.pending) {
      this.textNode.appendData(this.pending);
      this.pending = "";
    }
    this.ttftEl.textContent = `TTFT ${formatMs(this.firstAt === null ? null : this.firstAt - this.sentAt)}`;
    const rate = tokensPerSecond(this);
    this.rateEl.textContent = rate === null ? "– tok/s" : `${rate.toFixed(1)} tok/s`;
    let tokens = `${this.tokens} token${this.tokens === 1 ? "" : "s"}`;
    if (this.usage) tokens += ` · prompt ${this.usage.prompt_tokens}`;
    this.tokensEl.textContent = tokens;
  }
}

/** One user message and the replies generated for it (one, or several in compare mode). */
class Turn {
  constructor(app, text, compare) {
    this.app = app;
    this.text = text;
    this.replies = [];
    this.kept = null;
    this.el = el("div", "turn");
    const user = el("div", "msg user");
    user.append(el("div", "who", "You"), el("div", "text", text));
    this.repliesEl = el("div", compare ? "replies compare" : "replies");
    this.el.append(user, this.repliesEl);
  }

  add(reply) {
    this.replies.push(reply);
    this.repliesEl.append(reply.el);
  }

  /** The reply that goes into the history: the one picked, else the first usable one. */
  get chosen() {
    if (this.kept && this.kept.usable) return this.kept;
    return this.replies.find((r) => r.usable) ?? null;
  }

  keep(reply) {
    this.kept = reply;
    this.app.synced = false; // the server holds another reply for this turn
    this.update();
  }

  update() {
    const chosen = this.chosen;
    const ended = this.replies.every((r) => !r.live);
    const several = this.replies.length > 1;
    for (const r of this.replies) {
      const isChosen = several && r === chosen;
      r.el.classList.toggle("kept", isChosen);
      r.keepBtn.hidden = !(ended && several && r.usable);
      r.keepBtn.disabled = isChosen;
      r.keepBtn.textContent = isChosen ? "✓ in history" : "Use in history";
    }
  }
}

class App {
  constructor() {
    this.turns = [];
    this.contextStart = 0; // index of the oldest turn still sent as history
    this.live = new Map();
    this.dirty = new Set();
    this.renderQueued = false;
    this.nextId = 1;
    this.ready = null;
    this.model = null;
    this.convSeq = 0;
    this.conversation = null; // the server-held conversation of this session, or null
    this.synced = false; // the server's conversation equals this page's history
    this.inputs = {
      temperature: $("temperature"),
      topP: $("top-p"),
      maxTokens: $("max-tokens"),
      stop: $("stop"),
      compareTemps: $("compare-temps"),
      token: $("token"),
    };
    this.loadSettings();
    this.bind();
    this.conn = new Connection(defaultUrl(), {
      token: () => this.token(),
      onState: (state, info) => this.onState(state, info),
      onFrame: (frame) => this.onFrame(frame),
      onProtocolError: (msg) => this.banner(`protocol error: ${msg}`),
      onResumed: (ready) => this.onResumed(ready),
      onResumeFailed: (err) => this.onResumeFailed(err),
    });
    this.updateButtons();
    this.conn.start();
  }

  // ---------------------------------------------------------------- settings

  loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}") ?? {};
    } catch {
      saved = {};
    }
    for (const [key, input] of Object.entries(this.inputs)) {
      input.value = typeof saved[key] === "string" ? saved[key] : DEFAULTS[key];
    }
    $("compare").checked = saved.compare === true;
    const hashToken = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (hashToken) this.inputs.token.value = hashToken;
    this.syncRanges();
  }

  saveSettings() {
    const data = { compare: $("compare").checked };
    for (const [key, input] of Object.entries(this.inputs)) data[key] = input.value;
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(data));
    } catch {
      // Storage may be unavailable (private mode); settings then last for this page only.
    }
  }

  syncRanges() {
    $("temperature-range").value = this.inputs.temperature.value;
    $("top-p-range").value = this.inputs.topP.value;
  }

  token() {
    return this.inputs.token.value.trim() || null;
  }

  // ---------------------------------------------------------------- events

  bind() {
    const prompt = $("prompt");
    prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.send();
      }
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && this.live.size > 0) {
        ev.preventDefault();
        this.stopAll();
      }
    });
    $("send").addEventListener("click", () => this.send());
    $("stop-btn").addEventListener("click", () => this.stopAll());
    $("reset").addEventListener("click", () => this.reset());
    $("defaults").addEventListener("click", () => {
      for (const [key, input] of Object.entries(this.inputs)) if (key !== "token") input.value = DEFAULTS[key];
      this.syncRanges();
      this.saveSettings();
    });
    $("banner-close").addEventListener("click", () => this.hideBanner());
    $("status").addEventListener("click", () => this.conn.retryNow());
    $("temperature-range").addEventListener("input", (ev) => {
      this.inputs.temperature.value = ev.target.value;
    });
    $("top-p-range").addEventListener("input", (ev) => {
      this.inputs.topP.value = ev.target.value;
    });
    const form = $("settings-form");
    form.addEventListener("input", () => {
      this.syncRanges();
      this.saveSettings();
    });
    form.addEventListener("submit", (ev) => ev.preventDefault());
    $("compare").addEventListener("change", () => this.saveSettings());
    // A new API key takes effect on the next connection: try it now rather than at the next backoff.
    this.inputs.token.addEventListener("change", () => this.conn.retryNow());
    // Keep settings reachable but out of the way on a phone.
    if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;
  }

  onState(state, info) {
    const status = $("status");
    const text = $("status-text");
    clearInterval(this.countdown);
    if (state === State.CONNECTED) {
      status.dataset.state = "connected";
      text.textContent = info.resumed ? "reconnected, resumed" : "connected";
    } else if (state === State.CONNECTING) {
      status.dataset.state = "connecting";
      text.textContent = info.resuming ? "connection lost · resuming…" : info.attempt ? "reconnecting…" : "connecting…";
    } else if (state === State.WAITING && info.resuming) {
      // Dropped, but the server holds the session: live replies wait for the resume.
      status.dataset.state = "connecting";
      text.textContent = "connection lost · resuming…";
    } else if (state === State.WAITING) {
      status.dataset.state = "offline";
      const tick = () => {
        const s = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
        text.textContent = `offline · retry in ${s} s`;
      };
      tick();
      this.countdown = setInterval(tick, 500);
      this.loseAll();
      if (info.code === 1008) {
        // Policy close: a bad or missing API key, a stalled reader, a refused origin.
        const why = info.reason || "policy violation";
        const hint = /auth/i.test(why) ? " (set the API key in Settings)" : "";
        this.banner(`the server closed the connection: ${why}${hint}`);
      }
    } else {
      status.dataset.state = "offline";
      text.textContent = "disconnected";
      this.loseAll();
    }
    this.updateButtons();
  }

  onFrame(f) {
    switch (f.type) {
      case "ready":
        this.onReady(f);
        break;
      case "delta": {
        const r = this.live.get(f.id);
        if (r) r.onDelta(f);
        break;
      }
      case "done": {
        const r = this.live.get(f.id);
        if (r) {
          this.live.delete(f.id);
          r.onDone(f);
          if (r.frame.conversation !== undefined && r.frame.conversation === this.conversation) {
            if (f.dropped > 0) this.markDropped(f.dropped, r.turn.index);
            // The server appended the reply as delivered; one the page leaves out of its own history
            // (empty, failed) makes the copies differ: the next turn then starts a new conversation.
            this.synced = r.usable;
          }
          this.updateButtons();
        }
        break;
      }
      case "error": {
        const r = f.id === undefined || f.id === null ? undefined : this.live.get(f.id);
        const retry = typeof f.retry_after === "number" ? ` (retry in ${f.retry_after.toFixed(1)} s)` : "";
        if (r) {
          this.live.delete(f.id);
          const tooLong = f.code === "invalid_params" && /^prompt is \d+ tokens/.test(f.message) &&
            r.frame.conversation === undefined;
          if (!(tooLong && this.retryShorter(r))) r.onError(f.code, f.message + retry);
          this.updateButtons();
        } else {
          this.banner(`${f.code}: ${f.message}${retry}`);
        }
        break;
      }
      default:
        // Frames of later protocol versions: ignore, as the protocol asks of clients.
        break;
    }
  }

  onReady(ready) {
    this.ready = ready;
    if (!ready.resumed) {
      // A new session holds no conversation: the next turn sends the whole history.
      this.conversation = null;
      this.synced = false;
    }
    const models = Array.isArray(ready.models) ? ready.models : [];
    const box = $("model");
    box.replaceChildren();
    if (models.length > 1) {
      const select = el("select");
      select.setAttribute("aria-label", "model");
      for (const name of models) select.append(el("option", "", name));
      if (this.model && models.includes(this.model)) select.value = this.model;
      this.model = select.value;
      select.addEventListener("change", () => {
        this.model = select.value;
      });
      box.append(select);
    } else {
      this.model = null; // the server's default
      box.textContent = models[0] ?? "";
    }
    const max = ready.limits?.max_tokens;
    $("max-hint").textContent = typeof max === "number" ? `server max ${max}` : "";
  }

  /** A resume's replay is done: send again what never reached the server (not in `ready.live`). */
  onResumed(ready) {
    const known = new Set(Array.isArray(ready.live) ? ready.live : []);
    for (const [id, reply] of this.live) {
      if (!known.has(id)) this.conn.send(reply.frame);
      else if (reply.state === "stopping") this.conn.send({ type: "cancel", id });
    }
  }

  onResumeFailed(err) {
    this.loseAll();
    this.banner(`the connection dropped and the session could not be resumed (${err.reason ?? err.message})`);
  }

  /** Start a new server-held conversation (forgetting the previous one). */
  newConversation() {
    if (this.conversation !== null) this.conn.send({ type: "forget", conversation: this.conversation });
    this.convSeq += 1;
    this.conversation = `web-${this.convSeq}`;
    this.synced = false;
  }

  /** The server dropped the `n` oldest turns of the conversation to fit the context: show it. */
  markDropped(n, upTo) {
    let exchanges = Math.ceil(n / 2);
    while (exchanges > 0 && this.contextStart < upTo) {
      const dropped = this.turns[this.contextStart];
      dropped.el.classList.add("dropped");
      dropped.el.title = "no longer sent to the model: the conversation outgrew its context";
      this.contextStart += 1;
      if (dropped.chosen) exchanges -= 1;
    }
  }

  // ---------------------------------------------------------------- actions

  /**
   * The conversation before turn `upTo` as protocol `messages`, from the first turn still in the
   * model's context (`contextStart`); turns without a usable reply are left out.
   */
  history(upTo) {
    const messages = [];
    for (const turn of this.turns.slice(this.contextStart, upTo)) {
      const reply = turn.chosen;
      if (!reply) continue;
      messages.push({ role: "user", content: turn.text }, { role: "assistant", content: reply.text });
    }
    return messages;
  }

  send() {
    const prompt = $("prompt");
    const text = prompt.value.trim();
    if (!text || this.live.size > 0) return;
    if (!this.conn.connected) {
      this.banner("not connected: waiting for the server");
      return;
    }
    let s;
    try {
      const raw = Object.fromEntries(Object.entries(this.inputs).map(([k, i]) => [k, i.value]));
      s = readSettings({ ...raw, compare: $("compare").checked });
    } catch (err) {
      this.banner(`settings: ${err.message}`);
      return;
    }
    this.hideBanner();
    const compare = $("compare").checked;
    const turn = new Turn(this, text, compare);
    turn.index = this.turns.length;
    let messages;
    let conversation;
    if (compare) {
      // Several replies for one turn: sent as plain messages; the server's copy is no longer ours.
      messages = this.messagesFor(turn);
      this.synced = false;
    } else {
      if (!this.synced) {
        this.newConversation();
        messages = this.messagesFor(turn);
      } else {
        messages = [{ role: "user", content: text }];
      }
      conversation = this.conversation;
    }
    this.turns.push(turn);
    $("empty").hidden = true;
    $("chat").append(turn.el);
    const temps = compare ? s.compareTemps : [s.temperature];
    for (const temperature of temps) {
      const id = `g${this.nextId++}`;
      const reply = new Reply(this, turn, id, `T ${temperature}`);
      turn.add(reply);
      this.live.set(id, reply);
      reply.contextStart = this.contextStart;
      reply.frame = {
        type: "generate",
        id,
        messages,
        conversation,
        model: this.model ?? undefined,
        max_tokens: s.max_tokens,
        temperature,
        top_p: s.top_p,
        stop: s.stop,
      };
      this.conn.send(reply.frame);
    }
    prompt.value = "";
    this.scrollToEnd(true);
    this.updateButtons();
  }

  messagesFor(turn) {
    return [...this.history(turn.index), { role: "user", content: turn.text }];
  }

  /**
   * A `generate` rejected because the prompt is longer than the model accepts: drop the oldest
   * turn still in context and send it again. Returns false when nothing is left to drop.
   */
  retryShorter(reply) {
    const turn = reply.turn;
    if (reply.contextStart === this.contextStart) {
      if (this.contextStart >= turn.index) return false;
      const dropped = this.turns[this.contextStart];
      dropped.el.classList.add("dropped");
      dropped.el.title = "no longer sent to the model: the conversation outgrew its context";
      this.contextStart += 1;
    }
    const id = `g${this.nextId++}`;
    reply.id = id;
    reply.el.dataset.id = id;
    reply.contextStart = this.contextStart;
    reply.frame = { ...reply.frame, id, messages: this.messagesFor(turn) };
    this.live.set(id, reply);
    if (this.conn.send(reply.frame)) return true;
    this.live.delete(id);
    return false;
  }

  /** Ask the server to stop one generation; its `done {reason: cancelled}` ends it on the page. */
  stop(reply) {
    if (!reply.live || reply.state === "stopping") return;
    if (this.conn.send({ type: "cancel", id: reply.id })) {
      reply._setState("stopping");
      reply.stopBtn.hidden = true;
    }
  }

  stopAll() {
    for (const reply of this.live.values()) this.stop(reply);
  }

  /** The socket closed: live generations are over (the server cancels them). */
  loseAll() {
    for (const reply of this.live.values()) reply._end("lost", "done");
    this.live.clear();
    this.updateButtons();
  }

  reset() {
    this.stopAll();
    for (const reply of this.live.values()) reply._end("cancelled", "done");
    this.live.clear();
    this.turns = [];
    this.contextStart = 0;
    if (this.conn.connected && this.conversation !== null) this.conn.send({ type: "forget", conversation: this.conversation });
    this.conversation = null;
    this.synced = false;
    for (const node of [...$("chat").children]) if (node.id !== "empty") node.remove();
    $("empty").hidden = false;
    this.updateButtons();
    $("prompt").focus();
  }

  updateButtons() {
    const busy = this.live.size > 0;
    $("send").disabled = busy || !this.conn?.connected;
    $("stop-btn").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  banner(text) {
    $("banner-text").textContent = text;
    $("banner").hidden = false;
  }

  hideBanner() {
    $("banner").hidden = true;
  }

  // ---------------------------------------------------------------- drawing

  scheduleRender(reply) {
    this.dirty.add(reply);
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      const stick = this.nearEnd();
      for (const r of this.dirty) r.render();
      this.dirty.clear();
      if (stick) this.scrollToEnd();
    });
  }

  nearEnd() {
    const chat = $("chat");
    return chat.scrollHeight - chat.scrollTop - chat.clientHeight < 48;
  }

  scrollToEnd(force = false) {
    const chat = $("chat");
    if (force || this.nearEnd()) chat.scrollTop = chat.scrollHeight;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  window.rtwsApp = new App();
});
