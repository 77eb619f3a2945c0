"""The stored form of one webhook: everything the provider sent, byte for byte.

Headers are kept as received, in order, as ``(name, value)`` pairs decoded as latin-1, which maps
every byte to one character and back, so nothing is lost or normalised.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Envelope:
    """A received webhook before and after storage (the message id is the storage's)."""

    channel: str
    webhook_id: str
    received_at: float
    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: str = ""

    def encode_meta(self) -> bytes:
        """Everything but the body, as compact JSON (the body is stored beside it, raw)."""
        return orjson.dumps(envelope_fields(self, STORAGE_KEYS))

    @classmethod
    def decode(cls, meta: bytes, body: bytes) -> Envelope:
        """Rebuild an envelope from :meth:`encode_meta` output and the raw body."""
        return envelope_from_fields(orjson.loads(meta), body, STORAGE_KEYS)


# One name per field: the Envelope's own, used as is in the admin API's dead letters and the
# output modules' metadata. A stored or sent form renames them with one of these key tables.
FIELD_NAMES = (
    "channel",
    "webhook_id",
    "received_at",
    "method",
    "path",
    "query_string",
    "headers",
    "client",
)
NAMES = {name: name for name in FIELD_NAMES}
# Storage (SQLite rows, Redis stream entries): one letter each, in this order, as ever; the
# stored form must stay readable, so these never change.
STORAGE_KEYS = dict(zip(FIELD_NAMES, ("c", "w", "t", "m", "p", "q", "h", "a"), strict=True))
# The connector protocol's native messages (docs/PROTOCOL.md); connectors already deployed
# read these names.
WIRE_KEYS = {**NAMES, "received_at": "timestamp", "query_string": "query"}


_FIELDS = operator.attrgetter(*FIELD_NAMES)


def envelope_fields(envelope: Envelope, keys: Mapping[str, str] = NAMES) -> dict[str, Any]:
    """Every field of ``envelope`` but the body, named by ``keys`` (field name -> key)."""
    if keys is STORAGE_KEYS or keys is WIRE_KEYS or keys is NAMES:
        # Every stored webhook passes here once: one C call fetches all fields (these tables
        # list the fields in FIELD_NAMES order; tests/test_envelope.py holds them to it).
        return dict(zip(keys.values(), _FIELDS(envelope), strict=True))
    return {key: getattr(envelope, name) for name, key in keys.items()}


def envelope_from_fields(
    fields: Mapping[str, Any], body: bytes, keys: Mapping[str, str] = NAMES
) -> Envelope:
    """Inverse of :func:`envelope_fields`; ``KeyError`` when a field other than ``client``
    (absent from what older versions stored or sent) is missing."""
    return Envelope(
        channel=fields[keys["channel"]],
        webhook_id=fields[keys["webhook_id"]],
        received_at=fields[keys["received_at"]],
        method=fields[keys["method"]],
        path=fields[keys["path"]],
        query_string=fields[keys["query_string"]],
        headers=tuple((name, value) for name, value in fields[keys["headers"]]),
        body=body,
        client=fields.get(keys["client"], ""),
    )
