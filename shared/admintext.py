"""The admin API's answers as plain text: aligned tables, key/value blocks, message bodies.

Pure functions from the API's JSON (docs/ADMIN.md) to lines, so the command-line clients only
fetch and print. Times arrive as Unix seconds and are shown as ISO-8601 UTC; sizes in bytes.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Answer = dict[str, Any]

# Fields the admin API (docs/ADMIN.md) sends as Unix seconds.
TIME_FIELDS = frozenset(
    {
        "created_at",
        "expires_at",
        "connected_at",
        "seen_at",
        "dead_at",
        "received_at",
        "grace_until",
        "time",
        "last_seen",
    }
)
# A missing expiry means the token never expires, not that the value is unknown.
NEVER_FIELDS = frozenset({"expires_at"})
SIZE_FIELDS = frozenset({"size"})
COLUMN_GAP = "  "
BASE64_LINE = 76

CHANNEL_COLUMNS = (
    "name",
    "depth",
    "in_flight",
    "dead_letters",
    "connections",
    "max_queue_size",
    "ttl_seconds",
    "max_delivery_attempts",
)
TOKEN_COLUMNS = ("token_id", "label", "created_at", "expires_at")
CONNECTION_COLUMNS = (
    "connection_id",
    "connector_id",
    "group",
    "transport",
    "address",
    "connected_at",
    "seen_at",
    "token_id",
    "in_flight",
)
# expires_at of a group: when it is dropped unless a connection comes ("never" for none).
GROUP_COLUMNS = (
    "name",
    "backlog",
    "in_flight",
    "oldest_age_seconds",
    "connections",
    "last_seen",
    "expires_at",
)
DEAD_LETTER_COLUMNS = (
    "message_id",
    "group",
    "reason",
    "attempts",
    "dead_at",
    "webhook_id",
    "method",
    "size",
)
ATTEMPT_COLUMNS = (
    "attempt",
    "time",
    "connector_id",
    "connection_id",
    "outcome",
    "status_code",
    "duration_seconds",
)
# create, issue and rotate print these; the token itself last, where the eye lands.
NEW_TOKEN_FIELDS = (
    "token_id",
    "label",
    "created_at",
    "expires_at",
    "grace_until",
    "rotated",
    "token",
)
TOKEN_WARNING = "The token is shown only this once (the cloud keeps only its hash): store it now."
# The channel's field of webhook id -> ingest URL: a section of its own, not a key/value line.
WEBHOOK_URLS = "webhook_urls"
NO_WEBHOOKS = "none: add a webhook with this channel to webhooks.json"


def iso_utc(seconds: float) -> str:
    """``1700000000.5`` → ``2023-11-14T22:13:20.500Z``; whole seconds drop the fraction."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    spec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def format_value(field: str, value: Any) -> str:
    """One API value as table text, by the field it came from."""
    if value is None:
        return "never" if field in NEVER_FIELDS else "-"
    if value == "":
        return "-"
    if field in TIME_FIELDS and isinstance(value, int | float) and not isinstance(value, bool):
        return iso_utc(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field in SIZE_FIELDS and isinstance(value, int):
        return f"{value} B"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(field, item) for item in value) or "-"
    return str(value)


def table(fields: Sequence[str], items: Iterable[Mapping[str, Any]]) -> list[str]:
    """An aligned table: a header of the upper-cased field names, then one row per item."""
    rows = [[field.upper() for field in fields]]
    rows += [[format_value(field, item.get(field)) for field in fields] for item in items]
    widths = [max(len(row[column]) for row in rows) for column in range(len(fields))]
    # The last column is not padded, so lines carry no trailing spaces.
    return [
        COLUMN_GAP.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def key_values(item: Mapping[str, Any], fields: Sequence[str] | None = None) -> list[str]:
    """``field  value`` lines with the values aligned, in ``fields`` order (default: all)."""
    chosen = list(item) if fields is None else [field for field in fields if field in item]
    width = max((len(field) for field in chosen), default=0)
    return [
        f"{field.ljust(width)}{COLUMN_GAP}{format_value(field, item[field])}" for field in chosen
    ]


def body_lines(body: bytes) -> list[str]:
    """A message body as text when it is UTF-8, else as a wrapped base64 dump.

    The first line says which, so a binary body printed as base64 is never mistaken for text.
    """
    if not body:
        return ["body: empty (0 bytes)"]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        encoded = base64.b64encode(body).decode("ascii")
        chunks = [encoded[at : at + BASE64_LINE] for at in range(0, len(encoded), BASE64_LINE)]
        return [f"body: {len(body)} bytes, not UTF-8, base64:", *chunks]
    return [f"body: {len(body)} bytes, UTF-8 text:", *text.splitlines()]


def indented(lines: Iterable[str]) -> list[str]:
    """``lines`` as the body of a section."""
    return ["  " + line for line in lines]


def listing(items: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str) -> list[str]:
    """A table of ``items``, or the ``empty`` sentence rather than a lone header."""
    return table(columns, items) if items else [empty]


def new_token_lines(answer: Answer) -> list[str]:
    """A just-issued token (``create``, ``issue``, ``rotate``) and the warning to keep it."""
    return [*key_values(answer, NEW_TOKEN_FIELDS), TOKEN_WARNING]


def channel_fields(channel: Mapping[str, Any]) -> list[str]:
    """A channel's limits and gauges as key/value lines (its webhook URLs go elsewhere)."""
    return key_values({k: v for k, v in channel.items() if k != WEBHOOK_URLS})


def webhook_url_lines(channel: Mapping[str, Any]) -> list[str]:
    """``webhook URLs:`` and one ``id  URL`` line per webhook feeding the channel, ready to
    paste into the provider's settings."""
    urls: Mapping[str, str] = channel.get(WEBHOOK_URLS) or {}
    width = max((len(webhook_id) for webhook_id in urls), default=0)
    lines = [f"{webhook_id.ljust(width)}{COLUMN_GAP}{url}" for webhook_id, url in urls.items()]
    return ["webhook URLs:", *indented(lines or [NO_WEBHOOKS])]


def channel_report(answer: Answer) -> list[str]:
    """``channels show``: limits and stats, webhook URLs, counters, tokens, connections."""
    channel = answer["channel"]
    stats = dict(answer.get("stats") or {})
    counters = stats.pop("counters", None) or {}
    # The channel already carries depth, in_flight and dead_letters; the stats add the rest.
    extra = {name: value for name, value in stats.items() if name not in channel}
    return [
        *channel_fields({**channel, **extra}),
        "",
        *webhook_url_lines(channel),
        "",
        "counters:",
        *indented(key_values(counters)),
        "",
        "tokens:",
        *indented(listing(answer.get("tokens", []), TOKEN_COLUMNS, "none")),
        "",
        "connections:",
        *indented(listing(answer.get("connections", []), CONNECTION_COLUMNS, "none")),
    ]


def dead_letter_report(answer: Answer) -> list[str]:
    """``dlq show``: the metadata, each failed delivery, the headers as received, the body."""
    parts = ("headers", "body_base64", "delivery_attempts")
    metadata = {k: v for k, v in answer.items() if k not in parts}
    attempts = listing(answer.get("delivery_attempts") or [], ATTEMPT_COLUMNS, "none recorded")
    headers = [f"{name}: {value}" for name, value in answer.get("headers", [])]
    body = base64.b64decode(answer.get("body_base64") or "")
    return [
        *key_values(metadata),
        "",
        "delivery attempts:",
        *indented(attempts),
        "",
        "headers:",
        *indented(headers),
        "",
        *body_lines(body),
    ]
