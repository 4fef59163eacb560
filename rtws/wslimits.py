"""Limits rtws enforces on its own WebSocket receive path, whatever host runs the ASGI app. Pure.

uvicorn (``rtws serve``) already refuses frames above ``ws_max_size`` with close
1009, but other hosts do not apply rtws's settings: Ray Serve's proxy runs its
own uvicorn with the defaults (16 MiB frames, 20 s pings, permessage-deflate),
so an oversized frame would reach the session. The check here makes the limit
hold behind any proxy.
"""

from __future__ import annotations

CLOSE_TOO_BIG = 1009


def frame_too_big(frame: bytes | str, limit: int) -> bool:
    """True when ``frame`` is larger than ``limit`` bytes (text frames count their UTF-8 length).

    Cheap on the hot path: a text frame is only encoded when its character
    count alone cannot decide (UTF-8 is 1 to 4 bytes a character).
    """
    n = len(frame)
    if isinstance(frame, bytes):
        return n > limit
    if n > limit:
        return True
    if n * 4 <= limit:
        return False
    return len(frame.encode("utf-8", "surrogatepass")) > limit
