"""What every connector transport shares: opening a connection, finding it again, closing it.

A connection is a consumer of one group of one channel. Its record lives in storage, so an ack
for it may reach any cloud replica (``POST /connect/ack``) and a long-poll connection lives
across polls, whichever replica serves each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection

from webhook_connect.cloud import logs
from webhook_connect.cloud.buffers import Buffer, ChannelSpec, ConnectionRecord, TokenRecord
from webhook_connect.cloud.buffers.base import DEFAULT_GROUP
from webhook_connect.cloud.session import (
    CLOSE_AUTH,
    CLOSE_REMOVED,
    SettleOutcome,
    SettlePlan,
    liveness,
    settle_outcome,
)
from webhook_connect.cloud.tokens import authenticate_connector, bearer_token, hash_token
from webhook_connect.shared.exceptions import ConnectorRefusal, StorageError
from webhook_connect.shared.frames import encode_connected

logger = logging.getLogger("webhook_connect.sessions")

GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONNECTOR_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
CONNECTION_ID = re.compile(r"^[0-9a-f]{32}$")
NATIVE_HEADER = "x-webhook-connect-protocol"

CLOSE_TOO_MANY = 4003
CLOSE_BAD_REQUEST = 4400
CLOSE_UNKNOWN_GROUP = 4404
CLOSE_UNAVAILABLE = 4503


def unavailable(exc: StorageError) -> ConnectorRefusal:
    return ConnectorRefusal(503, CLOSE_UNAVAILABLE, "storage_unavailable", "storage unavailable")


UNAUTHORIZED = ConnectorRefusal(401, CLOSE_AUTH, "unauthorized", "invalid token or channel")


@dataclass(frozen=True, slots=True)
class Connection:
    record: ConnectionRecord
    spec: ChannelSpec
    window: int

    @property
    def channel(self) -> str:
        return self.record.channel

    @property
    def group(self) -> str:
        return self.record.group

    @property
    def consumer(self) -> str:
        return self.record.connection_id


def request_token(connection: HTTPConnection) -> str | None:
    """``Authorization: Bearer <token>``, else ``?token=``."""
    return bearer_token(connection.headers.get("authorization")) or connection.query_params.get(
        "token"
    )


async def open_connection(
    buffer: Buffer,
    connection: HTTPConnection,
    channel: str,
    transport: str,
    *,
    resume: bool = False,
) -> Connection:
    """Authenticate, check limits, register the connection and its group.

    With ``resume`` (a seed long-poll that names no connection), a live long-poll connection
    of the same token, group, connector id and client host is continued instead of a new one
    registered (:func:`resumed_poll`).
    """
    params: QueryParams = connection.query_params
    group = params.get("group", "smee" if transport == "smee" else DEFAULT_GROUP)
    connector_id = connection.headers.get("x-connector-id") or params.get("connector_id", "")
    if not GROUP_NAME.match(group):
        raise ConnectorRefusal(400, CLOSE_BAD_REQUEST, "bad_request", "invalid group name")
    if connector_id and not CONNECTOR_ID.match(connector_id):
        raise ConnectorRefusal(400, CLOSE_BAD_REQUEST, "bad_request", "invalid connector id")
    now = time.time()
    try:
        auth = await authenticate_connector(buffer, channel, request_token(connection), now)
        spec = await buffer.get_channel(channel) if auth else None
    except StorageError as exc:
        raise unavailable(exc) from exc
    if auth is None or spec is None:
        raise UNAUTHORIZED
    await _check_group(buffer, spec, group)
    window = spec.max_in_flight
    requested = params.get("max_in_flight", "")
    if requested.isdigit() and 0 < int(requested) < window:
        window = int(requested)
    client = connection.client
    if resume:
        try:
            live = await buffer.list_connections(channel)
        except StorageError as exc:
            raise unavailable(exc) from exc
        host = client.host if client else ""
        found = resumed_poll(live, group, auth.token_id, connector_id, host)
        if found is not None:
            return Connection(found, spec, window)
    record = ConnectionRecord(
        connection_id=uuid.uuid4().hex,
        channel=channel,
        group=group,
        connector_id=connector_id,
        transport=transport,
        address=f"{client.host}:{client.port}" if client else "",
        token_id=auth.token_id,
        connected_at=now,
        seen_at=now,
    )
    try:
        if not await buffer.add_connection(record, spec.max_connections):
            raise ConnectorRefusal(
                429, CLOSE_TOO_MANY, "too_many_connections", "too many connections to this channel"
            )
        await buffer.join(channel, group)
    except StorageError as exc:
        raise unavailable(exc) from exc
    logger.info(
        "connector %s (%s) joined %r/%r over %s",
        record.connection_id,
        connector_id,
        channel,
        group,
        transport,
    )
    return Connection(record, spec, window)


def resumed_poll(
    live: list[ConnectionRecord], group: str, token_id: str, connector_id: str, host: str
) -> ConnectionRecord | None:
    """The long-poll connection a poll without ``X-Connection-ID`` continues, if any.

    The Core Webhook Module's connector never sends the id back on its polls (it reads it
    only to name its acks). A new connection per poll would hold each batch until its ack
    timeout and fill ``max_connections`` after a few polls; so such a poll is taken to come
    from the connector that polled before with the same token, group, ``X-Connector-ID``
    and client host (the port changes with every pooled HTTP connection). The most recently
    seen one wins. Connectors that share all four share one connection: one window, acks
    accepted from either.
    """
    matches = [
        r
        for r in live
        if r.transport == "long_poll"
        and r.group == group
        and r.token_id == token_id
        and r.connector_id == connector_id
        and _host(r.address) == host
    ]
    return max(matches, key=lambda r: r.seen_at, default=None)


def _host(address: str) -> str:
    """The host of a ``host:port`` address (IPv6 hosts keep their colons)."""
    return address.rpartition(":")[0]


async def _check_group(buffer: Buffer, spec: ChannelSpec, group: str) -> None:
    """On a channel without ``dynamic_groups`` a connection joins only a group that exists
    (the default one always does): a typo in a connector's group is refused, not a new group
    that keeps every message. Asked after authentication, so strangers learn no group names."""
    if spec.dynamic_groups or group == DEFAULT_GROUP:
        return
    try:
        exists = await buffer.has_group(spec.name, group)
    except StorageError as exc:
        raise unavailable(exc) from exc
    if not exists:
        raise ConnectorRefusal(
            404,
            CLOSE_UNKNOWN_GROUP,
            "unknown_group",
            f"unknown group {group!r}: not created on demand here",
        )


async def find_connection(
    buffer: Buffer, connection: HTTPConnection, connection_id: str | None
) -> Connection:
    """The registered connection a request names with ``X-Connection-ID``.

    The token must open the connection's channel: a token never reaches another channel's
    connections.
    """
    if not connection_id or not CONNECTION_ID.match(connection_id):
        raise ConnectorRefusal(
            400, CLOSE_BAD_REQUEST, "bad_request", "missing or malformed X-Connection-ID"
        )
    token = request_token(connection)
    try:
        found = await buffer.find_token(hash_token(token)) if token else None
        auth = found and await authenticate_connector(buffer, found.channel, token, time.time())
        if not auth:
            raise UNAUTHORIZED
        record = await buffer.get_connection(auth.channel, connection_id)
        spec = await buffer.get_channel(auth.channel)
    except StorageError as exc:
        raise unavailable(exc) from exc
    if record is None or spec is None:
        raise ConnectorRefusal(
            404, CLOSE_REMOVED, "unknown_connection", "no such connection (expired?)"
        )
    window = spec.max_in_flight
    return Connection(record, spec, window)


def hello(connection: Connection, native: bool, now: float) -> bytes:
    """The ``connected`` frame a WebSocket or SSE stream starts with (``now``: wall clock)."""
    return encode_connected(
        connection.consumer,
        connection.channel,
        now,
        group=connection.group,
        max_in_flight=connection.window,
        protocol="native" if native else "seed",
    )


async def close_connection(buffer: Buffer, connection: Connection) -> None:
    """Give back at once what the connection held, and forget it."""
    with contextlib.suppress(StorageError):
        await buffer.release(connection.channel, connection.group, connection.consumer)
        await buffer.remove_connection(connection.channel, connection.consumer)
    logger.info("connector %s left %r", connection.consumer, connection.channel)


# A channel's tokens, as read for liveness checks, are shared for this long by every connection
# of the channel in this process: 10,000 idle connectors would otherwise read them 2,000 times a
# second. A revocation then ends a connection at most this much later.
TOKENS_FRESH_SECONDS = 1.0


class TokenCache:
    """Each channel's token list, read at most once per ``TOKENS_FRESH_SECONDS`` per buffer;
    checks that arrive while a read is under way share it."""

    def __init__(self) -> None:
        self._reads: dict[tuple[int, str], tuple[float, asyncio.Future[list[TokenRecord]]]] = {}

    async def tokens(self, buffer: Buffer, channel: str, now: float) -> list[TokenRecord]:
        key = (id(buffer), channel)
        cached = self._reads.get(key)
        if cached is None or cached[0] <= now:
            if len(self._reads) > 10_000:  # channels come and go
                self._reads.clear()
            read = asyncio.ensure_future(buffer.list_tokens(channel))
            cached = self._reads[key] = (now + TOKENS_FRESH_SECONDS, read)
            read.add_done_callback(lambda done: self._failed(key, done))
        return await asyncio.shield(cached[1])

    def _failed(self, key: tuple[int, str], read: asyncio.Future[list[TokenRecord]]) -> None:
        # A failed read is not remembered: the next check asks storage again.
        cached = self._reads.get(key)
        if cached is not None and cached[1] is read and (read.cancelled() or read.exception()):
            del self._reads[key]

    def forget(self) -> None:
        self._reads.clear()


token_cache = TokenCache()


async def check_liveness(buffer: Buffer, connection: Connection) -> None:
    """Keep the connection's record alive in storage and end the connection, with the
    :class:`ConnectorRefusal` that says why, if the operator removed it or its token is no
    longer in force (the rule: :func:`webhook_connect.cloud.session.liveness`)."""
    try:
        alive = await buffer.touch_connection(connection.channel, connection.consumer)
        tokens = (
            await token_cache.tokens(buffer, connection.channel, time.monotonic()) if alive else []
        )
    except StorageError as exc:
        raise unavailable(exc) from exc
    refusal = liveness(alive, tokens, connection.record.token_id, time.time())
    if refusal is not None:
        raise refusal


async def settle(buffer: Buffer, connection: Connection, plan: SettlePlan) -> SettleOutcome:
    """Ack or nack in storage what a session's plan says, the one way every transport does.

    The calls are pipelined: the ids of one frame or ``POST`` share round trips. Storage
    answers per id whether the consumer still held it.
    """
    settlement = plan.settlement
    channel, group, consumer = connection.channel, connection.group, connection.consumer
    retry, reason = settlement.retry, settlement.reason
    try:
        if settlement.ack:
            calls = [buffer.ack(channel, group, i, consumer) for i in settlement.ids]
        else:
            calls = [
                buffer.nack(channel, group, i, retry=retry, consumer=consumer, reason=reason)
                for i in settlement.ids
            ]
        results = await asyncio.gather(*calls)
    except StorageError as exc:
        raise unavailable(exc) from exc
    outcome = settle_outcome(plan, results, time.monotonic())
    logs.log_settled(
        channel,
        group,
        consumer,
        outcome.settled,
        ack=settlement.ack,
        retry=retry,
        reason="" if settlement.ack else reason,
    )
    return outcome
