"""The browser demo served at GET /: Debian's Chromium, driven by Playwright, against a real server.

Skipped when /usr/bin/chromium or the playwright package is missing. The page's
WebSocket frames are decoded here too (msgpack), so the tests check what went
over the wire, not only what the page shows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.helpers.server import UNIT, RunningServer, ServerFactory

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
MS = 1000 * UNIT  # Playwright timeouts are in milliseconds


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def long_llama_dir(tiny_llama_long_dir: Path) -> Path:
    """The tiny Llama with an 8k context, so greedy decoding runs for seconds (long enough to stop it)."""
    return tiny_llama_long_dir


@pytest.fixture
def long_server(server_factory: ServerFactory, long_llama_dir: Path) -> RunningServer:
    return server_factory(long_llama_dir, num_slots=4, max_seq_len=4400)


@dataclass
class Watched:
    """A page plus everything it did: console errors, page errors, requests, WebSocket frames both ways."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    def frames(self, kind: str, direction: str = "received") -> list[dict[str, Any]]:
        return [f for f in getattr(self, direction) if f.get("type") == kind]

    def bad_console(self, allow_ws_failures: bool = False) -> list[str]:
        # While the server is down, Chromium itself logs each failed WebSocket connect as an error.
        return [m for m in self.console_errors
                if not (allow_ws_failures and re.search(r"WebSocket connection to '.*' failed", m))]


def _decode(payload: str | bytes) -> dict[str, Any]:
    assert isinstance(payload, bytes), "the demo must use binary (msgpack) frames"
    frame = msgspec.msgpack.decode(payload)
    assert isinstance(frame, dict)
    return frame


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    contexts: list[Any] = []

    def open_(server: RunningServer, width: int = 1280, height: int = 800, path: str = "/",
              connected: bool = True) -> Watched:
        ctx = browser.new_context(viewport={"width": width, "height": height})
        ctx.set_default_timeout(15 * MS)
        contexts.append(ctx)
        page = ctx.new_page()
        w = Watched(page)
        page.on("console", lambda m: w.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: w.page_errors.append(str(e)))
        page.on("request", lambda r: w.requests.append(r.url))

        def on_ws(ws: Any) -> None:
            ws.on("framesent", lambda payload: w.sent.append(_decode(payload)))
            ws.on("framereceived", lambda payload: w.received.append(_decode(payload)))

        page.on("websocket", on_ws)
        page.goto(server.http + path)
        if connected:
            expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        return w

    yield open_
    for ctx in contexts:
        ctx.close()


def _set_controls(page: Any, **values: str) -> None:
    ids = {"temperature": "#temperature", "top_p": "#top-p", "max_tokens": "#max-tokens", "stop": "#stop",
           "compare_temps": "#compare-temps"}
    for name, value in values.items():
        page.fill(ids[name], value)


def _send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def _longer_than(n: int) -> re.Pattern[str]:
    return re.compile(rf"^[\s\S]{{{n + 1},}}$")


def _after(frames: list[dict[str, Any]], gid: str, pred: Any) -> list[dict[str, Any]]:
    """Frames after the ``done`` of ``gid`` that satisfy ``pred``."""
    idx = next(i for i, f in enumerate(frames) if f.get("type") == "done" and f.get("id") == gid)
    return [f for f in frames[idx + 1:] if pred(f)]


