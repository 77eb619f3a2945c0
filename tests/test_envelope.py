"""One envelope mapping (shared/envelope.py): one name per field, and key tables for the stored
and the sent forms; what earlier versions stored stays readable."""

from __future__ import annotations

import dataclasses

import pytest

from webhook_connect.shared.envelope import (
    FIELD_NAMES,
    STORAGE_KEYS,
    WIRE_KEYS,
    Envelope,
    envelope_fields,
    envelope_from_fields,
)

ENVELOPE = Envelope(
    channel="orders",
    webhook_id="github",
    received_at=1700000000.25,
    method="POST",
    path="/webhook/github",
    query_string="a=1&b=%20",
    headers=(("Content-Type", "application/json"), ("X-Dup", "1"), ("x-dup", "\xff")),
    body=b'{"n": 1}\xff',
    client="192.0.2.7",
)
# What the buffers have always stored beside the body (SQLite rows, Redis stream entries).
STORED = (
    b'{"c":"orders","w":"github","t":1700000000.25,"m":"POST","p":"/webhook/github",'
    b'"q":"a=1&b=%20","h":[["Content-Type","application/json"],["X-Dup","1"],'
    b'["x-dup","\xc3\xbf"]],"a":"192.0.2.7"}'
)


def test_every_field_but_the_body_is_mapped_by_every_table() -> None:
    names = [f.name for f in dataclasses.fields(Envelope) if f.name != "body"]
    assert list(FIELD_NAMES) == names
    for keys in (STORAGE_KEYS, WIRE_KEYS):
        assert list(keys) == names
        assert len(set(keys.values())) == len(names)


def test_the_stored_form_is_byte_for_byte_what_it_was() -> None:
    assert ENVELOPE.encode_meta() == STORED
    assert Envelope.decode(STORED, ENVELOPE.body) == ENVELOPE


def test_a_record_stored_before_the_client_address_was_kept_is_read() -> None:
    older = STORED.replace(b',"a":"192.0.2.7"', b"")
    assert Envelope.decode(older, ENVELOPE.body) == dataclasses.replace(ENVELOPE, client="")


@pytest.mark.parametrize("keys", [None, STORAGE_KEYS, WIRE_KEYS])
def test_fields_and_back(keys: dict[str, str] | None) -> None:
    fields = envelope_fields(ENVELOPE) if keys is None else envelope_fields(ENVELOPE, keys)
    back = (
        envelope_from_fields(fields, ENVELOPE.body)
        if keys is None
        else envelope_from_fields(fields, ENVELOPE.body, keys)
    )
    assert back == ENVELOPE


def test_the_protocol_names() -> None:
    fields = envelope_fields(ENVELOPE, WIRE_KEYS)
    assert fields["query"] == ENVELOPE.query_string
    assert fields["timestamp"] == ENVELOPE.received_at
    assert "query_string" not in fields


def test_a_missing_field_is_a_key_error() -> None:
    fields = envelope_fields(ENVELOPE)
    del fields["path"]
    with pytest.raises(KeyError):
        envelope_from_fields(fields, b"")


def test_the_key_tables_list_every_field_in_order() -> None:
    # envelope_fields' fast path zips a table's keys with the fields in FIELD_NAMES order.
    from webhook_connect.shared.envelope import FIELD_NAMES, NAMES, STORAGE_KEYS, WIRE_KEYS

    for table in (NAMES, STORAGE_KEYS, WIRE_KEYS):
        assert tuple(table) == FIELD_NAMES
