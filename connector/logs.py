"""The connector's log lines: JSON for log collectors, text for a person at a terminal.

Mirrors the cloud's ``--log-format``: ``auto`` is text when stdout is a terminal and JSON lines
otherwise (a service under systemd, a container). Everything goes to stdout: the ``logging``
lines through one handler here, the per-delivery lines through
:class:`~webhook_connect.connector.printer.LinePrinter` in the same format.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

import orjson

from webhook_connect.connector.printer import LinePrinter

TEXT_FORMAT = "%(asctime)s %(message)s"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


def resolve_format(log_format: str, stream: TextIO) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal, JSON anywhere else."""
    if log_format != "auto":
        return log_format
    return "text" if stream.isatty() else "json"


def wants_colour(log_format: str, stream: TextIO) -> bool:
    """Colour only in text on a terminal, and never with ``NO_COLOR`` set (no-color.org)."""
    return log_format == "text" and stream.isatty() and not os.environ.get("NO_COLOR")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime(TIME_FORMAT, time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(
    log_format: str = "text", log_level: str = "info", stream: TextIO | None = None
) -> LinePrinter:
    """Set up the ``webhook_connect`` loggers on ``stream`` (stdout) and return the delivery
    line printer that writes in the same format at the same level."""
    stream = stream or sys.stdout
    resolved = resolve_format(log_format, stream)
    level = logging.getLevelName(log_level.upper())
    handler = logging.StreamHandler(stream)
    if resolved == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TIME_FORMAT))
    root = logging.getLogger("webhook_connect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return LinePrinter(
        stream,
        json_lines=resolved == "json",
        colour=wants_colour(resolved, stream),
        level=level,
    )
