"""What the database module tests share: one message shape, with repeated headers."""

from __future__ import annotations

from shared.envelope import Envelope
from shared.modules import Message

HEADERS = (("Content-Type", "application/json"), ("X-Event", "push"), ("X-Event", "again"))


def make_message(body: bytes, message_id: str = "m-1", channel: str = "orders") -> Message:
    envelope = Envelope(
        channel=channel, webhook_id="stripe", received_at=1_700_000_000.25, method="POST",
        path="/webhook/stripe", query_string="a=1&b=%20", headers=HEADERS, body=body,
    )  # fmt: skip
    return Message.of(message_id, 1, envelope)
