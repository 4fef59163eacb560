"""Per-client rate limiting: a token bucket per key (API key, else client address). Pure."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """``rate_per_minute`` generations per key, with bursts up to ``burst``.

    Buckets are kept in LRU order and capped at ``max_keys`` so a flood of
    distinct client addresses cannot grow memory without bound (an evicted
    bucket simply restarts full).
    """

    def __init__(self, rate_per_minute: int, burst: int | None = None, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_minute < 1:
            raise ValueError("rate_per_minute must be >= 1")
        self.rate = rate_per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, rate_per_minute // 6))
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str) -> float:
        """Take one token. Returns 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, key: str) -> tuple[float, float]:
        """``(tokens left now, seconds until the bucket is full again)`` for ``key``, taking nothing."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return tokens, (self.burst - tokens) / self.rate


class ClientQuota:
    """Per-client caps on open connections and on queued + live generations, across sockets and HTTP. Pure.

    A client is its *verified* identity: ``key:<id>`` once an API key was checked, else ``addr:<ip>``. A cap of
    None is no cap. Counts drop to zero entries when released, so memory follows the clients actually present.
    """

    def __init__(self, max_connections: int | None = None, max_generations: int | None = None) -> None:
        self.max_connections = max_connections
        self.max_generations = max_generations
        self.connections: dict[str, int] = {}
        self.generations: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.max_connections is not None or self.max_generations is not None

    def open_connection(self, key: str) -> str | None:
        """Count one connection for ``key``; a refusal message (nothing counted) when over the cap."""
        n = self.connections.get(key, 0)
        if self.max_connections is not None and n >= self.max_connections:
            return f"at most {self.max_connections} connections per client"
        self.connections[key] = n + 1
        return None

    def close_connection(self, key: str) -> None:
        _dec(self.connections, key)

    def start_generation(self, key: str) -> str | None:
        """Count one generation for ``key``; a refusal message (nothing counted) when over the cap."""
        n = self.generations.get(key, 0)
        if self.max_generations is not None and n >= self.max_generations:
            return f"at most {self.max_generations} queued or running generations per client"
        self.generations[key] = n + 1
        return None

    def end_generation(self, key: str) -> None:
        _dec(self.generations, key)


def _dec(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


class ConnectionGuard:
    """Raw TCP connections (before any HTTP or WebSocket parsing), in total and per peer address. Pure.

    The uvicorn protocol classes in :mod:`rtws.transport` consult it when a connection is made, so a flood of
    silent or slow connections is refused before it holds a file descriptor for long; it is separate from
    ``max_connections``, which counts accepted WebSockets and HTTP streams.
    """

    def __init__(self, max_total: int | None = None, max_per_address: int | None = None) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.per_address: dict[str, int] = {}
        self.refused = 0

    def open(self, address: str) -> bool:
        n = self.per_address.get(address, 0)
        if ((self.max_total is not None and self.total >= self.max_total)
                or (self.max_per_address is not None and n >= self.max_per_address)):
            self.refused += 1
            return False
        self.total += 1
        self.per_address[address] = n + 1
        return True

    def close(self, address: str) -> None:
        if address in self.per_address:
            self.total -= 1
            _dec(self.per_address, address)