def test_page_streams_a_reply_and_stop_ends_it(open_page: Any, long_server: RunningServer,
                                               long_llama_dir: Path) -> None:
    w = open_page(long_server)
    page = w.page
    expect(page.locator("#model")).to_have_text(long_llama_dir.name)  # the model named in ready
    expect(page.locator("#max-hint")).to_have_text("server max 4096")
    # The default chat stop sequence is visible and editable.
    assert page.input_value("#stop") == "\\n\\n"
    _set_controls(page, temperature="0", stop="", max_tokens="4000")

    # Shift+Enter is a new line, not a send.
    page.fill("#prompt", "But soft")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "what light?")
    assert page.input_value("#prompt") == "But soft\nwhat light?"
    assert page.locator(".turn").count() == 0
    page.press("#prompt", "Enter")

    reply = page.locator(".reply").nth(0)
    expect(reply.locator(".text")).to_have_text(_longer_than(40))
    expect(reply).to_have_attribute("data-state", "streaming")  # text arrived while it still runs
    expect(reply.locator(".ttft")).to_have_text(re.compile(r"TTFT \d+ ms"))
    expect(reply.locator(".rate")).to_have_text(re.compile(r"[\d.]+ tok/s"))
    expect(page.locator("#send")).to_be_disabled()
    page.click("#stop-btn")
    expect(reply).to_have_attribute("data-reason", "cancelled")
    expect(reply.locator(".reason")).to_have_text("stopped")
    expect(page.locator("#stop-btn")).to_be_disabled()
    first_text = reply.locator(".text").text_content()
    assert first_text

    # Second turn, stopped with Escape; the first exchange goes along as history.
    _send(page, "Speak on.")
    second = page.locator(".reply").nth(1)
    expect(second.locator(".text")).to_have_text(_longer_than(20))
    page.keyboard.press("Escape")
    expect(second).to_have_attribute("data-reason", "cancelled")
    expect(second.locator(".tokens")).to_have_text(re.compile(r"\d+ tokens · prompt \d+"))

    gens = w.frames("generate", "sent")
    assert len(gens) == 2
    assert gens[0]["messages"] == [{"role": "user", "content": "But soft\nwhat light?"}]
    assert gens[0]["temperature"] == 0 and gens[0]["max_tokens"] == 4000 and gens[0]["stop"] == []
    # The server holds the conversation: the second turn sends only its new line; the history, with the
    # stopped reply kept exactly as delivered (and marked truncated), is on the server.
    assert gens[1]["messages"] == [{"role": "user", "content": "Speak on."}]
    assert gens[0]["conversation"] == gens[1]["conversation"]
    (conn,) = list(long_server.app.connections)
    items = conn.session.conversations.get(gens[0]["conversation"]).items
    assert [(i.role, i.content, i.truncated) for i in items[:3]] == [
        ("user", "But soft\nwhat light?", False), ("assistant", first_text, True), ("user", "Speak on.", False)]
    assert [f["id"] for f in w.frames("cancel", "sent")] == [gens[0]["id"], gens[1]["id"]]
    for g in gens:
        # The server said "cancelled", and not one delta for it came after its done.
        done = [f for f in w.frames("done") if f["id"] == g["id"]]
        assert [d["reason"] for d in done] == ["cancelled"]
        assert _after(w.received, g["id"], lambda f, gid=g["id"]: f.get("id") == gid) == []
    # The page shows exactly what the server sent before done.
    deltas = "".join(f["text"] for f in w.frames("delta") if f["id"] == gens[0]["id"])
    assert reply.locator(".text").text_content() == first_text == deltas
    assert w.bad_console() == [] and w.page_errors == []
    origin = long_server.http + "/"
    assert w.requests and all(u.startswith(origin) for u in w.requests), w.requests


