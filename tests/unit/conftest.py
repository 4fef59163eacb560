"""The unit tier opens no network socket: ``connect`` and ``bind`` raise here (asyncio's own socketpair still works)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


class NetworkUsed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: socket.socket, *args: Any) -> None:
        raise NetworkUsed(f"a unit test tried to use the network ({self.family!r}, {args!r}); "
                          "move it to tests/integration")

    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, refuse)
    yield
