"""Ids of messages already delivered, kept on disk so a restarted connector still skips them.

At-least-once means the cloud may hand the connector a message again (a lost ack, a restart
between delivery and ack). Delivered ids are appended to a file *before* their ack is sent, so
a redelivered message is acked without reaching the target a second time. The file holds the
last ``capacity`` ids and is compacted when it grows to twice that.

A connector passes millions of ids through it, so its memory must not change with how many
have passed, and no large block may be allocated again and again: glibc keeps the heap such a
transient grew, so the process's memory would step up with it. One insertion-ordered dict (for
membership and order at once) failed both: forgetting its oldest key leaves a dead entry at its
front (finding the oldest scans them all), its table doubled once it wrapped, and any hash table
that forgets one key per insertion rebuilds itself, twice its size in memory for a moment,
every few tens of thousands of insertions. So the ids are spread over ``GENERATIONS`` small
tables, filled one after the other: only the newest one takes ids; the older ones only lose
theirs, oldest first (a deque keeps the order), and are dropped once empty, so none of them is
ever rebuilt. Compaction streams the file out in chunks rather than building it in memory.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from pathlib import Path

COMPACTION_CHUNK = 1024  # ids per write() while compacting
GENERATIONS = 8  # tables the ids are spread over: each lookup tries at most one more


class DeliveredLog:
    """A bounded, persistent set of delivered message ids (``path=None``: memory only)."""

    def __init__(self, path: Path | None, capacity: int = 100_000) -> None:
        self._path = path
        self._capacity = capacity
        self._generation_size = -(-capacity // GENERATIONS)
        # Oldest first; the last one takes new ids. Dicts: more compact than sets.
        self._generations: deque[dict[str, None]] = deque([{}])
        self._order: deque[str] = deque()
        self._lines = 0
        self._fd: int | None = None
        self._unwritten: list[str] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                with path.open(encoding="utf-8", errors="replace") as lines:
                    for line in lines:
                        self._remember(line.strip())
                        self._lines += 1
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __contains__(self, message_id: object) -> bool:
        for ids in reversed(self._generations):  # a redelivery is most often a recent id
            if message_id in ids:
                return True
        return False

    def __len__(self) -> int:
        return len(self._order)

    def add(self, message_id: str) -> None:
        """Remember ``message_id``; it reaches the file at the next :meth:`flush`."""
        if "\n" not in message_id and self._remember(message_id) and self._fd is not None:
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

    def _remember(self, message_id: str) -> bool:
        """Keep ``message_id`` (forgetting the oldest when full); False if already kept."""
        if not message_id or message_id in self:
            return False
        generations = self._generations
        if len(self._order) >= self._capacity:
            # FIFO over FIFO generations: the oldest id is in the oldest generation.
            oldest = generations[0]
            del oldest[self._order.popleft()]
            if not oldest and len(generations) > 1:
                generations.popleft()
        newest = generations[-1]
        if len(newest) >= self._generation_size:
            newest = {}
            generations.append(newest)
        newest[message_id] = None
        self._order.append(message_id)
        return True

    def _compact(self) -> None:
        assert self._path is not None and self._fd is not None
        temporary = self._path.with_suffix(".tmp")
        ids = iter(self._order)
        with temporary.open("wb") as out:
            while chunk := list(itertools.islice(ids, COMPACTION_CHUNK)):
                out.write(("\n".join(chunk) + "\n").encode())
        os.replace(temporary, self._path)
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND, 0o600)
        self._lines = len(self._order)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
