"""One line per delivery, cheaply: the connector prints thousands a second.

``logging`` costs more per record than a whole HTTP delivery here, so delivery lines are written
straight to the stream (same format as the connector's other log lines) and flushed within
``FLUSH_DELAY`` seconds rather than after every line.
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

FLUSH_DELAY = 0.05


class LinePrinter:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._second = -1
        self._stamp = ""
        self._flush: asyncio.TimerHandle | None = None

    def line(self, text: str) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
        self._stream.write(f"{self._stamp} {text}\n")
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flush = None
        self._stream.flush()
