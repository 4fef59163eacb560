"""Structured logs: one JSON object per line, with the ``extra`` fields a call passes.

Every line has ``ts``, ``time``, ``level``, ``logger`` and ``msg``; events add
``event`` and their own fields. :class:`GenerationLog` writes one
``{"event": "generation", ...}`` line per finished generation (logger
``rtws.generation``, level INFO).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .hooks import GenerationRecord, Hooks

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


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


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    """Route ``rtws.*`` and uvicorn's loggers to one JSON-lines handler at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("rtws", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False
    logging.getLogger("uvicorn.access").handlers[:] = [handler]


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
