"""Whether this process has begun a graceful shutdown, for requests that wait indefinitely.

uvicorn tells each HTTP connection when it starts shutting down (``shutdown()``), but not the
application: a long poll waiting for messages would wait until uvicorn's graceful timeout
cancels it, and uvicorn answers a cancelled request that has not started its response 500.
The HTTP protocol (cloud/connections.py) calls :func:`begin`; a poll waits on :func:`wait`
alongside its messages and answers "poll again" at once.
"""

from __future__ import annotations

import asyncio

_begun = False
# Futures rather than one asyncio.Event: an Event binds to the first loop that waits on it,
# and in-process tests run the app on a fresh loop each.
_waiters: set[asyncio.Future[None]] = set()


def begin() -> None:
    """Note that the process is shutting down; wake every :func:`wait`."""
    global _begun
    _begun = True
    for waiter in _waiters:
        if not waiter.done():
            waiter.set_result(None)


def has_begun() -> bool:
    """True once :func:`begin` was called in this process."""
    return _begun


async def wait() -> None:
    """Return once the process is shutting down (at once if it already is)."""
    if _begun:
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _waiters.add(waiter)
    try:
        await waiter
    finally:
        _waiters.discard(waiter)
