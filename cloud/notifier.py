"""Wake waiting deliveries when a channel changes, without polling or lost wake-ups.

Every change bumps the channel's version. A reader notes the version *before* it reads; if the
read finds nothing it waits for a version after that one, so a message appended between the
read and the wait still wakes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib


class Notifier:
    """Per-channel change versions with async waiting, within one process."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}

    def version(self, channel: str) -> int:
        return self._versions.get(channel, 0)

    def notify(self, channel: str) -> None:
        self._versions[channel] = self._versions.get(channel, 0) + 1
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, channel: str, since: int, max_wait: float) -> None:
        """Return once the channel's version differs from ``since``, or after ``max_wait``."""
        if self.version(channel) != since:
            return
        waiter = self._waiters.get(channel)
        if waiter is None or waiter.done():
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), max_wait)
