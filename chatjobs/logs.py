"""Logging for every process chatjobs starts: one JSON object per line, or readable text.

``configure()`` is the one setup: the API (uvicorn's loggers, the access log too), the worker
and beat (Celery's own loggers, through ``celery.signals.setup_logging``) and the simulator
all log through the root logger's one handler, in ``CHATJOBS_LOG_FORMAT``.

Fields given as ``extra={...}`` (job_id, model, latency_ms, ...) become keys of the JSON
object, or ``key=value`` after the message in text. Nothing here filters secrets: callers
never pass a key, a secret or a prompt body in the first place.
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
from datetime import UTC, datetime
from typing import Any

# Every attribute a LogRecord has before ``extra`` adds to it: the rest are fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn repeats its message with terminal colours: noise in a log file.
_STANDARD.add("color_message")
_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# One line per upstream call comes from chatjobs.worker; these would repeat it, and the
# per-second dispatcher ticks would drown everything else.
_QUIET = ("httpx", "celery.app.trace", "celery.worker.strategy")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of ``record``, in the order given; None values left out."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and value is not None
    }


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...fields}``; an exception as the string
    field ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain line, then the fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        extra = " ".join(f"{key}={value}" for key, value in fields(record).items())
        return f"{text} {extra}" if extra else text


def resolve_format(setting: str, stream: Any = None) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal, json anywhere else."""
    if setting != "auto":
        return setting
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def formatter(setting: str | None = None) -> logging.Formatter:
    """The formatter ``CHATJOBS_LOG_FORMAT`` (or ``setting``) asks for."""
    if setting is None:
        from chatjobs.settings import get_settings

        setting = get_settings().log_format
    return JsonFormatter() if resolve_format(setting) == "json" else TextFormatter()


def config(level: int | str = logging.INFO) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of every chatjobs process: one stderr handler on the
    root in the configured format; uvicorn's and Celery's loggers propagate to it rather than
    keeping handlers of their own. uvicorn takes it as ``log_config``, so its worker
    processes (spawned, not forked) set up the same."""
    own = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"chatjobs": {"()": "chatjobs.logs.formatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "chatjobs",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {
            "level": logging.getLevelName(level) if isinstance(level, int) else level,
            "handlers": ["stderr"],
        },
        "loggers": {
            **{name: dict(own) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            **{name: dict(own) for name in ("celery", "celery.task", "celery.redirected")},
            **{name: {"level": "WARNING"} for name in _QUIET},
        },
    }


def configure(level: int | str = logging.INFO) -> None:
    """Set up logging for this process (safe to call again: it replaces the handler)."""
    logging.config.dictConfig(config(level))