def test_compare_runs_three_streams_and_stops_one_alone(open_page: Any, long_server: RunningServer) -> None:
    w = open_page(long_server)
    page = w.page
    # The long model has no EOS token and there is no stop sequence: no column ends on its own.
    assert page.input_value("#compare-temps") == "0, 0.7, 1.2"
    _set_controls(page, stop="", max_tokens="4000")
    page.check("#compare")
    _send(page, "But soft, what light?")

    replies = page.locator(".reply")
    expect(replies).to_have_count(3)
    for i in range(3):
        expect(replies.nth(i).locator(".text")).to_have_text(_longer_than(20))
    for i in range(3):
        expect(replies.nth(i)).to_have_attribute("data-state", "streaming")  # all three at once
    replies.nth(1).locator(".stop-one").click()
    expect(replies.nth(1)).to_have_attribute("data-reason", "cancelled")
    # The other two go on: their text keeps growing after the middle one ended.
    for i in (0, 2):
        n = len(replies.nth(i).locator(".text").text_content() or "")
        expect(replies.nth(i).locator(".text")).to_have_text(_longer_than(n + 20))
        expect(replies.nth(i)).to_have_attribute("data-state", "streaming")
    page.keyboard.press("Escape")
    for i in (0, 2):
        expect(replies.nth(i)).to_have_attribute("data-reason", "cancelled")

    gens = w.frames("generate", "sent")
    ids = [g["id"] for g in gens]
    assert len(set(ids)) == 3 and [g["temperature"] for g in gens] == [0, 0.7, 1.2]
    assert all(g["messages"] == gens[0]["messages"] for g in gens)
    assert w.frames("cancel", "sent")[0]["id"] == ids[1]
    for other in (ids[0], ids[2]):
        assert _after(w.received, ids[1], lambda f, o=other: f.get("type") == "delta" and f.get("id") == o)
    for gid in ids:
        assert _after(w.received, gid, lambda f, g=gid: f.get("id") == g) == []

    # Pick the third reply for the history; the next turn carries it.
    keep = replies.nth(2).locator(".keep")
    expect(keep).to_have_text("Use in history")
    keep.click()
    expect(replies.nth(2)).to_have_class(re.compile(r"\bkept\b"))
    third_text = replies.nth(2).locator(".text").text_content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-demo-compare.png"))
    page.uncheck("#compare")
    _set_controls(page, max_tokens="4")
    _send(page, "Go on.")
    expect(page.locator(".reply").nth(3)).to_have_attribute("data-state", "done")
    last = w.frames("generate", "sent")[-1]
    assert last["messages"][1] == {"role": "assistant", "content": third_text}
    assert w.bad_console() == [] and w.page_errors == []


def test_reconnects_after_a_restart_and_shows_error_frames(
        open_page: Any, server_factory: ServerFactory, long_llama_dir: Path) -> None:
    first = server_factory(long_llama_dir, num_slots=4, max_seq_len=4400)
    w = open_page(first)
    page = w.page
    assert w.bad_console() == [] and w.page_errors == []
    _set_controls(page, temperature="0", stop="", max_tokens="4000")
    _send(page, "Hold, a moment.")
    reply = page.locator(".reply").nth(0)
    expect(reply.locator(".text")).to_have_text(_longer_than(10))

    port = first.port
    first.stop()
    # The reply in flight ends as lost; the indicator says offline, then reconnects on its own.
    expect(reply).to_have_attribute("data-reason", "lost")
    expect(page.locator("#status")).to_have_attribute("data-state", re.compile("offline|connecting"))
    expect(page.locator("#send")).to_be_disabled()
    second = server_factory(long_llama_dir, port=port, max_tokens_limit=5)
    expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=30 * MS)
    expect(page.locator("#max-hint")).to_have_text("server max 5")
    assert len(w.frames("ready")) == 2

    # An error frame (max_tokens above the new server's limit) is shown with its code and message.
    _set_controls(page, max_tokens="200")
    _send(page, "Speak.")
    failed = page.locator(".reply").nth(1)
    expect(failed).to_have_attribute("data-state", "error")
    err = failed.locator(".err")
    expect(err).to_be_visible()
    expect(err).to_have_text(re.compile(r"invalid_params: max_tokens must be <= 5"))
    assert [f["code"] for f in w.frames("error")] == ["invalid_params"]

    # The session still works: a request within the limit gets a reply.
    _set_controls(page, max_tokens="5")
    _send(page, "Speak.")
    ok = page.locator(".reply").nth(2)
    expect(ok).to_have_attribute("data-state", "done")
    expect(ok.locator(".tokens")).to_have_text(re.compile(r"[1-5] tokens? · prompt \d+"))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-demo-error.png"))
    assert w.page_errors == []
    assert w.bad_console(allow_ws_failures=True) == []
    second.stop()


