"""Hostile HTTP clients (issue 14): slowloris (6), rate-limit identity (9), Origin/Host (10), smaller ones (11).

Raw sockets where the attack needs them (partial headers, trickled bodies); every test asserts the bound.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.helpers.rawws import handshake, open_socket
from tests.helpers.server import UNIT, ServerFactory, run
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

KEY = "k-http-hostile"


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def closed_within(sock: socket.socket, timeout: float, trickle: bytes | None = None,
                  every: float = 0.3) -> float | None:
    """Seconds until the server closes ``sock`` (EOF/reset), optionally trickling ``trickle`` one byte at a time."""
    t0 = time.monotonic()
    i = 0
    sock.settimeout(every)
    while time.monotonic() - t0 < timeout:
        if trickle is not None and i < len(trickle):
            try:
                sock.send(trickle[i:i + 1])
            except OSError:
                return time.monotonic() - t0
            i += 1
        try:
            data = sock.recv(4096)
            if data == b"":
                return time.monotonic() - t0
            if data.startswith(b"HTTP/1.1 408"):
                continue  # the deadline answer; EOF follows
        except (TimeoutError, socket.timeout):
            continue
        except OSError:
            return time.monotonic() - t0
    return None


# --------------------------------------------------------------------------- 6: slowloris


def test_slowloris_headers_bodies_and_upgrades_hit_deadlines(server_factory: ServerFactory,
                                                             tiny_llama_dir: Path) -> None:
    """A silent connection, headers one byte at a time, a trickled WebSocket upgrade and a trickled body are
    all closed within their deadline (header_timeout_s / body_timeout_s) plus a margin (before: open > 75 s)."""
    server = server_factory(tiny_llama_dir, header_timeout_s=1.0 * UNIT, body_timeout_s=1.5 * UNIT)
    port = server.port
    silent = open_socket(port)
    headers = open_socket(port)
    upgrade = open_socket(port)
    body = open_socket(port)
    body.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{")
    t_silent = closed_within(silent, 10)
    t_headers = closed_within(headers, 10, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100)
    t_upgrade = closed_within(upgrade, 10,
                              b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n" + b"b" * 100)
    body.settimeout(10)
    answer = b""
    t0 = time.monotonic()
    try:
        while b"\r\n\r\n" not in answer:
            chunk = body.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError:
        pass
    t_body = time.monotonic() - t0
    status, _, _ = request(server.http + "/healthz")  # the server still serves
    for s in (silent, headers, upgrade, body):
        s.close()
    limit = 1.0 * UNIT + 2.0
    assert t_silent is not None and t_silent <= limit, t_silent
    assert t_headers is not None and t_headers <= limit, t_headers
    assert t_upgrade is not None and t_upgrade <= limit, t_upgrade
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert t_body <= 1.5 * UNIT + 2.0
    assert status == 200


def test_raw_connection_cap_refuses_floods_before_they_hold_descriptors(server_factory: ServerFactory,
                                                                        tiny_llama_dir: Path) -> None:
    """With max_raw_connections 10, ten silent sockets are the most the server holds: the 11th is dropped at once;
    once the header deadline closes the silent ones, real requests get through again."""
    server = server_factory(tiny_llama_dir, max_raw_connections=10, header_timeout_s=1.5 * UNIT)
    held = [open_socket(server.port) for _ in range(10)]
    time.sleep(0.3)
    extra = open_socket(server.port)
    t_extra = closed_within(extra, 3)
    time.sleep(1.5 * UNIT + 1.0)  # the header deadline frees the slots
    status, _, _ = request(server.http + "/healthz")
    for s in held + [extra]:
        s.close()
    assert t_extra is not None and t_extra < 1.0, t_extra
    assert status == 200


def test_per_address_cap(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, max_connections_per_address=3)
    held = [open_socket(server.port) for _ in range(3)]
    time.sleep(0.2)
    extra = open_socket(server.port)
    t_extra = closed_within(extra, 3)
    for s in held:
        s.close()
    time.sleep(0.3)
    status, _, _ = request(server.http + "/healthz")
    extra.close()
    assert t_extra is not None and t_extra < 1.0
    assert status == 200


# --------------------------------------------------------------------------- 9: rate-limit identity


def test_rate_limit_cannot_be_bypassed_with_tokens_or_forwarded_for(server_factory: ServerFactory,
                                                                   tiny_llama_dir: Path) -> None:
    """Auth off: a fresh random Bearer value or X-Forwarded-For per request shares the address's bucket
    (before: 15 of 15 accepted). Only a proxy listed in forwarded_allow_ips may name the client."""
    body = msgspec.json.encode({"prompt": "a", "max_tokens": 1, "stream": False})

    def burst(srv: Any, header: str) -> int:
        ok = 0
        for _ in range(15):
            h = {"content-type": "application/json"}
            if header == "bearer":
                h["authorization"] = "Bearer " + secrets.token_hex(8)
            elif header == "xff":
                h["x-forwarded-for"] = f"10.0.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
            status, _, _ = request(srv.http + "/infer", "POST", body, h)
            ok += status == 200
        return ok

    plain = server_factory(tiny_llama_dir, rate_limit_per_minute=60, rate_limit_burst=5)
    bearer, xff = burst(plain, "bearer"), burst(plain, "xff")
    trusted = server_factory(tiny_llama_dir, rate_limit_per_minute=60, rate_limit_burst=5,
                             forwarded_allow_ips=("127.0.0.1",))
    via_proxy = burst(trusted, "xff")
    assert bearer <= 6 and xff <= 6, (bearer, xff)  # the burst, plus at most one refill during the run
    assert via_proxy == 15  # the trusted proxy's X-Forwarded-For names distinct clients


def test_rate_limit_keys_on_verified_keys_with_auth_on(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    """With auth on, two valid keys have their own buckets; an invalid key is a 401, never a fresh bucket."""
    server = server_factory(tiny_llama_dir, api_keys=("ka", "kb"), rate_limit_per_minute=60, rate_limit_burst=3)
    body = msgspec.json.encode({"prompt": "a", "max_tokens": 1, "stream": False})

    def n_ok(key: str) -> list[int]:
        return [request(server.http + "/infer", "POST", body, {"authorization": f"Bearer {key}",
                                                               "content-type": "application/json"})[0]
                for _ in range(5)]

    a, b, bad = n_ok("ka"), n_ok("kb"), n_ok("nope")
    assert a.count(200) in (3, 4) and b.count(200) in (3, 4) and 429 in a and 429 in b
    assert bad == [401] * 5


# --------------------------------------------------------------------------- 10: Origin and Host


def test_origin_allow_list_covers_post_infer_and_host_check(server_factory: ServerFactory,
                                                            tiny_llama_dir: Path) -> None:
    """A foreign Origin cannot start a generation with a text/plain POST /infer (no CORS preflight needed);
    an allowed one can. With allowed_hosts set, a foreign Host header (DNS rebinding) is refused on HTTP and
    on the WebSocket upgrade."""
    server = server_factory(tiny_llama_dir, allowed_origins=("http://good.example",),
                            allowed_hosts=("127.0.0.1", "localhost"))
    started: list[str] = []
    hooks = server.app.hooks
    orig = hooks.generation_started
    def counting(model: str, transport: str) -> Any:
        started.append(transport)
        return orig(model, transport)

    hooks.generation_started = counting
    body = b'{"prompt": "a", "max_tokens": 2, "stream": false}'
    evil, _, evil_body = request(server.http + "/infer", "POST", body,
                                 {"content-type": "text/plain", "origin": "http://evil.example"})
    good, _, _ = request(server.http + "/infer", "POST", body,
                         {"content-type": "text/plain", "origin": "http://good.example"})
    chat_evil, _, _ = request(server.http + "/v1/chat/completions", "POST",
                              b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}',
                              {"content-type": "text/plain", "origin": "http://evil.example"})
    rebind, _, _ = request(server.http + "/healthz", headers={"host": "attacker.example"})
    local, _, _ = request(server.http + "/healthz", headers={"host": f"localhost:{server.port}"})
    ws_rebind = None
    try:
        s, ws_rebind, _ = handshake(server.port, headers={"Host": "attacker.example"})
        s.close()
    except OSError:
        pass
    hooks.generation_started = orig
    assert evil == 403 and b"origin" in evil_body
    assert chat_evil == 403
    assert good == 200
    assert started == ["http"]  # only the allowed origin's request reached an engine
    assert rebind == 421 and local == 200
    assert ws_rebind is not None and ws_rebind != 101


# --------------------------------------------------------------------------- 11: the smaller ones


def test_nul_path_method_errors_quiet_refusals_and_metrics_keys(server_factory: ServerFactory, tiny_llama_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(tiny_llama_dir, api_keys=(KEY,), metrics_api_keys=("m1",))
    with caplog.at_level(logging.INFO):
        s = open_socket(server.port)
        s.sendall(b"GET /app.js%00.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        s.settimeout(10)
        nul = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            nul += chunk
        s.close()
        get_infer, get_infer_h, _ = request(server.http + "/infer")

        async def refusals() -> int:
            n = 0
            for _ in range(60):
                try:
                    await connect(server.url, additional_headers={"Authorization": "Bearer wrong"})
                except InvalidStatus:
                    n += 1
            return n

        refused = run(refusals())
    m_none, _, _ = request(server.http + "/metrics")
    m_api, _, _ = request(server.http + "/metrics", headers={"authorization": f"Bearer {KEY}"})
    m_ok, _, m_body = request(server.http + "/metrics", headers={"authorization": "Bearer m1"})
    assert nul.startswith(b"HTTP/1.1 404"), nul[:60]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert get_infer == 405 and "POST" in get_infer_h.get("allow", "")
    assert refused == 60
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    refusal_lines = [r for r in caplog.records if getattr(r, "event", None) == "ws_refused"]
    assert len(refusal_lines) <= 12  # rate-limited: a burst, then about one a second
    assert m_none == 401 and m_api == 401 and m_ok == 200 and b"rtws_" in m_body


def test_metrics_follow_api_keys_when_no_metrics_key(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, api_keys=(KEY,))
    assert request(server.http + "/metrics")[0] == 401
    assert request(server.http + "/metrics", headers={"authorization": f"Bearer {KEY}"})[0] == 200
    open_server = server_factory(tiny_llama_dir)
    assert request(open_server.http + "/metrics")[0] == 200


