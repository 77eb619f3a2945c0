"""Ids of messages already delivered, kept on disk so a restarted connector still skips them.

At-least-once means the cloud may hand the connector a message again (a lost ack, a restart
between delivery and ack). Delivered ids are appended to a file *before* their ack is sent, so
a redelivered message is acked without reaching the target a second time. The file holds the
last ``capacity`` ids and is compacted when it grows to twice that.
"""

from __future__ import annotations

import os
from pathlib import Path


class DeliveredLog:
    """A bounded, persistent set of delivered message ids (``path=None``: memory only)."""

    def __init__(self, path: Path | None, capacity: int = 100_000) -> None:
        self._path = path
        self._capacity = capacity
        self._ids: dict[str, None] = {}
        self._lines = 0
        self._fd: int | None = None
        self._unwritten: list[str] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    self._remember(line.strip())
                    self._lines += 1
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: str) -> None:
        """Remember ``message_id``; it reaches the file at the next :meth:`flush`."""
        if message_id in self._ids or "\n" in message_id:
            return
        self._remember(message_id)
        if self._fd is not None:
            self._unwritten.append(message_id)

    def flush(self) -> None:
        """Write what :meth:`add` remembered: call it before acking those messages.

        One ``write()`` for a whole batch; the page cache keeps it through a SIGKILL.
        """
        if self._fd is None or not self._unwritten:
            return
        os.write(self._fd, "".join(f"{i}\n" for i in self._unwritten).encode())
        self._lines += len(self._unwritten)
        self._unwritten.clear()
        if self._lines > 2 * self._capacity:
            self._compact()

    def _remember(self, message_id: str) -> None:
        if not message_id:
            return
        self._ids[message_id] = None
        if len(self._ids) > self._capacity:
            del self._ids[next(iter(self._ids))]

    def _compact(self) -> None:
        assert self._path is not None and self._fd is not None
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text("".join(f"{i}\n" for i in self._ids), encoding="utf-8")
        os.replace(temporary, self._path)
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND, 0o600)
        self._lines = len(self._ids)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