def test_narrow_screen_fits_and_keeps_settings_folded(open_page: Any, tiny_server: RunningServer) -> None:
    w = open_page(tiny_server, width=390, height=800)
    page = w.page
    assert page.get_attribute("#settings", "open") is None
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.locator("#prompt")).to_be_in_viewport()
    expect(page.locator("#send")).to_be_in_viewport()
    page.click("#settings summary")
    _set_controls(page, max_tokens="8", compare_temps="0, 0.7, 1.2")
    page.check("#compare")
    _send(page, "Hello")
    for i in range(3):
        expect(page.locator(".reply").nth(i)).to_have_attribute("data-state", "done")
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-demo-narrow.png"))
    assert w.bad_console() == [] and w.page_errors == []


def test_api_key_goes_in_hello_and_a_bad_one_is_shown(open_page: Any, server_factory: ServerFactory,
                                                      tiny_llama_dir: Path) -> None:
    rs = server_factory(tiny_llama_dir, api_keys=("sekrit",))
    w = open_page(rs, path="/#token=wrong", connected=False)
    page = w.page
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner-text")).to_have_text(re.compile(r"unauthorized.*API key"))
    assert w.sent[0] == {"type": "hello", "token": "wrong"}
    # A corrected key in Settings is used at once, without waiting for the backoff.
    page.fill("#token", "sekrit")
    page.press("#token", "Tab")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert w.frames("hello", "sent")[-1] == {"type": "hello", "token": "sekrit"}  # (an ack follows: resume on)
    _set_controls(page, max_tokens="3")
    _send(page, "Hello")
    expect(page.locator(".reply").nth(0)).to_have_attribute("data-state", "done")
    assert w.page_errors == []


def test_committed_bundle_matches_the_source(tmp_path: Path) -> None:
    """rtws/static/ is what ``npm run build`` makes of web/ now (skipped without Node or node_modules)."""
    node = shutil.which("node")
    if node is None or not (ROOT / "web" / "node_modules" / "esbuild").is_dir():
        pytest.skip("needs node and `npm ci` in web/")
    subprocess.run([node, "build.mjs", "--out", str(tmp_path)], cwd=ROOT / "web", check=True, timeout=60 * UNIT)
    built = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in (ROOT / "rtws" / "static").iterdir()}
    assert set(built) == {"index.html", "app.js", "style.css"}
    assert built == committed, "rtws/static/ is stale: run `npm run build` in web/ and commit it"


def test_history_slides_when_the_conversation_outgrows_the_context(open_page: Any, server_factory: ServerFactory,
                                                                   long_llama_dir: Path) -> None:
    rs = server_factory(long_llama_dir, max_prompt_tokens=60)
    w = open_page(rs)
    page = w.page
    _set_controls(page, temperature="0", stop="", max_tokens="20")
    lines = ["First line.", "Second line.", "Third line.", "Fourth line."]
    for i, line in enumerate(lines):
        _send(page, line)
        expect(page.locator(".reply").nth(i)).to_have_attribute("data-state", "done")
    # The server holds the conversation: each turn sent only its new line, and when the history outgrew
    # the context the server dropped the oldest turns (done.dropped) instead of refusing the prompt.
    assert w.frames("error") == []
    gens = w.frames("generate", "sent")
    assert len({g["conversation"] for g in gens}) == 1
    assert [g["messages"] for g in gens] == [[{"role": "user", "content": line}] for line in lines]
    dones = w.frames("done")
    assert sum(d.get("dropped", 0) for d in dones) > 0
    expect(page.locator(".turn").nth(0)).to_have_class(re.compile(r"\bdropped\b"))
    assert page.locator(".reply[data-state=error]").count() == 0
    assert [d["reason"] for d in dones] == ["length"] * 4
    assert all(d["usage"]["prompt_tokens"] <= 60 for d in dones)


