"""Real servers for tests: uvicorn on port 0 in a background thread, the timeout unit, a client-loop runner."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Every timeout in the tests is a multiple of this unit; raise it on a slow machine.
UNIT = float(os.environ.get("RTWS_TEST_UNIT", "1.0"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client-side coroutine on a fresh loop (the server has its own loop in its own thread)."""
    return asyncio.run(coro)


@dataclass
class RunningServer:
    server: Any
    thread: Any

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self) -> Any:
        return self.server.app

    def engine(self, name: str | None = None) -> Any:
        return self.app.registry.get(name).engine

    def stop(self, drain: bool = False) -> None:
        from rtws.server import stop_thread

        stop_thread(self.server, self.thread, drain=drain)


ServerFactory = Callable[..., RunningServer]


async def session_with_live(server: RunningServer, n: int, deadline: float) -> Any:
    """The server's session (on its own loop's objects) that has ``n`` live generations, polled until ``deadline``
    (``time.monotonic()``); fails the test if none appears."""
    while time.monotonic() < deadline:
        found = [c.session for c in server.app.connections if len(c.session.live) == n]
        if found:
            return found[0]
        await asyncio.sleep(0.005)
    raise AssertionError(f"no session with {n} live generations")
