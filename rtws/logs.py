"""Logs: JSON lines for machines, short readable lines for a terminal.

JSON (:class:`JsonFormatter`): every line has ``ts``, ``time``, ``level``,
``logger`` and ``msg``; events add ``event`` and their own fields.
Text (:class:`TextFormatter`, a terminal): ``HH:MM:SS LEVEL message k=v ...``
with a few of those fields. ``setup_logging(format="auto")`` picks text when
the log stream is a TTY and JSON otherwise. :class:`GenerationLog` writes one
``{"event": "generation", ...}`` line per finished generation (logger
``rtws.generation``, level INFO).

A record may carry a pre-rendered multi-line block in ``_text`` (the startup
banner): the text formatter prints it as is; JSON skips underscore fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .hooks import GenerationRecord, Hooks

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message", "asctime", "color_message"}  # uvicorn's color_message repeats msg with ANSI codes
# Fields the text format shows after the message, in this order (the rest stay in the JSON format).
_TEXT_FIELDS = ("model", "version", "device", "dtype", "quantization", "context", "percent", "stage", "host",
                "port", "path", "reason", "error", "seconds", "threads", "interop_threads", "live", "cancelled",
                "timeout_s", "request_id", "completion_tokens", "ttft_ms", "total_ms")
_COLORS = {"DEBUG": "\x1b[2m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m",
           "CRITICAL": "\x1b[1;31m"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One short line per record for a terminal: ``08:12:01 INFO  model loaded model=x device=cpu``.

    ``color`` wraps the level in ANSI colours. Tracebacks follow on their own lines.
    """

    def __init__(self, color: bool = False) -> None:
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        block = getattr(record, "_text", None)
        if isinstance(block, str):
            return block
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<5}"
        if self.color and record.levelname in _COLORS:
            level = f"{_COLORS[record.levelname]}{level}\x1b[0m"
        parts = [stamp, level, record.getMessage()]
        for key in _TEXT_FIELDS:
            v = record.__dict__.get(key)
            if v is not None and v != "":
                parts.append(f"{key}={_short(v)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _short(v: Any) -> str:
    text = str(v)
    if " " in text or not text:
        text = json.dumps(text, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."


def use_text(fmt: str, stream: Any) -> bool:
    """Whether ``fmt`` (auto, text or json) means readable lines on ``stream``: auto is text on a TTY."""
    if fmt == "text":
        return True
    if fmt == "json":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def setup_logging(level: str = "INFO", stream: Any = None, fmt: str = "json") -> None:
    """Route ``rtws.*`` and uvicorn's loggers to one handler at ``level``.

    ``fmt``: ``json`` (JSON lines), ``text`` (readable lines) or ``auto`` (text when ``stream`` is a TTY).
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    text = use_text(fmt, stream)
    handler.setFormatter(TextFormatter(color=fmt == "auto" and text) if text else JsonFormatter())
    for name in ("rtws", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    logging.getLogger("uvicorn.access").handlers[:] = [handler]
    if level.upper() != "DEBUG":
        # Import-time chatter of optional libraries (torchao's CUDA-only extensions failing to load on a CPU
        # build, torch's pytree deprecation notes when transformers imports torchao) is not the server's news.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


def terminal_stream() -> Any | None:
    """The stream of the ``rtws`` logger's readable (text) handler when it is a TTY, else None (no progress bars)."""
    for h in logging.getLogger("rtws").handlers:
        stream = getattr(h, "stream", None)
        if isinstance(h.formatter, TextFormatter) and stream is not None and use_text("auto", stream):
            return stream
    return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def generation_fields(rec: GenerationRecord) -> dict[str, Any]:
    """The ``extra`` fields of a generation's log line (times in milliseconds)."""
    return {
        "event": "generation", "id": rec.id, "request_id": rec.request_id, "session": rec.session,
        "model": rec.model, "version": rec.version, "client": rec.client, "transport": rec.transport,
        "reason": rec.reason, "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
        "ttft_ms": _ms(rec.ttft_s), "total_ms": _ms(rec.total_s), "queue_ms": _ms(rec.queue_s),
    }


class GenerationLog(Hooks):
    """Hooks that log each finished generation as one structured line on ``rtws.generation`` (INFO)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("rtws.generation")

    def generation_finished(self, rec: GenerationRecord) -> None:
        if self.log.isEnabledFor(logging.INFO):
            self.log.info("generation finished", extra=generation_fields(rec))
