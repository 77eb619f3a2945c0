"""One line per delivery, cheaply: the connector prints thousands a second.

``logging`` costs more per record than a whole HTTP delivery here, so delivery lines are written
straight to the stream (same format as the connector's other log lines: text or JSON, see
connector/logs.py) and flushed within ``FLUSH_DELAY`` seconds rather than after every line.

A delivered message is an INFO line, a failed one a WARNING line naming the cause
(``DeliveryResult.error``); below the configured level nothing is formatted at all. On a
terminal the status is coloured: green delivered, yellow to be retried, red rejected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO
from urllib.parse import urlsplit

import orjson

from webhook_connect.connector.delivery import DeliveryResult
from webhook_connect.shared.frames import WireMessage
from webhook_connect.shared.policy import Outcome

FLUSH_DELAY = 0.05
LOGGER = "webhook_connect.connector.delivery"
GREEN, YELLOW, RED, RESET = "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"
COLOURS = {Outcome.DELIVERED: GREEN, Outcome.RETRY: YELLOW, Outcome.REJECTED: RED}
LEVEL_NAMES = {logging.INFO: "info", logging.WARNING: "warning"}


def short_target(target: str) -> str:
    """``/hook`` for ``http://localhost:3000/hook`` (the query kept); a module name as is."""
    if "://" not in target:
        return target
    parts = urlsplit(target)
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


class LinePrinter:
    """Writes delivery lines (and other per-message notes) in the connector's log format."""

    def __init__(
        self,
        stream: TextIO,
        *,
        json_lines: bool = False,
        colour: bool = False,
        level: int = logging.INFO,
    ) -> None:
        self._stream = stream
        self._json = json_lines
        self._colour = colour
        self._level = level
        self._second = -1
        self._stamp = ""
        self._flush: asyncio.TimerHandle | None = None
        # Per target: its path for the line, and its URL as a JSON string.
        self._paths: dict[str, tuple[str, str]] = {}

    def _now(self) -> float:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        return now

    def _write(self, text: str) -> None:
        self._stream.write(text)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def _json_line(self, now: float, level: int, message: str, fields: dict[str, object]) -> None:
        record = {
            "time": f"{self._stamp}.{int(now * 1000) % 1000:03d}Z",
            "level": LEVEL_NAMES.get(level) or logging.getLevelName(level).lower(),
            "logger": LOGGER,
            "message": message,
            **fields,
        }
        self._write(orjson.dumps(record).decode() + "\n")

    def line(self, text: str, level: int = logging.INFO) -> None:
        """A free-form line (a duplicate skipped, a note)."""
        if level < self._level:
            return
        now = self._now()
        if self._json:
            self._json_line(now, level, text, {})
        else:
            self._write(f"{self._stamp} {text}\n")

    def delivery(self, message: WireMessage, result: DeliveryResult) -> None:
        """``200 POST /hook 12.3 ms github <id> -> <target> attempt 1``; on failure the
        outcome and its cause follow."""
        outcome = result.outcome
        level = logging.INFO if outcome is Outcome.DELIVERED else logging.WARNING
        if level < self._level:
            return
        now = self._now()
        target = result.target
        known = self._paths.get(target)
        if known is None:
            known = self._paths[target] = (short_target(target), orjson.dumps(target).decode())
        path = known[0]
        envelope = message.envelope
        if result.status is not None:
            status = str(result.status)
        else:  # module mode: the modules confirmed the write; or no answer at all
            status = "ok" if outcome is Outcome.DELIVERED else "ERR"
        ms = result.seconds * 1000
        tail = ""
        if outcome is not Outcome.DELIVERED:
            tail = f" ({outcome.value})" + (f": {result.error}" if result.error else "")
        elif result.error:  # acked without a delivery: "unmatched (acked, 3 so far)"
            tail = f": {result.error}"
        text = (
            f"{status} {envelope.method} {path} {ms:.1f} ms {envelope.webhook_id} "
            f"{message.message_id} -> {target} attempt {message.attempt}"
        )
        if self._json:
            # Written out rather than one orjson.dumps of a dict: a third cheaper per line
            # (bench/relay prints one per message); every string still goes through orjson.
            dumps = orjson.dumps
            error = f',"error":{dumps(result.error).decode()}' if result.error else ""
            status_json = "null" if result.status is None else str(result.status)
            self._write(
                f'{{"time":"{self._stamp}.{int(now * 1000) % 1000:03d}Z",'
                f'"level":"{LEVEL_NAMES[level]}","logger":"{LOGGER}",'
                f'"message":{dumps(text + tail).decode()},"event":"delivery",'
                f'"outcome":"{outcome.value}","status":{status_json},'
                f'"method":{dumps(envelope.method).decode()},"target":{known[1]},'
                f'"ms":{ms:.1f},"webhook_id":{dumps(envelope.webhook_id).decode()},'
                f'"message_id":{dumps(message.message_id).decode()},'
                f'"attempt":{message.attempt}{error}}}\n'
            )
        elif self._colour:
            colour = COLOURS.get(outcome, "")
            self._write(f"{self._stamp} {colour}{status}{RESET}{text[len(status) :]}{tail}\n")
        else:
            self._write(f"{self._stamp} {text}{tail}\n")

    def flush(self) -> None:
        self._flush = None
        self._stream.flush()
