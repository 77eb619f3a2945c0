"""What the database modules share: the table's shape, checked names, one row per message.

Every database module writes one row per webhook, keyed by its channel and message id (or by
a top-level field of the JSON body, ``upsert_key``, alone), so a redelivery upserts instead of
duplicating. The channel is part of the key because a message id is unique only within its
channel: each Redis stream numbers its own, so two channels feeding one table (two connectors,
or two webhooks the cloud delivers directly) can issue the same id in the same millisecond.
A table an earlier version created is keyed on ``message_id`` alone (and, in relational mode,
has no ``channel``): it is written as it is and keeps that key, never migrated; recreate it to
get the new key.

Table and column names come from configuration and end up in SQL text: they are checked against
``IDENTIFIER`` here, once, when the configuration is loaded, and quoted again by each dialect.

Columns of the default ``json`` storage mode::

    channel, message_id   the key (unless upsert_key names a body field)
    webhook_id, received_at (UTC), method, path, query_string
    headers      JSON object, names lower-cased (NULL when include_headers is false)
    payload      the body as JSON when it is JSON, else NULL
    body         the exact bytes received

``hybrid`` adds one column per ``schema`` field; ``relational`` keeps only the key columns,
``message_id``, ``webhook_id``, ``received_at`` and the schema's columns.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webhook_connect.shared.modules.base import Message, Permanent

_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
# A column or index name: what every SQL dialect accepts unquoted (63 bytes is PostgreSQL's cap).
IDENTIFIER = re.compile(_NAME)
# A table name, optionally qualified by its schema or database.
TABLE_NAME = re.compile(rf"{_NAME}(?:\.{_NAME})?")

FieldType = Literal[
    "string",
    "text",
    "integer",
    "int",
    "float",
    "number",
    "boolean",
    "bool",
    "datetime",
    "timestamp",
    "date",
    "time",
    "json",
]
# The CWM's aliases, folded onto one name each.
_ALIASES = {"int": "integer", "number": "float", "bool": "boolean", "timestamp": "datetime"}
# The CWM's MySQL shorthand ({"column": "VARCHAR(255)"}) maps SQL type names onto field types.
_SQL_TYPES = {
    "VARCHAR": "string",
    "CHAR": "string",
    "TEXT": "text",
    "MEDIUMTEXT": "text",
    "LONGTEXT": "text",
    "INT": "integer",
    "INTEGER": "integer",
    "BIGINT": "integer",
    "SMALLINT": "integer",
    "FLOAT": "float",
    "DOUBLE": "float",
    "DECIMAL": "float",
    "BOOL": "boolean",
    "BOOLEAN": "boolean",
    "DATETIME": "datetime",
    "TIMESTAMP": "datetime",
    "DATE": "date",
    "TIME": "time",
    "JSON": "json",
}

STANDARD_COLUMNS = (
    "message_id",
    "webhook_id",
    "channel",
    "received_at",
    "method",
    "path",
    "query_string",
    "headers",
    "payload",
    "body",
)
RELATIONAL_COLUMNS = ("message_id", "webhook_id", "received_at")


def check_identifier(name: str, what: str = "name") -> str:
    if not IDENTIFIER.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must be a letter or _ followed by up to 62 letters, digits or _"
        )
    return name


class FieldSpec(BaseModel):
    """One top-level field of the JSON body stored in its own column."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str
    type: FieldType = "string"
    constraints: tuple[Literal["NOT NULL", "UNIQUE"], ...] = ()

    @field_validator("column")
    @classmethod
    def _column(cls, value: str) -> str:
        return check_identifier(value, "column")


class IndexSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: tuple[str, ...] = Field(min_length=1)
    unique: bool = False


class TableSchema(BaseModel):
    """``schema`` of the hybrid and relational modes: body fields -> columns, and indexes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: dict[str, FieldSpec] = Field(min_length=1)
    indexes: dict[str, IndexSpec] = {}

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """Accept the CWM MySQL form ``{"event_id": "VARCHAR(255)"}`` (field = column)."""
        if not isinstance(data, dict) or "fields" in data:
            return data
        fields = {}
        for column, sql_type in data.items():
            base = str(sql_type).split("(")[0].strip().upper()
            if base not in _SQL_TYPES:
                raise ValueError(f"schema: unknown column type {sql_type!r} for {column!r}")
            fields[column] = {"column": column, "type": _SQL_TYPES[base]}
        return {"fields": fields}

    @field_validator("indexes")
    @classmethod
    def _index_names(cls, value: dict[str, IndexSpec]) -> dict[str, IndexSpec]:
        for name, index in value.items():
            check_identifier(name, "index")
            for column in index.columns:
                check_identifier(column, "index column")
        return value


class TableConfig(BaseModel):
    """``module-config`` keys every database module takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str = "webhook_events"
    include_headers: bool = True
    include_timestamp: bool = True

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not TABLE_NAME.fullmatch(value):
            raise ValueError(
                f"table {value!r} must be a name (or schema.name) of letters, digits and _, "
                "not starting with a digit, up to 63 characters each"
            )
        return value


