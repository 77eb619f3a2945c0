"""What every connector transport shares: opening a connection, finding it again, closing it.

A connection is a consumer of one group of one channel. Its record lives in storage, so an ack
for it may reach any cloud replica (``POST /connect/ack``) and a long-poll connection lives
across polls, whichever replica serves each one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection

from webhook_connect.cloud.buffers import Buffer, ChannelSpec, ConnectionRecord, Delivery
from webhook_connect.cloud.buffers.base import DEFAULT_GROUP
from webhook_connect.cloud.tokens import authenticate_connector, bearer_token, hash_token
from webhook_connect.shared.exceptions import StorageError
from webhook_connect.shared.frames import WireMessage

logger = logging.getLogger("webhook_connect.sessions")

GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONNECTOR_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
CONNECTION_ID = re.compile(r"^[0-9a-f]{32}$")
NATIVE_HEADER = "x-webhook-connect-protocol"

CLOSE_AUTH = 4001
CLOSE_REMOVED = 4002
CLOSE_TOO_MANY = 4003
CLOSE_BAD_REQUEST = 4400
CLOSE_UNKNOWN_GROUP = 4404
CLOSE_UNAVAILABLE = 4503


class Refusal(Exception):
    """A connection refused, with the HTTP status and WebSocket close code that say why."""

    def __init__(self, status: int, close_code: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.close_code = close_code
        self.error = error
        self.reason = reason


def unavailable(exc: StorageError) -> Refusal:
    return Refusal(503, CLOSE_UNAVAILABLE, "storage_unavailable", "storage unavailable")


UNAUTHORIZED = Refusal(401, CLOSE_AUTH, "unauthorized", "invalid token or channel")


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
    buffer: Buffer, connection: HTTPConnection, channel: str, transport: str
) -> Connection:
    """Authenticate, check limits, register the connection and its group."""
    params: QueryParams = connection.query_params
    group = params.get("group", "smee" if transport == "smee" else DEFAULT_GROUP)
    connector_id = connection.headers.get("x-connector-id") or params.get("connector_id", "")
    if not GROUP_NAME.match(group):
        raise Refusal(400, CLOSE_BAD_REQUEST, "bad_request", "invalid group name")
    if connector_id and not CONNECTOR_ID.match(connector_id):
        raise Refusal(400, CLOSE_BAD_REQUEST, "bad_request", "invalid connector id")
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
            raise Refusal(
                429, CLOSE_TOO_MANY, "too_many_connections", "too many connections to this channel"
            )
        await buffer.join(channel, group)
    except StorageError as exc:
        raise unavailable(exc) from exc
    logger.info(
        "connector %s (%s) joined %r/%r over %s",
        record.connection_id, connector_id, channel, group, transport,
    )  # fmt: skip
    return Connection(record, spec, window)


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
        raise Refusal(
            404, CLOSE_UNKNOWN_GROUP, "unknown_group",
            f"unknown group {group!r}: not created on demand here",
        )  # fmt: skip


async def find_connection(
    buffer: Buffer, connection: HTTPConnection, connection_id: str | None
) -> Connection:
    """The registered connection a request names with ``X-Connection-ID``.

    The token must open the connection's channel: a token never reaches another channel's
    connections.
    """
    if not connection_id or not CONNECTION_ID.match(connection_id):
        raise Refusal(400, CLOSE_BAD_REQUEST, "bad_request", "missing or malformed X-Connection-ID")
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
        raise Refusal(404, CLOSE_REMOVED, "unknown_connection", "no such connection (expired?)")
    window = spec.max_in_flight
    return Connection(record, spec, window)


async def close_connection(buffer: Buffer, connection: Connection) -> None:
    """Give back at once what the connection held, and forget it."""
    with contextlib.suppress(StorageError):
        await buffer.release(connection.channel, connection.group, connection.consumer)
        await buffer.remove_connection(connection.channel, connection.consumer)
    logger.info("connector %s left %r", connection.consumer, connection.channel)


def wire_messages(
    deliveries: list[Delivery], channel: str, first_sequence: int
) -> list[WireMessage]:
    return [
        WireMessage(d.message_id, first_sequence + i, d.attempt, channel, d.envelope)
        for i, d in enumerate(deliveries)
    ]
