"""``/admin/channels/{channel}/dead-letters``: what a group gave up on; look, replay, purge.

The API names dead letters by the message id they had, which is what connectors logged; the
storage's own dead-letter ids stay internal.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from webhook_connect.cloud.admin.common import (
    Selection,
    dead_letter_json,
    existing_channel,
    json_body,
    query_limit,
    validated,
)
from webhook_connect.cloud.buffers import Buffer, DeadLetter
from webhook_connect.shared.exceptions import HttpRefusal

MAX_LISTED = 1000
# Replay and purge resolve message ids among at most this many dead letters of a channel.
MAX_SELECTED = 100_000


class DeadLetterRoutes:
    """Handlers for one channel's dead letters."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer

    async def index(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        limit = query_limit(request, 100, MAX_LISTED)
        letters = await self.buffer.dead_letters(spec.name, limit)
        return JSONResponse({"dead_letters": [dead_letter_json(letter) for letter in letters]})

    async def show(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        message_id = str(request.path_params["message_id"])
        for letter in await self.buffer.dead_letters(spec.name, MAX_SELECTED):
            if letter.message_id == message_id:
                return JSONResponse(dead_letter_json(letter, full=True))
        raise HttpRefusal(404, "unknown_dead_letter", f"no dead letter {message_id!r}")

    async def _select(self, request: Request, channel: str) -> list[str] | None:
        """Storage ids of the chosen dead letters, or None for all of them."""
        selection: Selection = validated(Selection, await json_body(request))
        if selection.ids is None or selection.all:
            return None
        letters: dict[str, DeadLetter] = {
            letter.message_id: letter
            for letter in await self.buffer.dead_letters(channel, MAX_SELECTED)
        }
        unknown = [message_id for message_id in selection.ids if message_id not in letters]
        if unknown:
            raise HttpRefusal(404, "unknown_dead_letter", {"message_ids": unknown})
        return [letters[message_id].dead_letter_id for message_id in selection.ids]

    async def replay(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        ids = await self._select(request, spec.name)
        replayed = await self.buffer.replay_dead_letters(spec.name, ids)
        return JSONResponse({"replayed": replayed})

    async def purge(self, request: Request) -> JSONResponse:
        spec = await existing_channel(self.buffer, request)
        ids = await self._select(request, spec.name)
        purged = await self.buffer.purge_dead_letters(spec.name, ids)
        return JSONResponse({"purged": purged})
