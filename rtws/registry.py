"""Model registry: names clients ask for, mapped to the served version. Pure bookkeeping, no torch."""

from __future__ import annotations

from typing import Any, Protocol


class Served(Protocol):
    name: str
    version: str
    engine: Any
    context_len: int
    max_prompt_tokens: int

    def encode(self, prompt: str | None = ..., messages: list[dict[str, Any]] | None = ...) -> list[int]: ...


class ModelRegistry:
    """Routes a model name (or ``None`` for the default) to the version that serves new requests.

    Swapping the current version is one dictionary assignment on the event
    loop, so routing is atomic: a request goes wholly to the old or the new.
    """

    def __init__(self) -> None:
        self._current: dict[str, Served] = {}
        self.default_name: str | None = None

    def add(self, served: Served, *, default: bool = False) -> None:
        self._current[served.name] = served
        if default or self.default_name is None:
            self.default_name = served.name

    def remove(self, name: str) -> Served | None:
        served = self._current.pop(name, None)
        if self.default_name == name:
            self.default_name = next(iter(self._current), None)
        return served

    def get(self, name: str | None) -> Served | None:
        if name is None:
            name = self.default_name
            if name is None:
                return None
        return self._current.get(name)

    def names(self) -> list[str]:
        return list(self._current)

    def models(self) -> list[Served]:
        return list(self._current.values())
