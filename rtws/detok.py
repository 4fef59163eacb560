"""Incremental detokenization and stop strings. Pure: takes a tokenizer object, imports no torch.

Two guarantees the protocol relies on:

* a multi-byte UTF-8 character is never split across deltas (text whose
  decoding ends in U+FFFD is held until the next token completes it);
* the concatenation of all emitted text equals ``tokenizer.decode(ids)`` of
  the completion (cut before the stop string when one matched).
"""

from __future__ import annotations

from typing import Any, Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (``prefix_offset:``) rather than the whole
    completion, so each token costs O(1), and compares it with the window's
    already-emitted prefix so tokenizers that drop a leading space when a
    decode starts mid-text (SentencePiece) still produce exact deltas.
    """

    __slots__ = ("_tok", "ids", "_prefix_offset", "_read_offset", "_prefix_text", "_pieces")

    def __init__(self, tokenizer: Any, pieces: dict[int, str] | None = None) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        # Decodes of one-token windows (the usual new prefix window), shared by the streams of one tokenizer:
        # a pure function of the id, so a dict lookup replaces the second decode of most tokens.
        self._pieces = pieces

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)  # type: ignore[no-any-return]

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        self.ids.append(token_id)
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(self._prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            window = self.ids[self._prefix_offset:self._read_offset]
            pieces = self._pieces
            if pieces is not None and len(window) == 1:
                text = pieces.get(window[0])
                if text is None:
                    text = pieces[window[0]] = self._decode(window)
                self._prefix_text = text
            else:
                self._prefix_text = self._decode(window)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held (an incomplete character at the very end decodes as U+FFFD)."""
        new_text = self._decode(self.ids[self._prefix_offset:])
        delta = new_text[len(self._prefix_text):] if new_text.startswith(self._prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self.ids)
        self._prefix_text = ""
        return delta


class TextStream:
    """Detokenizer plus stop strings: holds back text that could begin a stop string."""

    __slots__ = ("_detok", "_stops", "_held")

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), pieces: dict[int, str] | None = None) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, pieces)
        self._stops = tuple(s for s in stop if s)
        self._held = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token. Returns ``(text to emit now, stopped)``; after ``stopped`` push no more."""
        return self._scan(self._held + self._detok.push(token_id))

    def flush(self) -> str:
        """End of generation (not by a stop string): everything still held, minus any stop string."""
        text, _ = self._scan(self._held + self._detok.flush(), final=True)
        self._held = ""
        return text

    def _scan(self, pending: str, final: bool = False) -> tuple[str, bool]:
        if not self._stops:
            self._held = ""
            return pending, False
        cut = -1
        for s in self._stops:
            i = pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._held = ""
            return pending[:cut], True
        if final:
            self._held = ""
            return pending, False
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        self._held = pending[len(pending) - hold:] if hold else ""
        return pending[: len(pending) - hold], False
