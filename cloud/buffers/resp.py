"""A lean pipelining Redis client for the hot path (script calls).

redis-py spends ~100 µs of CPU on every round trip here, more than the rest of an ingest
request. This client keeps one connection, writes every command issued in one event-loop turn
with a single ``write()``, and hands replies (parsed by hiredis) to waiting futures in order,
so concurrent callers share round trips without a batching layer of their own.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis

from webhook_connect.cloud.buffers.redisurl import RedisEndpoint, parse_redis_url
from webhook_connect.shared.exceptions import StorageUnavailable

CONNECT_TIMEOUT = 5.0
# How long replies may stop coming while commands wait before the connection counts as dead.
# A progress deadline, not a per-command one: under load (appendfsync always) replies keep
# arriving every few milliseconds, and the longest legitimate silence is a blocking command
# of ours (the cluster's ``WAIT 1 1000``: 1 s). A blackholed link (no FIN, no RST) shows as
# silence only, so this is what turns it into 503s quickly enough for a sender with a 10 s
# timeout (GitHub) to see the 503 rather than its own timeout.
REPLY_TIMEOUT = 2.5


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``), returned for one command only."""


def encode_command(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self._client = client
        self._reader = hiredis.Reader(replyError=ReplyError)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._out: list[bytes] = []
        self._is_flush_scheduled = False
        # loop.time() of the last sign of life: bytes received, or the moment commands
        # started waiting on an idle connection (an idle connection is not a silent one).
        self._progress_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        if not self.pending:
            self._progress_at = loop.time()
        self.pending.append(future)
        self._out.append(data)
        if not self._is_flush_scheduled:
            self._is_flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._progress_at + REPLY_TIMEOUT, self._check)

    def _check(self) -> None:
        """Nothing received for REPLY_TIMEOUT while commands wait: the connection is dead;
        drop it (``connection_lost`` fails what waits with StorageUnavailable)."""
        self._watchdog = None
        if not self.pending or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = self._progress_at + REPLY_TIMEOUT
        if loop.time() >= deadline:
            self.transport.abort()
            return
        self._watchdog = loop.call_at(deadline, self._check)

    def _flush(self) -> None:
        self._is_flush_scheduled = False
        if self.transport is not None and self._out:
            self.transport.write(b"".join(self._out))
        self._out = []

    def data_received(self, data: bytes) -> None:
        # Any bytes count as progress: a large reply arriving slowly is not a dead link.
        self._progress_at = asyncio.get_running_loop().time()
        self._reader.feed(data)
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            future = self.pending.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._client.lost(self, exc)
        error = StorageUnavailable(f"redis connection lost: {exc or 'closed'}")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class RespClient:
    """One pipelined connection to the Redis of a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    def __init__(self, url: str | RedisEndpoint) -> None:
        # The one reading of the URL (redisurl.py): host, credentials, database and the
        # SSLContext are those redis-py uses too.
        self.endpoint = url if isinstance(url, RedisEndpoint) else parse_redis_url(url)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command; return its reply or a :class:`ReplyError` *instance*."""
        protocol = self._protocol if self._protocol is not None else await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.send(encode_command(args), future)
        return await future

    async def _connect(self) -> _Protocol:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The connection being made was given up by aclose(), not this caller.
            task = asyncio.current_task()
            if connecting.cancelled() and (task is None or not task.cancelling()):
                raise StorageUnavailable("redis client closed") from None
            raise
        except (OSError, TimeoutError) as exc:
            endpoint = self.endpoint
            where = endpoint.path or f"{endpoint.host}:{endpoint.port}"
            raise StorageUnavailable(
                # str(): asyncio.timeout's TimeoutError has no text, yet is true.
                f"redis unreachable at {where}: {str(exc) or type(exc).__name__}"
            ) from exc

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if endpoint.path:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(self), endpoint.path
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), endpoint.host, endpoint.port, ssl=endpoint.tls
                    )
                for command in endpoint.handshake():
                    future: asyncio.Future[Any] = loop.create_future()
                    protocol.send(encode_command(command), future)
                    reply = await future
                    if isinstance(reply, ReplyError):
                        raise StorageUnavailable(f"redis refused {command[0]}: {reply}")
        except BaseException:
            # Connected, then the handshake failed, timed out or was given up (aclose()):
            # this connection will never be used, so it is closed now, not left open.
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            raise
        self._protocol = protocol
        return protocol

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def aclose(self) -> None:
        """Close the connection, and give up one being made (its callers get
        StorageUnavailable); nothing stays open after this returns."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.wait({connecting})
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
