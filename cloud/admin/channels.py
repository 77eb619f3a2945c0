"""``/admin/channels``: channels, their connector tokens and their live connections.

Channels created here live in storage like those of ``webhooks.json``: every replica serves
them and they survive restarts. Tokens are stored only as hashes; the token itself is in one
answer only. Revoking or ending a token removes its live connections from storage, and each
connection's own heartbeat (every few seconds) sees that and closes it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from webhook_connect.cloud.admin.common import (
    ChannelLimits,
    HistoryReplay,
    NewChannel,
    NewToken,
    Rotation,
    applied_limits,
    channel_name,
    connection_json,
    existing_channel,
    json_body,
    query_limit,
    token_json,
    validated,
)
from webhook_connect.cloud.buffers import Buffer, ChannelSpec, TokenRecord
from webhook_connect.cloud.buffers.base import EVENTS_KEPT, ChannelStats
from webhook_connect.cloud.config import CloudConfig, channel_spec
from webhook_connect.cloud.publicurl import ingest_urls
from webhook_connect.cloud.tokens import hash_token, new_token
from webhook_connect.shared.exceptions import HttpRefusal
from webhook_connect.shared.limits import ChannelLimits as Limits

DEFAULT_LIMITS = Limits()


class ChannelRoutes:
    """Handlers for channels, tokens and connections."""

    def __init__(self, buffer: Buffer, config: Callable[[], CloudConfig] | None = None) -> None:
        self.buffer = buffer
        # The running configuration (it changes on a reload): which webhooks feed a channel.
        self._config = config or CloudConfig

    def webhook_urls(self, request: Request, channel: str) -> dict[str, str]:
        """The ingest URL of each webhook feeding ``channel``: ``--public-url`` based, else
        the address this request came to (what the operator reached the cloud by)."""
        config = self._config()
        base = config.public_url or str(request.base_url)
        return ingest_urls(base, config.webhooks.values(), channel)

    async def _channel_json(
        self,
        request: Request,
        spec: ChannelSpec,
        stats: ChannelStats | None = None,
        connections: int | None = None,
    ) -> dict[str, Any]:
        """The channel's limits and gauges; pass what the caller has read already."""
        if stats is None:
            stats = await self.buffer.stats(spec.name)
        if connections is None:
            connections = len(await self.buffer.list_connections(spec.name))
        return {
            **dataclasses.asdict(spec),
            "depth": stats.depth,
            "in_flight": stats.in_flight,
            "dead_letters": stats.dead_letters,
            "connections": connections,
            "webhook_urls": self.webhook_urls(request, spec.name),
        }

    async def _issue(
        self, channel: str, label: str, expires_in: float | None
    ) -> tuple[str, TokenRecord]:
        token = new_token()
        now = time.time()
        record = TokenRecord(
            token_id=uuid.uuid4().hex[:16],
            channel=channel,
            token_hash=hash_token(token),
            label=label,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        await self.buffer.put_token(record)
        return token, record

    async def _disconnect(self, channel: str, token_ids: set[str] | None = None) -> int:
        """Remove live connections (all, or those on ``token_ids``); return how many."""
        removed = 0
        for record in await self.buffer.list_connections(channel):
            if token_ids is None or record.token_id in token_ids:
                await self.buffer.release(channel, record.group, record.connection_id)
                removed += await self.buffer.remove_connection(channel, record.connection_id)
        return removed

    # Channels -------------------------------------------------------------------------------

    async def index(self, request: Request) -> JSONResponse:
        specs = sorted(await self.buffer.list_channels(), key=lambda spec: spec.name)
        return JSONResponse(
            {"channels": [await self._channel_json(request, spec) for spec in specs]}
        )

    async def create(self, request: Request) -> JSONResponse:
        wanted = validated(NewChannel, await json_body(request))
        if await self.buffer.get_channel(wanted.name) is not None:
            raise HttpRefusal(409, "channel_exists", f"channel {wanted.name!r} exists already")
        # A limit not given: the default of shared/limits.py, as for a channel of webhooks.json.
        spec = applied_limits(wanted, channel_spec(wanted.name, DEFAULT_LIMITS))
        await self.buffer.provision(spec)
        token, record = await self._issue(
            spec.name, wanted.token_label, wanted.token_expires_in_seconds
        )
        return JSONResponse(
            {
                "channel": await self._channel_json(request, spec),
                "token": token,
                "token_id": record.token_id,
            },
            201,
        )

    async def show(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        stats = await self.buffer.stats(spec.name)
        tokens = await self.buffer.list_tokens(spec.name)
        connections = await self._connections(spec)
        return JSONResponse(
            {
                "channel": await self._channel_json(request, spec, stats, len(connections)),
                "stats": dataclasses.asdict(stats),
                "tokens": [token_json(record) for record in tokens],
                "connections": connections,
            }
        )

    async def update(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        updated = applied_limits(validated(ChannelLimits, await json_body(request)), spec)
        await self.buffer.provision(updated)
        return JSONResponse({"channel": await self._channel_json(request, updated)})

    async def delete(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        disconnected = await self._disconnect(spec.name)
        await self.buffer.delete_channel(spec.name)
        return JSONResponse({"deleted": spec.name, "disconnected": disconnected})

    async def replay(self, request: Request) -> JSONResponse:
        """Deliver the channel's history since a point in time again, to one group."""
        spec = await existing_channel(self.buffer, request)
        wanted: HistoryReplay = validated(HistoryReplay, await json_body(request))
        if spec.history_seconds == 0:
            raise HttpRefusal(
                409, "no_history", "the channel keeps no history: set its history_seconds"
            )
        replayed = await self.buffer.replay_history(
            spec.name, wanted.group, wanted.since_seconds(), wanted.limit
        )
        return JSONResponse({"replayed": replayed, "group": wanted.group})

    async def events(self, request: Request) -> JSONResponse:
        """The channel's recent activity, newest first (the dashboard's live feed)."""
        spec = await existing_channel(self.buffer, request)
        limit = query_limit(request, 50, EVENTS_KEPT)
        events = await self.buffer.recent_events(spec.name, limit)
        return JSONResponse({"events": [dataclasses.asdict(event) for event in events]})

    # Tokens ---------------------------------------------------------------------------------

    async def tokens(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        records = await self.buffer.list_tokens(spec.name)
        return JSONResponse({"tokens": [token_json(record) for record in records]})

    async def issue(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        wanted: NewToken = validated(NewToken, await json_body(request))
        token, record = await self._issue(spec.name, wanted.label, wanted.expires_in_seconds)
        return JSONResponse({"token": token, **token_json(record)}, 201)

    async def rotate(self, request: Request) -> JSONResponse:
        """A new token; every other one of the channel ends after the grace period."""
        spec = await existing_channel(self.buffer, request)
        wanted: Rotation = validated(Rotation, await json_body(request))
        token, record = await self._issue(spec.name, wanted.label, None)
        grace_until = record.created_at + wanted.grace_seconds
        rotated: list[str] = []
        for old in await self.buffer.list_tokens(spec.name):
            if old.token_id == record.token_id:
                continue
            ends = grace_until if old.expires_at is None else min(old.expires_at, grace_until)
            await self.buffer.put_token(dataclasses.replace(old, expires_at=ends))
            rotated.append(old.token_id)
        if wanted.grace_seconds == 0:
            await self._disconnect(spec.name, set(rotated))
        return JSONResponse(
            {"token": token, **token_json(record), "grace_until": grace_until, "rotated": rotated},
            201,
        )

    async def revoke(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        token_id = str(request.path_params["token_id"])
        if not await self.buffer.delete_token(spec.name, token_id):
            raise HttpRefusal(404, "unknown_token", f"no token {token_id!r} on {spec.name!r}")
        disconnected = await self._disconnect(spec.name, {token_id})
        return JSONResponse({"revoked": token_id, "disconnected": disconnected})

    # Connections ----------------------------------------------------------------------------

    async def _connections(self, spec: ChannelSpec) -> list[dict[str, Any]]:
        answers = []
        for record in await self.buffer.list_connections(spec.name):
            in_flight = await self.buffer.pending_count(
                spec.name, record.group, record.connection_id, spec.max_in_flight
            )
            answers.append(connection_json(record, in_flight))
        return answers

    async def connections(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        return JSONResponse({"connections": await self._connections(spec)})

    async def disconnect(self, request: Request) -> JSONResponse:
        name = channel_name(request)
        connection_id = str(request.path_params["connection_id"])
        record = await self.buffer.get_connection(name, connection_id)
        if record is None:
            raise HttpRefusal(404, "unknown_connection", f"no connection {connection_id!r}")
        await self.buffer.release(name, record.group, connection_id)
        await self.buffer.remove_connection(name, connection_id)
        return JSONResponse({"disconnected": connection_id})
