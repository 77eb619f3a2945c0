"""AMQP 0-9-1 ``Basic.Properties`` encoded fast, for what the ``rabbitmq`` module sets.

pamqp's generic per-slot, per-type encoder was a tenth of the CPU of a publish. The bytes here
are pamqp's (tests/modules/test_rabbitmq.py compares them); any other value goes to pamqp's
own encoder and its errors.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast

import aiormq

from webhook_connect.shared.modules import attributes

SHORTSTR_MAX = 255
# Each property's bit in the content header's property flags (AMQP 0-9-1, 4.2.6.1).
FLAGS = aiormq.spec.Basic.Properties.flags
# What ``amqp_properties`` sets; the others, while they hold pamqp's defaults, are not encoded.
FAST_PROPERTIES = {"content_type", "headers", "delivery_mode", "message_id", "timestamp"}
OTHER_PROPERTIES = operator.attrgetter(
    *(name for name in aiormq.spec.Basic.Properties.__slots__ if name not in FAST_PROPERTIES)
)
UNSET = OTHER_PROPERTIES(aiormq.spec.Basic.Properties())
U8, U16, U32, U64 = (struct.Struct(f">{code}") for code in "BHIQ")


class PublishedProperties(aiormq.spec.Basic.Properties):
    """``Basic.Properties`` encoded by a straight-line ``marshal`` for the values this module
    sets (a string-valued headers table), in under half the time of pamqp's generic
    per-slot, per-type encoder. The bytes are pamqp's (tests compare them); anything else,
    or any value pamqp would refuse, goes to pamqp's own encoder and its errors.

    No ``__slots__`` here: pamqp walks ``self.__slots__``, which must stay the parent's list."""

    def marshal(self) -> bytes:
        content_type, headers, mode, message_id, timestamp = (
            self.content_type,
            self.headers,
            self.delivery_mode,
            self.message_id,
            self.timestamp,
        )
        if (
            OTHER_PROPERTIES(self) != UNSET
            or (headers is not None and type(headers) is not dict)
            or (mode is not None and type(mode) is not int)
            or (
                timestamp is not None
                and (type(timestamp) is not datetime or timestamp.tzinfo is not UTC)
            )
        ):
            return super().marshal()
        flags = 0
        parts: list[bytes | None] = [b""]
        if content_type is not None and content_type != "":
            parts.append(shortstr(content_type))
            flags |= FLAGS["content_type"]
        if headers is not None:
            parts.append(string_table(headers))
            flags |= FLAGS["headers"]
        if mode is not None:
            parts.append(U8.pack(mode))
            flags |= FLAGS["delivery_mode"]
        if message_id is not None and message_id != "":
            parts.append(shortstr(message_id))
            flags |= FLAGS["message_id"]
        if timestamp is not None:
            parts.append(U64.pack(int(timestamp.timestamp())))
            flags |= FLAGS["timestamp"]
        if None in parts:  # a value only pamqp's encoder can handle or refuse
            return super().marshal()
        parts[0] = U16.pack(flags)
        return b"".join(cast(list[bytes], parts))


def shortstr(value: object) -> bytes | None:
    """An AMQP shortstr, or None for what pamqp has to encode (or reject) itself."""
    if type(value) is not str:
        return None
    data = value.encode()
    return U8.pack(len(data)) + data if len(data) <= SHORTSTR_MAX else None


def string_table(table: Mapping[str, object]) -> bytes | None:
    """A field table of long strings, keys sorted as pamqp sorts them; None for any other."""
    if not table:
        return None
    parts: list[bytes] = []
    for key, value in sorted(table.items()):
        name = TABLE_KEYS.get(key) if type(key) is str else None
        if name is None:
            name = shortstr(key)
            if name is None or len(name) > 129:  # pamqp truncates names over 128 bytes
                return None
        if type(value) is not str:
            return None
        data = value.encode()
        parts += (name, b"S", U32.pack(len(data)), data)
    body = b"".join(parts)
    return U32.pack(len(body)) + body


TABLE_KEYS = {
    key: U8.pack(len(key)) + key.encode()
    for key in (attributes.MESSAGE_ID, attributes.WEBHOOK_ID, attributes.CHANNEL)
    + (attributes.RECEIVED_AT, attributes.HEADERS, attributes.HEADERS_OMITTED)
}
