"""Wake waiting deliveries when a channel changes, without polling or lost wake-ups.

Every change bumps the channel's version. A reader notes the version *before* it reads; if the
read finds nothing it waits for a version after that one, so a message appended between the
read and the wait still wakes it at once.
"""

from __future__ import annotations

import asyncio


class Notifier:
    """Per-channel change versions with async waiting, within one process."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def version(self, channel: str) -> int:
        return self._versions.get(channel, 0)

    def notify(self, channel: str) -> None:
        self._versions[channel] = self._versions.get(channel, 0) + 1
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, channel: str, since: int, max_wait: float) -> None:
        """Return once the channel's version differs from ``since``, or after ``max_wait``."""
        if self.version(channel) != since:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        # A plain timer, not wait_for(): this runs once per idle turn of every connection.
        timer = loop.call_later(max_wait, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            waiters = self._waiters.get(channel)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[channel]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
