"""Sessions that outlive their socket: resume tokens, held sessions, expiry.

Pure bookkeeping (no asyncio, no sockets, no torch): the ASGI layer calls
:meth:`SessionStore.hold` when a socket of an acking session drops uncleanly,
:meth:`SessionStore.claim` when a ``hello {resume}`` arrives, and
:meth:`SessionStore.expire` once per watchdog tick.

Tokens: every ``ready`` carries a fresh token of 192 random bits (URL-safe
base64); only its SHA-256 is kept. A token is bound to the API key (its key id)
that opened the session, and is spent by a successful resume (the resumed
``ready`` brings a new one). A spent or expired token is remembered (bounded)
so the refusal can say why; a token of another key is refused exactly like an
unknown one, so a token never tells anything about another key's sessions.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .hooks import Hooks

log = logging.getLogger("rtws.resume")

# Why a resume was refused. Metrics use these; clients see PUBLIC_REASON of them.
REASONS = ("off", "unknown", "other_key", "expired", "resumed", "gap", "codec", "not_first", "draining")
PUBLIC_REASON = {"other_key": "unknown"}
_MAX_SPENT = 4096
_TOKEN_BYTES = 24  # 192 bits


class Holdable(Protocol):
    """What the store needs of a session (``rtws.session.Session`` satisfies it)."""

    id: str

    def close(self) -> None: ...

    def resume_check(self, received: int, codec: str) -> str | None: ...


@dataclass(slots=True, eq=False)
class _Entry:
    session: Any
    key: str
    digest: bytes
    held_since: float | None = None  # monotonic time the socket dropped; None while attached
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of :meth:`SessionStore.claim`: a held session, or why not."""

    session: Any = None
    reason: str | None = None
    held_s: float = 0.0

    @property
    def public_reason(self) -> str:
        return PUBLIC_REASON.get(self.reason or "", self.reason or "")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class SessionStore:
    """Resume tokens of every live session, and the sessions held without a socket.

    ``window_s`` is how long a session is held after an unclean disconnect (0: resume off).
    """

    def __init__(self, window_s: float, hooks: Hooks | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.hooks = hooks or Hooks()
        self.clock = clock
        self._by_digest: dict[bytes, _Entry] = {}
        self._by_session: dict[int, _Entry] = {}
        self._spent: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self.deadline: float | None = None  # drain: nothing is held past this
        self.num_expired = 0
        self.num_resumed = 0

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    @property
    def num_held(self) -> int:
        """Sessions held without a socket right now."""
        return sum(1 for e in self._by_session.values() if e.held_since is not None)

    def held(self) -> list[Any]:
        return [e.session for e in self._by_session.values() if e.held_since is not None]

    # ------------------------------------------------------------------ tokens

    def issue(self, session: Holdable, key: str) -> str | None:
        """A new resume token for ``session`` (its previous one is spent). None when resume is off."""
        if not self.enabled:
            return None
        old = self._by_session.pop(id(session), None)
        if old is not None:
            self._by_digest.pop(old.digest, None)
            self._spend(old.digest, "resumed")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        entry = _Entry(session=session, key=key, digest=_digest(token))
        self._by_digest[entry.digest] = entry
        self._by_session[id(session)] = entry
        return token

    def _spend(self, digest: bytes, why: str) -> None:
        self._spent[digest] = why
        while len(self._spent) > _MAX_SPENT:
            self._spent.popitem(last=False)

    # ------------------------------------------------------------------ holding

    def hold(self, session: Holdable) -> bool:
        """The socket dropped uncleanly: keep ``session`` for ``window_s``. False when it cannot be held."""
        entry = self._by_session.get(id(session))
        if entry is None or not self.enabled:
            return False
        now = self.clock()
        expires = now + self.window_s
        if self.deadline is not None:
            expires = min(expires, self.deadline)
        entry.held_since, entry.expires = now, expires
        log.info("session held", extra={"event": "session_held", "session": session.id,
                                        "expires_in_s": round(expires - now, 3)})
        return True

    def discard(self, session: Holdable) -> None:
        """The session ended (clean close, expiry, server close): forget it and spend its token."""
        entry = self._by_session.pop(id(session), None)
        if entry is not None:
            self._by_digest.pop(entry.digest, None)
            self._spend(entry.digest, "expired")

    def claim(self, token: str, key: str, received: int, codec: str) -> Claim:
        """Find the session ``token`` resumes, for a client holding ``key`` that has ``received`` frames.

        On success the token is spent and the session is no longer counted as held (the caller
        attaches it and issues a new token with its ``ready``). A refusal changes nothing.
        """
        reason = self._refusal(token, key, received, codec)
        if reason is not None:
            self.hooks.resume_failed(reason)
            log.info("resume refused", extra={"event": "resume_failed", "reason": reason})
            return Claim(reason=reason)
        entry = self._by_digest.pop(_digest(token))
        self._spend(entry.digest, "resumed")
        held_s = 0.0 if entry.held_since is None else self.clock() - entry.held_since
        entry.held_since = entry.expires = None
        self.num_resumed += 1
        return Claim(session=entry.session, held_s=held_s)

    def _refusal(self, token: str, key: str, received: int, codec: str) -> str | None:
        if not self.enabled:
            return "off"
        if self.deadline is not None:
            return "draining"
        digest = _digest(token)
        entry = self._by_digest.get(digest)
        if entry is None:
            return self._spent.get(digest, "unknown")
        if not hmac.compare_digest(entry.key.encode(), key.encode()):
            return "other_key"
        if entry.expires is not None and self.clock() >= entry.expires:
            return "expired"
        reason: str | None = entry.session.resume_check(received, codec)
        return reason

    def resumed(self, session: Holdable, frames: int, nbytes: int, held_s: float) -> None:
        """Count and log one resume (called once the replay is queued)."""
        self.hooks.resumed(nbytes)
        log.info("session resumed", extra={"event": "resume", "session": session.id, "replayed_frames": frames,
                                           "replayed_bytes": nbytes, "held_ms": round(held_s * 1000.0, 3)})

    # ------------------------------------------------------------------ expiry and drain

    def expire(self, now: float | None = None) -> int:
        """Close every held session whose window has passed; return how many."""
        now = self.clock() if now is None else now
        gone = [e for e in self._by_session.values() if e.expires is not None and now >= e.expires]
        for e in gone:
            self.discard(e.session)
            e.session.close()
            self.num_expired += 1
            self.hooks.session_expired()
            log.info("held session expired", extra={"event": "session_expired", "session": e.session.id})
        return len(gone)

    def drain(self, deadline: float) -> None:
        """A graceful drain started: no session is held past ``deadline``, and no resume is accepted."""
        self.deadline = deadline
        for e in self._by_session.values():
            if e.expires is not None:
                e.expires = min(e.expires, deadline)

    def close_all(self) -> int:
        """Close every held session (drain end, shutdown)."""
        return self.expire(float("inf"))
