"""The metadata that modules put beside the body, in one shape for every protocol.

Protocols that carry key/value metadata next to an opaque body (S3 object metadata, SQS message
attributes, Pub/Sub attributes) get the same names and values, so a consumer reading any of them
sees the same thing. Values are ASCII: several of these protocols travel as HTTP headers, and
the headers a provider sent may hold any latin-1 character.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import orjson

from webhook_connect.shared.modules.base import Message, Permanent

MESSAGE_ID = "message-id"
WEBHOOK_ID = "webhook-id"
CHANNEL = "channel"
RECEIVED_AT = "received-at"
HEADERS = "headers"
# Set instead of HEADERS when the headers do not fit the protocol's metadata limit.
HEADERS_OMITTED = "headers-omitted"
# Set when the body had to be re-encoded to fit a text-only protocol.
BODY_ENCODING = "body-encoding"


def iso_time(timestamp: float) -> str:
    """``received_at`` as ISO 8601 UTC with microseconds (``2026-08-28T14:05:33.123456Z``)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def message_attributes(message: Message) -> dict[str, str]:
    """Where the message came from: ids, channel and receive time."""
    return {
        MESSAGE_ID: message.message_id,
        WEBHOOK_ID: message.webhook_id,
        CHANNEL: message.channel,
        RECEIVED_AT: iso_time(message.envelope.received_at),
    }


def headers_json(message: Message) -> str:
    """The headers as received, in order and with repeats, as ASCII JSON ``[[name, value], ...]``.

    A list of pairs, not an object: two ``Set-Cookie`` headers stay two.
    """
    pairs = [[name, value] for name, value in message.headers]
    return json.dumps(pairs, ensure_ascii=True, separators=(",", ":"))


def fitting_headers(message: Message, room: int, limit: str) -> dict[str, str]:
    """``{"headers": json}`` when it takes at most ``room`` bytes, else a note saying why not.

    Metadata limits are small (S3: 2 KB in all, Pub/Sub: 1 KB a value); a body is never
    refused for its headers.
    """
    value = headers_json(message)
    if len(value) <= room:
        return {HEADERS: value}
    return {HEADERS_OMITTED: f"{len(value)} bytes of headers, over the {limit}"}


def json_envelope(message: Message, *, include_headers: bool = True) -> bytes:
    """The JSON document sent where the protocol has no headers: the parsed ``payload`` (null
    when the body is not JSON, which then travels as ``body_base64``), ids and headers."""
    try:
        doc: dict[str, Any] = {"payload": message.json()}
    except Permanent:
        doc = {"payload": None, "body_base64": base64.b64encode(message.body).decode()}
    meta = message.metadata()
    for key in ("message_id", "webhook_id", "channel", "received_at"):
        doc[key] = meta[key]
    if include_headers:
        doc["headers"] = message.header_map
    return orjson.dumps(doc)
