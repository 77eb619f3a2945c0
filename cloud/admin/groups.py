"""``/admin/channels/{channel}/groups``: a channel's consumer groups; list, add, drop.

A group holds every message it has not acked, and the channel's ``max_queue_size`` counts them
all: a group nobody reads (``?group=typo``, a smee-client tried once) fills the channel. The
list shows each group's backlog so the operator can see which; dropping one lets its backlog
go and removes its connections (their heartbeats close them within seconds).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from webhook_connect.cloud.admin.common import (
    existing_channel,
    json_body,
    validated,
)
from webhook_connect.cloud.buffers import ChannelSpec, Registry
from webhook_connect.cloud.buffers.base import DEFAULT_GROUP, GroupInfo
from webhook_connect.cloud.sessions import GROUP_NAME
from webhook_connect.shared.exceptions import HttpRefusal


class NewGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: str = Field(pattern=GROUP_NAME.pattern)


def group_json(spec: ChannelSpec, info: GroupInfo) -> dict[str, Any]:
    """A group as the API shows it. ``expires_at``: when it is dropped if no connection comes
    (null: never, for the default group, a connected one, or a channel without idle expiry)."""
    expires = (
        spec.dynamic_groups
        and spec.group_idle_seconds > 0
        and info.name != DEFAULT_GROUP
        and info.connections == 0
    )
    return {
        "name": info.name,
        "backlog": info.backlog,
        "in_flight": info.in_flight,
        "oldest_age_seconds": None
        if info.oldest_age_seconds is None
        else round(info.oldest_age_seconds, 3),
        "connections": info.connections,
        "last_seen": info.last_seen,
        "expires_at": info.last_seen + spec.group_idle_seconds if expires else None,
    }


def group_name(request: Request) -> str:
    name = str(request.path_params["group"])
    if not GROUP_NAME.match(name):
        raise HttpRefusal(422, "invalid", "group: 1-64 letters, digits, '.', '_' or '-'")
    return name


class GroupRoutes:
    """Handlers for one channel's consumer groups."""

    def __init__(self, buffer: Registry) -> None:
        self.buffer = buffer

    async def index(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        groups = await self.buffer.list_groups(spec.name)
        return JSONResponse({"groups": [group_json(spec, info) for info in groups]})

    async def add(self, request: Request) -> JSONResponse:
        """Create a group (it starts at the next message): how groups come to exist on a
        channel with ``dynamic_groups`` false."""
        spec = await existing_channel(self.buffer, request)
        wanted: NewGroup = validated(NewGroup, await json_body(request))
        if await self.buffer.has_group(spec.name, wanted.group):
            raise HttpRefusal(409, "group_exists", f"group {wanted.group!r} exists already")
        await self.buffer.join(spec.name, wanted.group)
        info = await self._find(spec, wanted.group)
        return JSONResponse({"group": None if info is None else group_json(spec, info)}, 201)

    async def drop(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        name = group_name(request)
        before = await self._find(spec, name)
        disconnected = await self.buffer.drop_group(spec.name, name)
        if disconnected is None:
            raise HttpRefusal(404, "unknown_group", f"no group {name!r} on {spec.name!r}")
        return JSONResponse(
            {
                "dropped": name,
                "backlog": 0 if before is None else before.backlog,
                "disconnected": disconnected,
                "recreated": name == DEFAULT_GROUP,
            }
        )

    async def _find(self, spec: ChannelSpec, name: str) -> GroupInfo | None:
        return next((g for g in await self.buffer.list_groups(spec.name) if g.name == name), None)
