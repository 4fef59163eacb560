"""API-key checks shared by the WebSocket session, the HTTP API and the admin API. Pure."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def key_ok(token: str, keys: Iterable[str]) -> bool:
    """True when ``token`` equals one of ``keys``; compares against every key in constant time."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(token.encode(), k.encode())
    return ok


def key_id(token: str) -> str:
    """A stable, non-reversible label for a key (rate-limit buckets, logs): never log the key itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]
