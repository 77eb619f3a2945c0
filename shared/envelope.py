"""The stored form of one webhook: everything the provider sent, byte for byte.

Headers are kept as received, in order, as ``(name, value)`` pairs decoded as latin-1, which maps
every byte to one character and back, so nothing is lost or normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        return orjson.dumps(
            {
                "c": self.channel,
                "w": self.webhook_id,
                "t": self.received_at,
                "m": self.method,
                "p": self.path,
                "q": self.query_string,
                "h": self.headers,
                "a": self.client,
            }
        )

    @classmethod
    def decode(cls, meta: bytes, body: bytes) -> Envelope:
        """Rebuild an envelope from :meth:`encode_meta` output and the raw body."""
        fields = orjson.loads(meta)
        return cls(
            channel=fields["c"],
            webhook_id=fields["w"],
            received_at=fields["t"],
            method=fields["m"],
            path=fields["p"],
            query_string=fields["q"],
            headers=tuple((name, value) for name, value in fields["h"]),
            body=body,
            client=fields.get("a", ""),
        )
