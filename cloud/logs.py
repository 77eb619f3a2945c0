"""The cloud's log lines: JSON for log collectors, text for a person at a terminal.

Every line goes through one stderr handler on the root logger (uvicorn's loggers propagate to
it), configured in every uvicorn worker by :func:`logging_config`. Secrets are masked by the
:class:`~.masking.SecretMasker` filter on that handler, which runs before the formatter:
it rewrites the record's message, exception text and event fields, and :class:`JsonFormatter`
only serialises what the filter left. Headers and bodies are never logged.

Events are records with a ``fields`` dict (``extra={"fields": ...}``) whose ``event`` names
them: ``ingest`` for each webhook request, and ``ack``, ``nack``, ``dead_letter`` and
``redelivery`` for deliveries. JSON lines carry the fields as keys; text lines say the same in
the message.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import orjson

from webhook_connect.shared.frames import WireMessage

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRACE = 5  # uvicorn's level below DEBUG

# A line per request, masked and formatted, about triples the cloud's CPU per accepted webhook
# (bench/ingest/run.py, Redis, no auth: ~300 instead of ~120 us), far past a 5% budget: ingest
# lines are debug, and so are ack lines, one per delivered message. Nacks, dead letters and
# redeliveries are rare and worth seeing: info and warning.
INGEST_LEVEL = logging.DEBUG
ACK_LEVEL = logging.DEBUG

ingest_logger = logging.getLogger("webhook_connect.ingest")
delivery_logger = logging.getLogger("webhook_connect.delivery")


def resolve_format(log_format: str, stream: TextIO | None = None) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal, JSON anywhere else."""
    if log_format != "auto":
        return log_format
    stream = stream or sys.stderr
    return "text" if stream.isatty() else "json"


def logging_config(log_format: str, log_level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn to apply in every worker process."""
    level = TRACE if log_level == "trace" else log_level.upper()
    formatter: dict[str, Any] = (
        {"()": "webhook_connect.cloud.logs.JsonFormatter"}
        if log_format == "json"
        else {"format": TEXT_FORMAT}
    )
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"cloud": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "cloud",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {name: propagate for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def log_ingest(
    webhook_id: str,
    channel: str,
    status: int,
    outcome: str,
    started: float,
    client: str,
) -> None:
    """One line per webhook request; ``outcome`` is the message id of a 202, else the error."""
    if not ingest_logger.isEnabledFor(INGEST_LEVEL):
        return
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    key = "message_id" if status == 202 else "error"
    fields = {
        "event": "ingest",
        "webhook_id": webhook_id,
        "channel": channel,
        "status": status,
        key: outcome,
        "duration_ms": duration_ms,
        "client": client,
    }
    ingest_logger.log(
        INGEST_LEVEL,
        "ingest %s -> %s: %d %s=%s in %.1f ms from %s",
        webhook_id,
        channel,
        status,
        key,
        outcome,
        duration_ms,
        client,
        extra={"fields": fields},
    )


def log_settled(
    channel: str,
    group: str,
    consumer: str,
    settled: Sequence[tuple[str, bool]],
    *,
    ack: bool,
    retry: bool = True,
    reason: str = "",
) -> None:
    """A line per message a connector acked or nacked (``settled``: id and whether storage
    took it; a late ack for a message already redelivered elsewhere is no event)."""
    event = "ack" if ack else "nack" if retry else "dead_letter"
    level = ACK_LEVEL if ack else logging.INFO if retry else logging.WARNING
    if not delivery_logger.isEnabledFor(level):
        return
    for message_id, done in settled:
        if not done:
            continue
        fields = {
            "event": event,
            "channel": channel,
            "message_id": message_id,
            "connection": consumer,
            "group": group,
        }
        if not ack:
            fields["reason"] = reason
        delivery_logger.log(
            level,
            "%s %s on %s/%s by %s%s",
            event,
            message_id,
            channel,
            group,
            consumer,
            f": {reason}" if reason else "",
            extra={"fields": fields},
        )


def log_redeliveries(group: str, consumer: str, messages: Iterable[WireMessage]) -> None:
    """A line per message sent again (after a nack, a timeout or a lost connection)."""
    if not delivery_logger.isEnabledFor(logging.INFO):
        return
    for message in messages:
        if message.attempt > 1:
            fields = {
                "event": "redelivery",
                "channel": message.channel,
                "message_id": message.message_id,
                "connection": consumer,
                "group": group,
                "attempt": message.attempt,
            }
            delivery_logger.info(
                "redelivery %s on %s/%s to %s (attempt %d)",
                message.message_id,
                message.channel,
                group,
                consumer,
                message.attempt,
                extra={"fields": fields},
            )
