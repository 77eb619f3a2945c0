"""PostgreSQL output: one row per webhook, upserted by key, many rows per transaction.

Concurrent deliveries are coalesced (see :mod:`.dbwriter`) into one transaction,
so many webhooks share one commit (one fsync) and one pipelined ``executemany`` round trip:
that is what makes thousands of rows a second reachable through one connection. Every write is
an ``INSERT ... ON CONFLICT`` on the key, so a retried batch or a redelivery never duplicates.
The key is ``PRIMARY KEY (channel, message_id)`` (or the ``upsert_key`` body field); a table an
earlier version made keeps its ``PRIMARY KEY (message_id)``, which is read from the catalog and
used as the conflict target, so inserts go on as before (see :mod:`.dbtable`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

import asyncpg  # type: ignore[import-untyped]
from pydantic import AliasChoices, Field

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import DeliveryError, Permanent, Pools, Transient
from webhook_connect.shared.modules.dbtable import Column, SqlTableConfig
from webhook_connect.shared.modules.dbwriter import RowT, ServerSettings, TableModule

SQL_TYPES = {
    "string": "TEXT",
    "text": "TEXT",
    "integer": "BIGINT",
    "float": "DOUBLE PRECISION",
    "boolean": "BOOLEAN",
    "datetime": "TIMESTAMPTZ",
    "date": "DATE",
    "time": "TIME",
    "json": "JSONB",
    "bytes": "BYTEA",
}
# SQLSTATE classes a later attempt may get past: connection (08), authorization (28), rollback
# (40), insufficient resources (53), object state such as a lock (55), operator intervention,
# e.g. a shutdown (57), system (58), internal (XX). The rest (data 22, integrity 23, undefined
# column 42 ...) is the server rejecting this row.
TRANSIENT_CLASSES = frozenset({"08", "28", "40", "53", "55", "57", "58", "XX"})
TRANSIENT_STATES = frozenset({"3D000", "42501"})  # database missing, privilege not granted yet
ACQUIRE_TIMEOUT = 10.0
# The table's columns, each with whether it is in the primary key.
TABLE_SHAPE = """
SELECT a.attname, coalesce(a.attnum = ANY(i.indkey), false)
FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
"""


def quote(name: str) -> str:
    """A checked (``dbtable.TABLE_NAME``) name as a quoted identifier."""
    return ".".join(f'"{part}"' for part in name.split("."))


def create_statements(config: SqlTableConfig, columns: tuple[Column, ...]) -> list[str]:
    """``CREATE TABLE IF NOT EXISTS`` and the schema's indexes."""
    definitions = []
    for column in columns:
        sql = f"{quote(column.name)} {SQL_TYPES[column.type]}"
        sql += " NOT NULL" if column.not_null else ""
        definitions.append(sql + (" UNIQUE" if column.unique else ""))
    key = ", ".join(quote(column.name) for column in columns if column.key)
    definitions.append(f"PRIMARY KEY ({key})")
    statements = [f"CREATE TABLE IF NOT EXISTS {quote(config.table)} ({', '.join(definitions)})"]
    indexes = config.table_schema.indexes if config.table_schema else {}
    for name, index in indexes.items():
        unique = "UNIQUE " if index.unique else ""
        names = ", ".join(quote(column) for column in index.columns)
        statements.append(
            f"CREATE {unique}INDEX IF NOT EXISTS {quote(name)} ON {quote(config.table)} ({names})"
        )
    return statements