def _abort_server_side(server: RunningServer) -> None:
    """Drop every WebSocket of ``server`` the way a network does: the TCP connection goes, no close frame."""
    for conn in list(server.app.connections):
        proto = conn.send.__self__
        proto.loop.call_soon_threadsafe(proto.transport.abort)


def test_a_dropped_socket_resumes_mid_reply_with_nothing_lost_or_repeated(open_page: Any,
                                                                          long_server: RunningServer) -> None:
    from tests.helpers.server import run

    from rtws.client import Client

    async def reference() -> str:
        async with await Client.connect(long_server.url, resume=False) as c:
            s = await c.generate(messages=[{"role": "user", "content": "Hold, a moment."}], max_tokens=3000,
                                 temperature=0.0)
            return (await s.result()).text

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright's sync API owns this thread's loop
        expected = pool.submit(run, reference()).result()
    w = open_page(long_server)
    page = w.page
    _set_controls(page, temperature="0", stop="", max_tokens="3000")
    _send(page, "Hold, a moment.")
    reply = page.locator(".reply").nth(0)
    expect(reply.locator(".text")).to_have_text(_longer_than(30))
    expect(reply).to_have_attribute("data-state", "streaming")
    _abort_server_side(long_server)
    expect(page.locator("#status-text")).to_have_text("reconnected, resumed", timeout=20 * MS)
    expect(reply).to_have_attribute("data-state", "done", timeout=60 * MS)
    expect(reply).to_have_attribute("data-reason", "length")
    assert reply.locator(".text").text_content() == expected
    readies = w.frames("ready")
    assert len(readies) >= 2 and readies[-1]["resumed"] and readies[-1]["session"] == readies[0]["session"]
    hellos = [f for f in w.frames("hello", "sent") if "resume" in f]
    assert hellos and hellos[0]["resume"] == readies[0]["resume_token"]
    assert [d["id"] for d in w.frames("done")] == [reply.get_attribute("data-id")]  # exactly one done
    assert w.frames("ack", "sent"), "the page acks what it receives"
    # The next turn goes on in the same server-held conversation, sending only the new line.
    _set_controls(page, max_tokens="4")
    _send(page, "Go on.")
    expect(page.locator(".reply").nth(1)).to_have_attribute("data-state", "done")
    last = w.frames("generate", "sent")[-1]
    assert last["messages"] == [{"role": "user", "content": "Go on."}]
    assert last["conversation"] == w.frames("generate", "sent")[0]["conversation"]
    assert w.page_errors == [] and w.bad_console(allow_ws_failures=True) == []


def test_the_page_acks_when_the_server_requires_it(open_page: Any, server_factory: ServerFactory,
                                                   long_llama_dir: Path) -> None:
    """require_ack (rtws.ray's default) with resume off: no resume token, yet the page acks because
    ready.limits.ack_required says so. A page that did not would be paused at the (small) window and closed
    1008 after stall_timeout_s instead of finishing its reply."""
    server = server_factory(long_llama_dir, num_slots=4, max_seq_len=4400, require_ack=True, resume_window_s=0,
                            send_high_watermark=4096, stall_timeout_s=3.0)
    w = open_page(server)
    page = w.page
    (ready,) = w.frames("ready")
    assert ready["limits"]["ack_required"] is True and "resume_token" not in ready
    _set_controls(page, temperature="0", stop="", max_tokens="1500")
    _send(page, "Hold, a moment.")
    reply = page.locator(".reply").nth(0)
    expect(reply).to_have_attribute("data-state", "done", timeout=90 * MS)
    expect(reply).to_have_attribute("data-reason", "length")
    received = sum(1 for f in w.received if f.get("type") != "ready")
    acks = w.frames("ack", "sent")
    assert len(acks) >= 4, acks  # many windows' worth: acked every window/8 bytes and at the done
    assert acks[-1]["received"] == received, (acks[-1], received)
    assert page.locator("#status").get_attribute("data-state") == "connected"
    assert w.page_errors == [] and w.bad_console() == []
