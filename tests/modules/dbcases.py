"""What the database module tests share: one message shape, with repeated headers, and an
outage to ride out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.servers import Startable
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules import Message, Module, Pools, Transient

HEADERS = (("Content-Type", "application/json"), ("X-Event", "push"), ("X-Event", "again"))


def make_message(body: bytes, message_id: str = "m-1", channel: str = "orders") -> Message:
    envelope = Envelope(
        channel=channel,
        webhook_id="stripe",
        received_at=1_700_000_000.25,
        method="POST",
        path="/webhook/stripe",
        query_string="a=1&b=%20",
        headers=HEADERS,
        body=body,
    )
    return Message.of(message_id, 1, envelope)


async def ride_out_an_outage(
    server: Startable, start: Callable[[str, Pools], Awaitable[Module[Any]]], pools: Pools
) -> None:
    """Deliver before, during and after the server is down, through a module started before
    the outage (table ``outage``) and one started during it (``outage_late``): during, both
    fail as Transient; after, both deliver without being recreated."""
    outage = await start("outage", pools)
    await outage.deliver(make_message(b"{}", "before"))
    server.stop()
    late_pools = Pools()
    try:
        with pytest.raises(Transient):
            await outage.deliver(make_message(b"{}", "during"))
        # A module configured while the server is down starts anyway.
        late = await start("outage_late", late_pools)
        with pytest.raises(Transient):
            await late.deliver(make_message(b"{}", "late-during"))
    finally:
        server.start()
    try:
        await outage.deliver(make_message(b"{}", "after"))
        await late.deliver(make_message(b"{}", "late-after"))
    finally:
        await late_pools.aclose()