def insert_statement(
    config: SqlTableConfig, columns: tuple[Column, ...], key: Sequence[str]
) -> str:
    """One row's upsert on ``key`` (the conflict target). Body fields arrive as text and are
    cast by the server, so a value that does not fit its column is the server's data error."""
    placeholders = []
    for position, column in enumerate(columns, start=1):
        cast = column.field is not None and column.type not in ("string", "text")
        placeholders.append(
            f"CAST(${position}::text AS {SQL_TYPES[column.type]})" if cast else f"${position}"
        )
    names = ", ".join(quote(column.name) for column in columns)
    if config.upsert:
        updated = [quote(c.name) for c in columns if c.name not in key]
        updates = ", ".join(f"{name} = EXCLUDED.{name}" for name in updated)
        conflict = f"DO UPDATE SET {updates}"
    else:
        conflict = "DO NOTHING"
    return (
        f"INSERT INTO {quote(config.table)} ({names}) VALUES ({', '.join(placeholders)}) "
        f"ON CONFLICT ({', '.join(quote(name) for name in key)}) {conflict}"
    )


def classify(exc: BaseException) -> DeliveryError:
    """What a failed write means for the message: retry it later, or give up on it."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        if state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES:
            return Transient(f"PostgreSQL: {exc} ({state})")
        return Permanent(f"PostgreSQL refused the row: {exc} ({state})")
    if isinstance(exc, ValueError):  # an argument the driver could not encode
        return Permanent(f"PostgreSQL: {exc}")
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return Transient(f"PostgreSQL unreachable: {exc!r}")
    return Transient(f"PostgreSQL: {exc!r}")


class PostgresSettings(ServerSettings):
    """``connections.json`` keys of a ``postgresql`` connection."""

    url: str | None = Field(default=None, validation_alias=AliasChoices("url", "dsn"))
    # None: libpq's "prefer"; a mode name or true/false otherwise.
    ssl: (
        bool | Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None
    ) = None
    command_timeout: float = Field(default=30.0, gt=0)


async def open_pool(settings: PostgresSettings) -> asyncpg.Pool:
    """A pool that connects on demand (unless ``pool_min_size``), so it opens while the
    server is down."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        settings.url,
        host=settings.host if settings.url is None else None,
        port=settings.port,
        user=settings.user,
        password=settings.secret(),
        database=settings.database,
        ssl=settings.ssl,
        min_size=settings.pool_min_size,
        max_size=max(settings.pool_max_size, settings.pool_min_size),
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
    )
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 10)
    except TimeoutError:
        pool.terminate()


class PostgreSQLModule(TableModule[SqlTableConfig]):
    """Writes each webhook as a row of ``table`` (created if missing)."""

    name = "postgresql"
    Config = SqlTableConfig
    Settings = PostgresSettings
    connection_types = frozenset({"postgresql"})
    needs_connection = True

    def __init__(
        self, config: SqlTableConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        self._insert = insert_statement(config, self._columns, self._key)
        self._pool: asyncpg.Pool | None = None

    async def _write_once(self, rows: list[RowT]) -> None:
        """Insert ``rows`` in one transaction, creating the table first if need be."""
        assert isinstance(self.settings, PostgresSettings)
        settings = self.settings

        async def open_client() -> asyncpg.Pool:
            return await open_pool(settings)

        self._pool = pool = await self.pools.get(self._pool_key, open_client, close_pool)
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as connection:
            if not self._table_ready:
                await self._create_table(connection)
            if rows:
                async with connection.transaction():
                    await connection.executemany(self._insert, self._shaped(rows))

    def _classify(self, exc: Exception) -> DeliveryError:
        return classify(exc)

    def _is_missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, asyncpg.UndefinedTableError)

    async def _reset(self) -> None:
        if self._pool is not None:
            await self._pool.expire_connections()

    async def _create_table(self, connection: asyncpg.Connection) -> None:
        for statement in create_statements(self.config, self._columns):
            try:
                await connection.execute(statement)
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                pass  # another writer created it at the same moment: IF NOT EXISTS races
        shape = await connection.fetch(TABLE_SHAPE, quote(self.config.table))
        self._fit([name for name, _ in shape], [name for name, primary in shape if primary])
        self._insert = insert_statement(self.config, self._written, self._key)
        self._table_ready = True
