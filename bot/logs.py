"""Structured logs: one JSON object per line, with the delivery, run, repo and PR it concerns.

The context is carried in context variables, so every line logged while handling a
delivery or running a job names them without each call passing them along; threads
started with `asyncio.to_thread` and tasks inherit it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from bot.report.comments import redact

_CONTEXT: contextvars.ContextVar[dict[str, str | int]] = contextvars.ContextVar("deploybot_log_context", default={})


@contextmanager
def log_context(**fields: str | int | None) -> Iterator[None]:
    """Add fields (delivery, run, job, repo, pr) to every log line inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v not in (None, "")}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON, with secrets of the bot replaced by `***`."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_CONTEXT.get(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False), [json.dumps(s)[1:-1] for s in self.secrets])


def configure_logging(level: str, secrets: list[str]) -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