class SqlTableConfig(TableConfig):
    """``module-config`` of the PostgreSQL and MySQL modules (the CWM's keys)."""

    storage_mode: Literal["json", "hybrid", "relational"] = "json"
    # False: a redelivery leaves the stored row as it is; True: it overwrites it.
    upsert: bool = False
    upsert_key: str = "message_id"
    table_schema: TableSchema | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_identifier(self.upsert_key, "upsert_key")
        if self.storage_mode != "json" and self.table_schema is None:
            raise ValueError(f"storage_mode {self.storage_mode!r} needs a 'schema' of fields")
        if self.upsert_key != "message_id" and self.upsert_key in STANDARD_COLUMNS:
            raise ValueError(f"upsert_key {self.upsert_key!r} would replace a standard column")
        names = [column.name for column in table_columns(self)]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"schema: column names used twice: {', '.join(duplicated)}")
        for index in self.table_schema.indexes.values() if self.table_schema else ():
            missing = [column for column in index.columns if column not in names]
            if missing:
                raise ValueError(f"schema: index on unknown columns: {', '.join(missing)}")
        return self


@dataclass(frozen=True, slots=True)
class Column:
    """A column of the table; ``type`` is a field type (aliases folded) or ``"bytes"``."""

    name: str
    type: str
    not_null: bool = False
    unique: bool = False
    # The top-level field of the JSON body this column takes, if any.
    field: str | None = None
    # Part of the row's key (the primary key, or what ClickHouse looks up before inserting).
    key: bool = False


def table_columns(config: TableConfig) -> tuple[Column, ...]:
    """The table's columns, the key first: (channel, message_id), or the body field alone."""
    sql = config if isinstance(config, SqlTableConfig) else None
    mode = sql.storage_mode if sql else "json"
    by_field = sql is not None and sql.upsert_key != "message_id"
    channel = Column("channel", "string", not_null=True, key=not by_field)
    if sql and by_field:
        first = Column(sql.upsert_key, "string", not_null=True, field=sql.upsert_key, key=True)
    else:
        first = channel
    columns = [
        first,
        Column("message_id", "string", not_null=True, key=not by_field),
        Column("webhook_id", "string", not_null=True),
        Column("received_at", "datetime"),
    ]
    if mode != "relational":
        columns += [channel] if by_field else []
        columns += [
            Column("method", "string", not_null=True),
            Column("path", "text", not_null=True),
            Column("query_string", "text", not_null=True),
            Column("headers", "json"),
            Column("payload", "json"),
            Column("body", "bytes", not_null=True),
        ]
    if sql and sql.table_schema and mode != "json":
        for name, spec in sql.table_schema.fields.items():
            kind = _ALIASES.get(spec.type, spec.type)
            not_null, unique = "NOT NULL" in spec.constraints, "UNIQUE" in spec.constraints
            columns.append(Column(spec.column, kind, not_null, unique, field=name))
    return tuple(columns)


def row_values(message: Message, config: TableConfig, columns: Sequence[Column]) -> tuple[Any, ...]:
    """The values of ``message``'s row, in ``columns`` order; :class:`Permanent` when a column
    needs a field of a JSON object body that this body does not have."""
    try:
        document: Any = orjson.loads(message.body)
        payload: str | None = message.body.decode()
    except orjson.JSONDecodeError:
        document, payload = None, None
    envelope = message.envelope
    standard: dict[str, Any] = {
        "message_id": message.message_id,
        "webhook_id": message.webhook_id,
        "channel": message.channel,
        "received_at": datetime.fromtimestamp(envelope.received_at, UTC)
        if config.include_timestamp
        else None,
        "method": envelope.method,
        "path": envelope.path,
        "query_string": envelope.query_string,
        "headers": orjson.dumps(message.header_map).decode() if config.include_headers else None,
        "payload": payload,
        "body": message.body,
    }
    values: list[Any] = []
    for column in columns:
        if column.field is None:
            values.append(standard[column.name])
            continue
        if not isinstance(document, dict):
            raise Permanent(f"column {column.name!r} needs a JSON object body")
        value = _as_text(document.get(column.field))
        if value is None and column.key:
            raise Permanent(f"upsert_key {column.field!r}: the JSON body has no such field")
        values.append(value)
    return tuple(values)


def fitted_columns(columns: Sequence[Column], existing: Collection[str]) -> tuple[Column, ...]:
    """``columns`` as the table ``existing`` (its column names) takes them: one made in
    relational mode before the channel joined the key has no ``channel``, so rows go in without
    it. Any other missing column stays, for the server to refuse."""
    return tuple(c for c in columns if c.name in existing or not existing or c.name != "channel")


def _as_text(value: Any) -> str | None:
    """A JSON value as the text the database casts to the column's type (strings unquoted)."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()
