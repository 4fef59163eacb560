"""rtws.session_store: tokens, key binding, spending, expiry, drain (fake clock, fake sessions)."""

from __future__ import annotations

from typing import Any

from rtws.hooks import Hooks
from rtws.session_store import SessionStore


class FakeSession:
    def __init__(self, sid: str) -> None:
        self.id = sid
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def resume_check(self, received: int, codec: str) -> str | None:
        return None if received >= 0 else "gap"


class Counting(Hooks):
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.expired = 0
        self.bytes = 0

    def resume_failed(self, reason: str) -> None:
        self.failed.append(reason)

    def session_expired(self) -> None:
        self.expired += 1

    def resumed(self, nbytes: int) -> None:
        self.bytes += nbytes


def make() -> tuple[SessionStore, list[float], Counting]:
    now = [100.0]
    hooks = Counting()
    return SessionStore(30.0, hooks, clock=lambda: now[0]), now, hooks


def test_tokens_are_long_random_bound_to_the_key_and_spent_by_a_resume() -> None:
    st, now, hooks = make()
    a, b = FakeSession("a"), FakeSession("b")
    ta = st.issue(a, "key1")
    tb = st.issue(b, "key2")
    assert ta and tb and ta != tb and len(ta) >= 32  # 192 bits, base64
    assert st.hold(a) and st.num_held == 1
    assert st.claim(tb[:-1] + ("A" if tb[-1] != "A" else "B"), "key2", 0, "m").reason == "unknown"
    assert st.claim(ta, "key2", 0, "m").reason == "other_key"
    assert st.claim(ta, "key2", 0, "m").public_reason == "unknown"  # indistinguishable from a random token
    claim = st.claim(ta, "key1", 0, "m")
    assert claim.session is a and claim.reason is None and st.num_held == 0
    assert st.claim(ta, "key1", 0, "m").reason == "resumed"  # spent
    ta2 = st.issue(a, "key1")
    assert ta2 and ta2 != ta and st.claim(ta2, "key1", -1, "m").reason == "gap"
    assert hooks.failed == ["unknown", "other_key", "other_key", "resumed", "gap"]


def test_held_sessions_expire_after_the_window_and_drain_caps_it() -> None:
    st, now, hooks = make()
    a, b = FakeSession("a"), FakeSession("b")
    ta = st.issue(a, "")
    st.issue(b, "")
    st.hold(a)
    now[0] += 29.0
    assert st.expire() == 0 and not a.closed
    now[0] += 1.5
    assert st.expire() == 1 and a.closed and hooks.expired == 1
    assert ta is not None and st.claim(ta, "", 0, "m").reason == "expired"
    st.hold(b)
    st.drain(now[0] + 2.0)
    assert st.claim("x", "", 0, "m").reason == "draining"
    now[0] += 2.0
    assert st.expire() == 1 and b.closed and st.num_held == 0


def test_resume_off_issues_no_token() -> None:
    st = SessionStore(0.0)
    s: Any = FakeSession("a")
    assert st.issue(s, "") is None and not st.hold(s) and st.claim("t", "", 0, "m").reason == "off"
